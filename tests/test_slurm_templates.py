"""slurm/ templates on a real cluster with stand-in scripts (fast; no Glow).

tests/slurm_standin/ holds scripts that speak the contract CLIs: train.py (exit 0 + STOPPED on
STOP/USR1, resume), evaluate.py and figures.py (write the contract's output files). The real
trainer is exercised by test_slurm.py (issue 6 (a)-(d)); these cover the failure path and
the submit.sh chain, which need no real model.
"""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
STANDIN = "tests/slurm_standin/train.py"


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


def test_failure_is_not_requeued(slurm_cluster, tmp_path):
    """A trainer failure (here: missing config) fails the job without a requeue."""
    job, run_dir = _submit(slurm_cluster, tmp_path, "bad", "train.steps=2", config="missing.yaml")
    rec = slurm_cluster.wait_for(job, timeout=120)
    assert rec["JobState"] == "FAILED" and rec["Restarts"] == "0", _log(run_dir)


def test_submit_chains_train_eval_figures(slurm_cluster, tmp_path):
    """slurm/submit.sh: train -> eval array (afterok) -> figures (afterok), with stand-ins."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("run: {}\n")
    env = {"GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": "1", "GLOW_RUN_ROOT": str(tmp_path / "runs"),
           "GLOW_TRAIN_SCRIPT": STANDIN, "GLOW_EVAL_SCRIPT": "tests/slurm_standin/evaluate.py",
           "GLOW_FIGURES_SCRIPT": "tests/slurm_standin/figures.py"}
    args = ["slurm/submit.sh", "--name", "chain", "--config", str(cfg), "--in", "demo",
            "--ood", "digits/test", "--tasks", "dump", "--run-tasks", "samples",
            "train.steps=2", "train.step_seconds=0"]
    dry = slurm_cluster.run(args + ["--dry-run"], env=env, cwd=REPO).stdout
    # dump of demo/test, digits/test and demo/train (typicality), then samples once
    assert "--dependency=afterok:TRAIN_JOB_ID" in dry and "--array=0-3" in dry, dry
    out = slurm_cluster.run(args, env=env, cwd=REPO).stdout
    ids = dict(line.split()[:2] for line in out.splitlines())
    assert set(ids) == {"train", "eval", "figures"}, out
    run_dir = tmp_path / "runs" / "chain"
    rec = slurm_cluster.wait_for(ids["figures"], timeout=240)
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))
    assert rec["JobState"] == "COMPLETED", logs
    assert {r["JobState"] for r in slurm_cluster.job_states(ids["eval"])} == {"COMPLETED"}, logs
    assert (run_dir / "figures" / "ood.md").read_text().count(".npz") == 3
    assert (run_dir / "eval" / "step-00000002" / "samples.png").exists()
    # Resubmitting the array skips finished items without starting Python.
    job = slurm_cluster.sbatch(REPO / "slurm" / "eval.sbatch", str(run_dir / "slurm" / "eval-jobs.txt"),
                               env={**env, "GLOW_REPO": str(REPO)}, cwd=REPO,
                               sbatch_args=["--array=0", f"--output={tmp_path}/again-%a.out"])
    slurm_cluster.wait_for(job, timeout=60)
    assert "exists; skipping" in (tmp_path / "again-0.out").read_text()
