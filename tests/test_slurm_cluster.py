"""Smoke tests of the throw-away Slurm cluster (tests/slurm_cluster.py)."""

import time

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def test_two_node_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"$SLURM_NODEID $SLURMD_NODENAME\"'\n")
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch(script, sbatch_args=["--nodes=2", f"--output={out}",
                                                    f"--chdir={tmp_path}"])
    rec = slurm_cluster.wait_for(job, timeout=60)
    assert rec["JobState"] == "COMPLETED", rec
    assert sorted(out.read_text().split("\n")[:2]) == ["0 n1", "1 n2"], out.read_text()


def test_usr1_trap_requeues_job(slurm_cluster, tmp_path):
    """The batch shell's USR1 trap requeues its own job, which comes back with a restart count."""
    script = tmp_path / "requeue.sh"
    script.write_text(f"""#!/bin/bash
echo "start restart=${{SLURM_RESTART_COUNT:-0}}"
if [[ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]]; then echo done; exit 0; fi
trap 'echo got-usr1; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
touch {tmp_path}/running
sleep 300 &
wait
""")
    out = tmp_path / "requeue.out"
    job = slurm_cluster.sbatch(script, sbatch_args=[
        "--requeue", "--open-mode=append", f"--output={out}", f"--chdir={tmp_path}"])
    slurm_cluster.wait_for(job, "RUNNING", timeout=60)
    deadline = time.monotonic() + 30
    while not (tmp_path / "running").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    t0 = time.monotonic()
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rec = slurm_cluster.wait_for(job, "COMPLETED", timeout=90)
    elapsed = time.monotonic() - t0
    assert int(rec["Restarts"]) >= 1, rec
    text = out.read_text()
    assert "got-usr1" in text and "start restart=1" in text and "done" in text, text
    print(f"requeue round trip: {elapsed:.1f} s")   # ~13 s with cred_expire=10
