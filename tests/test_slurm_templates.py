"""slurm/ templates on a real cluster with stand-in scripts (fast; no Glow).

tests/slurm_standin/ holds scripts that speak the contract CLIs: train.py (exit 0 + STOPPED on
STOP/USR1, resume), evaluate.py and figures.py (write the contract's output files). The real
trainer, evaluation and figures are exercised by test_slurm.py (the whole submit.sh chain) and
test_slurm_failures.py; the stand-ins serve the scenarios that need no real model.
"""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300), pytest.mark.xdist_group("slurm")]

REPO = Path(__file__).resolve().parents[1]
STANDIN = "tests/helpers/slurm_standin/train.py"


def _submit(cluster, tmp_path, name, *overrides, nodes=1, procs=1, extra=(), config="tiny.yaml"):
    cfg = tmp_path / config
    if config == "tiny.yaml":
        cfg.write_text("run: {}\n")
    run_root = tmp_path / "runs"
    (run_root / name / "logs").mkdir(parents=True, exist_ok=True)
    env = {"GLOW_REPO": str(REPO), "GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": str(procs),
           "GLOW_RUN_ROOT": str(run_root), "GLOW_TRAIN_SCRIPT": STANDIN}
    job = cluster.sbatch(REPO / "slurm" / "train.sbatch", name, str(cfg), *overrides, env=env,
                         cwd=REPO, sbatch_args=[f"--nodes={nodes}",
                                                f"--output={run_root / name}/logs/train-%j.out",
                                                *extra])
    return job, run_root / name


def _log(run_dir):
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("train-*.out")))


def test_a_bug_is_not_requeued_and_keeps_its_traceback(slurm_cluster, tmp_path):
    """A trainer crash (the stand-in asserts its config exists) fails the job with status 1, not
    requeued, its traceback in the log (a user error would end with 2, 4 or 5 and no traceback)."""
    job, run_dir = _submit(slurm_cluster, tmp_path, "bad", "train.steps=2", config="missing.yaml")
    rec = slurm_cluster.wait_for(job, timeout=120)
    log = _log(run_dir)
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "0" and rec["ExitCode"] == "1:0", log
    assert "Traceback" in log and "AssertionError: bad args" in log, log
