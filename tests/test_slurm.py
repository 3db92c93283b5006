"""Issue 6 acceptance tests: the Slurm templates with the real train/train.py on a real cluster.

(a) 1 node x 2 CPU processes trains the tiny config to completion;
(b) 2 nodes x 1 process train together: world size 2, identical parameters across ranks;
(c) USR1 mid-run -> complete checkpoint, requeue (SLURM_RESTART_COUNT >= 1), finish, and final
    weights equal to an uninterrupted run's;
(d) slurm/submit.sh runs train -> eval array -> figures on tiny data; the figures exist.

Data: the toy shards of tests/toydata.py (toy/train, toy/test, toyood/test). Each test skips,
naming what is missing, until train/train.py (and for (d) eval/evaluate.py) exist. The template logic itself is covered by test_slurm_templates.py.
"""

import json
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = "train/configs/tiny.yaml"
# Small enough for 2 cores; the keys are those of the training config (adjust with it).
TINY = ["train.max_steps=12", "train.checkpoint_every=4", "data.dataset=toy"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from tests.toydata import build_toy_shards
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
    return {"GLOW_REPO": str(REPO), "GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": str(procs),
            "GLOW_RUN_ROOT": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": str(REPO)}


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
    steps = sorted(p.parent for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert steps, f"no complete checkpoint under {run_dir}"
    return steps[-1]


def _weights(step_dir):
    from safetensors.torch import load_file
    return load_file(step_dir / "model.safetensors")


def test_a_one_node_two_cpu_processes(slurm_cluster, tmp_path, shards):
    job, run_dir = _train(slurm_cluster, tmp_path, shards, "a", procs=2)
    rec = slurm_cluster.wait_for(job, timeout=400)
    assert rec["JobState"] == "COMPLETED", _log(run_dir)
    step = _final_step(run_dir)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["step"] == 12 and meta["world_size"] == 2, meta


def test_b_two_nodes_one_process_each(slurm_cluster, tmp_path, shards):
    job, run_dir = _train(slurm_cluster, tmp_path, shards, "b", nodes=2, procs=1)
    rec = slurm_cluster.wait_for(job, timeout=400)
    assert rec["JobState"] == "COMPLETED", _log(run_dir)
    step = _final_step(run_dir)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["world_size"] == 2, meta
    # The trainer gathers a digest of every parameter from each rank at each checkpoint.
    assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1, meta


def test_c_preemption_requeue_resume_equals_uninterrupted(slurm_cluster, tmp_path, shards):
    # The tiny run takes < 1 s: pause 2 s in each checkpoint so USR1 lands mid-run.
    slow = {"GLOW_TEST_PAUSE_BEFORE_COMPLETE": "2"}
    job, run_dir = _train(slurm_cluster, tmp_path, shards, "pre", extra=["-w", "n1"], env=slow)
    ref, ref_dir = _train(slurm_cluster, tmp_path, shards, "ref", extra=["-w", "n2"], env=slow)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoints/step-*/COMPLETE")):
        assert time.monotonic() < deadline, _log(run_dir)
        assert slurm_cluster.job_state(job)["JobState"] in {"PENDING", "RUNNING"}, _log(run_dir)
        time.sleep(0.5)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rec = slurm_cluster.wait_for(job, timeout=500)
    log = _log(run_dir)
    assert rec["JobState"] == "COMPLETED" and int(rec["Restarts"]) >= 1, log
    assert "trainer stopped resumably" in log and "requeueing job" in log, log
    assert slurm_cluster.wait_for(ref, timeout=300)["JobState"] == "COMPLETED", _log(ref_dir)
    a, b = _weights(_final_step(run_dir)), _weights(_final_step(ref_dir))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed run's weights differ from uninterrupted"


def test_d_submit_pipeline(slurm_cluster, tmp_path, shards):
    env = _env(tmp_path, 1)
    out = slurm_cluster.run(
        ["slurm/submit.sh", "--name", "d", "--config", CONFIG, "--in", "toy/test",
         "--ood", "toyood/test", "--data-root", str(shards), *TINY],
        env=env, cwd=REPO).stdout
    ids = dict(line.split()[:2] for line in out.splitlines())
    run_dir = tmp_path / "runs" / "d"
    rec = slurm_cluster.wait_for(ids["figures"], timeout=580)
    assert rec["JobState"] == "COMPLETED", _log(run_dir)
    for f in ("distributions.png", "ood.md", "ood.json"):
        assert (run_dir / "figures" / f).is_file(), f
