"""The Slurm templates with the real train/train.py, evaluate.py and figures.py on a real cluster.

(a) 1 node x 2 CPU processes trains the tiny config to completion, with a hostile folder
    `checkpoints/step-1+NNODES[$(cd;touch pwned)]` holding a COMPLETE file in the run: nothing
    runs (no `pwned` anywhere) and the job behaves;
(b) 2 nodes x 1 process train together: world size 2, identical parameters across ranks;
(c) USR1 preemption, requeue and an exact resume: test_slurm_failures.py (a)+(d) (world size 4,
    three preemptions, bitwise equal to an uninterrupted run);
(d) slurm/submit.sh runs train -> eval array -> figures on tiny data, the run is finished early
    (`submit.sh --finish`): the job ends COMPLETED without a requeue and the evaluation and
    figures run on that step; then `submit.sh --only eval,figures` on that run and on the
    finished run of (a): jobs run, no training job.

Data: the toy shards of tests/helpers/toy.py (toy/train, toy/test, toyood/test). The template logic
itself is covered by test_slurm_templates.py, the failure semantics by test_slurm_failures.py.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = "train/configs/tiny.yaml"
# Small enough for 2 cores; the keys are those of the training config (adjust with it).
TINY = ["train.max_steps=12", "train.checkpoint_every=4", "data.dataset=toy"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from tests.helpers.toy import build_toy_shards
    return build_toy_shards(tmp_path_factory.mktemp("toy-shards"))


@pytest.fixture
def shards(request, toy_root):
    needs = ["train/train.py", CONFIG]
    if request.node.name.startswith("test_d"):
        needs += ["eval/evaluate.py", "eval/figures.py"]
    for path in needs:
        if not (REPO / path).is_file():
            pytest.skip(f"{path} does not exist yet")
    return toy_root


def _env(tmp_path, procs):
    (tmp_path / "home").mkdir(exist_ok=True)
    return {"GLOW_REPO": str(REPO), "GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": str(procs),
            "GLOW_RUN_ROOT": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": str(REPO), "HOME": str(tmp_path / "home")}


def _train(cluster, tmp_path, shards, name, *, nodes=1, procs=1, extra=(), overrides=(), env=()):
    run_dir = tmp_path / "runs" / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job = cluster.sbatch(REPO / "slurm" / "train.sbatch", name, CONFIG, *TINY,
                         f"data.root={shards}", *overrides, env={**_env(tmp_path, procs), **dict(env)}, cwd=REPO,
                         sbatch_args=[f"--nodes={nodes}", f"--cpus-per-task={procs}",
                                      f"--output={run_dir}/logs/train-%j.out", *extra])
    return job, run_dir


def _log(run_dir):
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


def _final_step(run_dir):
    steps = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-0*/COMPLETE"))
    assert steps, f"no complete checkpoint under {run_dir}"
    return steps[-1]


HOSTILE = "step-1+NNODES[$(cd;touch pwned)]"


@pytest.fixture(scope="module")
def finished_run(slurm_cluster, tmp_path_factory, toy_root):
    """Run (a), trained to the end, for test (a) and for evaluating a finished run in (d)."""
    tmp_path = tmp_path_factory.mktemp("a")
    hostile = tmp_path / "runs" / "a" / "checkpoints" / HOSTILE
    hostile.mkdir(parents=True)
    (hostile / "COMPLETE").touch()
    job, run_dir = _train(slurm_cluster, tmp_path, toy_root, "a", procs=2)
    return {"rec": slurm_cluster.wait_for(job, timeout=400), "run_dir": run_dir, "tmp": tmp_path}


def test_a_one_node_two_cpu_processes(finished_run):
    run_dir, tmp = finished_run["run_dir"], finished_run["tmp"]
    assert finished_run["rec"]["JobState"] == "COMPLETED", _log(run_dir)
    step = _final_step(run_dir)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 2, meta
    # the hostile folder name ran nothing, in the job's home, run directory, repository or anywhere here
    assert not list(tmp.rglob("pwned")) and not (REPO / "pwned").exists(), _log(run_dir)
    assert "checkpoint_step=0" in _log(run_dir)  # the template saw no checkpoint in that folder


def test_b_two_nodes_one_process_each(slurm_cluster, tmp_path, shards):
    job, run_dir = _train(slurm_cluster, tmp_path, shards, "b", nodes=2, procs=1)
    rec = slurm_cluster.wait_for(job, timeout=400)
    assert rec["JobState"] == "COMPLETED", _log(run_dir)
    step = _final_step(run_dir)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["world_size"] == 2, meta
    # The trainer gathers a digest of every parameter from each rank at each checkpoint.
    assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1, meta


def _submit(cluster, env, *args):
    out = cluster.run(["slurm/submit.sh", *args], env=env, cwd=REPO).stdout
    return dict(line.split()[:2] for line in out.splitlines())


def _evaluate_again(cluster, env, name, shards, *extra):
    """`submit.sh --only eval,figures`: the jobs it submitted, the figures job's end state and
    the end states of the evaluation tasks."""
    ids = _submit(cluster, env, "--only", "eval,figures", "--name", name, "--in", "toy/test",
                  "--ood", "toyood/test", "--data-root", str(shards), *extra)
    figures = cluster.wait_for(ids["figures"], timeout=400)["JobState"]  # after every evaluation task
    return ids, figures, {r["JobState"] for r in cluster.job_states(ids["eval"])}


def test_d_submit_finish_early_then_evaluate_again(slurm_cluster, tmp_path, shards, finished_run):
    env = _env(tmp_path, 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # (d2) the finished run of (a), evaluated alone, while (d1) trains
        again_a = pool.submit(_evaluate_again, slurm_cluster, _env(finished_run["tmp"], 1), "a", shards,
                              "--train-split", "none", "--run-tasks", "")
        _finish_early_then_evaluate_again(slurm_cluster, env, tmp_path, shards)
        ids_a, figures_a, tasks_a = again_a.result()
    a_dir = finished_run["run_dir"]
    assert set(ids_a) == {"eval", "figures"} and figures_a == "COMPLETED" and tasks_a == {"COMPLETED"}, _log(a_dir)
    assert json.loads((a_dir / "figures" / "ood.json").read_text())["step"] == 12


def _finish_early_then_evaluate_again(cluster, env, tmp_path, shards):
    # (d1) the whole chain, finished early
    ids = _submit(cluster, env, "--name", "d", "--config", CONFIG, "--in", "toy/test", "--ood", "toyood/test",
                  "--train-split", "none", "--data-root", str(shards), "data.dataset=toy",
                  "train.max_steps=100000", "train.checkpoint_every=100000", "train.sample_every=100000")
    run_dir = tmp_path / "runs" / "d"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists():  # training runs: finish it early
        assert time.monotonic() < deadline and cluster.job_state(ids["train"])["JobState"] in \
            {"PENDING", "RUNNING"}, _log(run_dir)
        time.sleep(0.5)
    cluster.run(["slurm/submit.sh", "--finish", "d"], env=env, cwd=REPO)
    rec = cluster.wait_for(ids["figures"], timeout=500)
    log = _log(run_dir)
    assert rec["JobState"] == "COMPLETED", log
    train = cluster.job_state(ids["train"])
    assert train["JobState"] == "COMPLETED" and train["Restarts"] == "0", log
    step, reason = (run_dir / "STOPPED").read_text().split()
    assert reason == "FINISH" and f"finished early at step {step}" in log and "requeueing" not in log, log
    assert not (run_dir / "FINISH").exists()
    assert {r["JobState"] for r in cluster.job_states(ids["eval"])} == {"COMPLETED"}, log
    table = json.loads((run_dir / "figures" / "ood.json").read_text())
    assert table["step"] == int(step), table  # evaluation and figures on the finish checkpoint
    for f in ("distributions.png", "ood.md", "index.html", "samples.png"):
        assert (run_dir / "figures" / f).is_file(), f
    # (d3) the run that finished early, evaluated again: no training job, every task finds its
    # results and skips; and one task resubmitted by hand as docs/cluster.md shows (its work
    # items as the array's arguments, from the list submit.sh keeps for people)
    items = (run_dir / "slurm" / "eval-jobs.txt").read_text().splitlines()
    by_hand = cluster.sbatch(REPO / "slurm" / "eval.sbatch", *items, env={**env, "GLOW_REPO": str(REPO)},
                             cwd=REPO, sbatch_args=["--array=1", f"--output={tmp_path}/again-%a.out"])
    again, figures, tasks = _evaluate_again(cluster, env, "d", shards, "--train-split", "none")
    assert set(again) == {"eval", "figures"}, again
    assert figures == "COMPLETED" and tasks == {"COMPLETED"}, _log(run_dir)
    assert _log(run_dir).count("every result exists; skipping") == len(items) == 3
    assert cluster.wait_for(by_hand, timeout=120)["JobState"] == "COMPLETED"
    assert f"exists; skipping ({items[1]})" in (tmp_path / "again-1.out").read_text()
