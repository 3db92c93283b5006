"""Smoke tests of the throw-away Slurm cluster (tests/helpers/slurm_cluster.py)."""

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180), pytest.mark.xdist_group("slurm")]


def test_two_node_job_runs_on_both_nodes(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"$SLURM_NODEID $SLURMD_NODENAME\"'\n")
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch(script, sbatch_args=["--nodes=2", f"--output={out}",
                                                    f"--chdir={tmp_path}"])
    rec = slurm_cluster.wait_for(job, timeout=60)
    assert rec["JobState"] == "COMPLETED", rec
    assert sorted(out.read_text().split("\n")[:2]) == ["0 n1", "1 n2"], out.read_text()
