"""Slurm for real: the templates with the real trainer, evaluation and figures on a real two-node
cluster (tests/helpers/slurm_cluster.py), every scenario one job (or a few) driven by its own thread,
all started together by the module fixture, so the module costs about as long as its slowest one.

(a) 2 nodes x 2 processes (world size 4), a USR1 preemption: identical replicas, final weights
    bitwise equal to an uninterrupted world-size-4 run (the one proof of exact resume across
    processes and attempts; in-process: tests/test_trainer.py); a hostile folder
    `checkpoints/step-1+NNODES[$(cd;touch pwned)]` in that run runs nothing;
(b) the trainer of one node frozen (SIGSTOP: a hung node keeps its sockets open), and in another
    job killed: the job ends FAILED (dist.timeout_s 10), is not requeued, the last checkpoint loads;
(c) scancel: CANCELLED, not requeued, the trainer saved a complete checkpoint on TERM;
(h) a config error inside the job: FAILED with exit status 2, no traceback, the message last;
(i) Slurm's own preemption (PreemptMode=REQUEUE, partition low preempted by high): TERM to the job,
    the script does not requeue, Slurm does, and the run resumes from a checkpoint;
(j) the requeue cap: with GLOW_MAX_REQUEUES=0 a preempted job that made progress ends FAILED;
(k) slurm/submit.sh: train -> eval array -> figures on tiny data, finished early (`submit.sh
    --finish`): COMPLETED without a requeue, evaluation and figures on that step; then one task
    resubmitted by hand (docs/cluster.md): it finds its result and skips.

Removed from earlier rounds, and what covers each now: the second and third preemption in a row (the
requeue count across attempts: tests/test_run.py::test_the_requeue_decision and (j); the exact resume:
(a)'s one preemption and tests/test_trainer.py's STOP test); an attempt without progress (the requeue
decision, tests/test_run.py::test_the_requeue_decision, the same sbatch branch as (j)); DeepSpeed on
2 Slurm nodes (tests/test_trainer.py::test_deepspeed_zero2_trains_like_ddp_seals_its_state_and_resumes);
1 node x 2 processes and 2 nodes x 1 process trained to the end ((a): 2 nodes x 2 processes); a finished
run evaluated alone and `submit.sh --only eval,figures` on the cluster ((k)'s task resubmitted by hand;
tests/test_submit.py::test_only_eval_and_figures_submits_no_training: the jobs submitted, no training;
tests/test_evaluation.py: every result skipped); a second launch on a live run
(tests/test_trainer.py::test_second_trainer_on_a_live_run_refuses_naming_the_holder; exit 2 through the
template: (h)).

Jobs ask for one CPU per node (the cluster advertises more CPUs than the machine has) and sleep
between steps (GLOW_TEST_STEP_SECONDS, no CPU) where they must live until the test acts on them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.repo import REPO
from tests.helpers.slurm_cluster import TERMINAL_STATES
from tests.helpers.toy import build_toy_shards

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.xdist_group("slurm")]

CONFIG = "train/configs/tiny.yaml"
TIMEOUT_S = 10          # dist.timeout_s of the fail-fast jobs
TINY = ["data.dataset=toy", "train.sample_every=100000", "train.log_every=5"]


# ----------------------------------------------------------------------------- helpers
class Scenario:
    def __init__(self, cluster, root: Path, shards: Path):
        self.cluster, self.root, self.shards = cluster, root, shards

    def submit(self, name, *overrides, nodes=2, procs=1, env=(), script=None, config=CONFIG,
               standin=False, extra=()):
        run_dir = self.root / "runs" / name
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        full_env = {"GLOW_REPO": str(REPO), "GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": str(procs),
                    "GLOW_RUN_ROOT": str(self.root / "runs"), "OMP_NUM_THREADS": "1",
                    "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), **dict(env)}
        args = [name, config, *overrides] if standin else \
            [name, config, *TINY, f"data.root={self.shards}", *overrides]
        if standin:
            full_env["GLOW_TRAIN_SCRIPT"] = "tests/helpers/slurm_standin/train.py"
        job = self.cluster.sbatch(script or REPO / "slurm" / "train.sbatch", *args, env=full_env, cwd=REPO,
                                  sbatch_args=[f"--nodes={nodes}", "--cpus-per-task=1",
                                               f"--output={run_dir}/logs/train-%j.out", *extra])
        return job, run_dir

    def state(self, job):
        return self.cluster.job_state(job)

    def wait_until(self, job, run_dir, predicate, timeout=400, what="condition"):
        deadline = time.monotonic() + timeout
        while not predicate():
            rec = self.state(job)
            if rec["JobState"] in TERMINAL_STATES:
                raise AssertionError(f"job {job} ended ({rec['JobState']}) before {what}:\n{log_of(run_dir)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{log_of(run_dir)}")
            time.sleep(0.3)

    def wait_end(self, job, timeout=500):
        return self.cluster.wait_for(job, timeout=timeout)


def log_of(run_dir: Path, tail: int = 12000) -> str:
    """The job logs and the trainer's log.txt (the last `tail` characters; 0: all)."""
    parts = [p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.out"))]
    if (run_dir / "log.txt").exists():
        parts.append("--- log.txt\n" + (run_dir / "log.txt").read_text(errors="replace")[-4000:])
    return "\n".join(parts)[-tail:]


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-0*/COMPLETE"))


def weights(run_dir: Path):
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoints" / f"step-{complete_steps(run_dir)[-1]:08d}" / "model.safetensors")


def job_pids(job: str, node: str | None = None, trainers: bool = False) -> list[int]:
    """The processes of `job` (on `node`; with `trainers`, the trainer workers only, not the launcher)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and (node is None or env.get("SLURMD_NODENAME") == node) \
                and (not trainers or "LOCAL_RANK" in env):
            found.append(int(entry.name))
    return found


def trainer_pids(job: str, node: str) -> list[int]:
    return job_pids(job, node, trainers=True)


def wait_for_processes_gone(job: str, timeout: float = 120) -> None:
    """A job's state turns CANCELLED at once; its script may still be deciding on a requeue. Once
    none of its processes is left, a requeue would have been asked for (a gate, not a sleep)."""
    deadline = time.monotonic() + timeout
    while job_pids(job) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not job_pids(job), f"job {job}'s processes outlived it"


def restarts(rec) -> int:
    return int(rec.get("Restarts", "0"))


# ----------------------------------------------------------------------------- scenarios
HOSTILE = "step-1+NNODES[$(cd;touch pwned)]"


def preempt_once(s: Scenario) -> dict:
    """(a): world size 4 preempted by USR1 (a hostile folder name in its checkpoints), and its
    uninterrupted twin."""
    common = ["train.max_steps=30", "train.checkpoint_every=5"]
    slow = {"GLOW_TEST_STEP_SECONDS": "0.1"}  # an attempt outlives the test's reaction (sleeps, no CPU)
    hostile = s.root / "runs" / "pre4" / "checkpoints" / HOSTILE
    hostile.mkdir(parents=True)
    (hostile / "COMPLETE").touch()
    job, run_dir = s.submit("pre4", *common, procs=2, env=slow)
    ref, ref_dir = s.submit("ref4", *common, procs=2)
    for attempt in range(1):
        s.wait_until(job, run_dir, lambda: restarts(s.state(job)) == attempt and s.state(job)["JobState"] == "RUNNING",
                     what=f"attempt {attempt} running")
        seen = complete_steps(run_dir)
        s.wait_until(job, run_dir, lambda: complete_steps(run_dir) != seen, what=f"a new checkpoint in attempt {attempt}")
        s.cluster.run(["scancel", "--signal=USR1", "--batch", job])
        s.wait_until(job, run_dir, lambda: restarts(s.state(job)) > attempt, what=f"requeue {attempt + 1}")
    return {"rec": s.wait_end(job), "run_dir": run_dir, "ref": s.wait_end(ref), "ref_dir": ref_dir}


def freeze_or_kill(s: Scenario, how: str) -> dict:
    """(b): stop or kill node n2's trainer processes mid-run; time until the job ends."""
    job, run_dir = s.submit(f"hang-{how}", "train.max_steps=100000", "train.checkpoint_every=10",
                            f"dist.timeout_s={TIMEOUT_S}", env={"GLOW_TEST_STEP_SECONDS": "0.1"})
    s.wait_until(job, run_dir, lambda: complete_steps(run_dir) and trainer_pids(job, "n2"),
                 what="a complete checkpoint")
    result = {"run_dir": run_dir}
    pids = trainer_pids(job, "n2")
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
    try:
        rec = s.wait_end(job, timeout=300)  # bounds a hang; the time is printed, not asserted
    finally:
        for pid in pids:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    result.update(rec=rec, seconds=time.monotonic() - t0, pids=pids)
    return result


def scancel_run(s: Scenario) -> dict:
    """(c): plain scancel mid-run."""
    job, run_dir = s.submit("cancel", "train.max_steps=100000", "train.checkpoint_every=1000", nodes=1,
                            env={"GLOW_TEST_STEP_SECONDS": "0.1"})
    s.wait_until(job, run_dir, lambda: (run_dir / "metrics.jsonl").exists(), what="training")
    s.cluster.run(["scancel", job])
    rec = s.wait_end(job)
    wait_for_processes_gone(job)
    return {"rec": rec, "after": s.state(job), "run_dir": run_dir}


def config_error(s: Scenario) -> dict:
    """(h): an override typo inside a Slurm job of 2 processes."""
    job, run_dir = s.submit("typo", "train.max_stepz=3", nodes=1, procs=1)
    return {"rec": s.wait_end(job), "run_dir": run_dir}


def standin_config(tmp: Path) -> str:
    cfg = tmp / "standin.yaml"
    cfg.write_text("run: {}\n")
    return str(cfg)


def slurm_preemption(s: Scenario, tmp: Path) -> dict:
    """(i): a job of partition low, preempted by a job of partition high on the same node."""
    job, run_dir = s.submit("preempted", "train.steps=60", "train.step_seconds=0.1", "train.ckpt_every=5",
                            nodes=1, config=standin_config(tmp), standin=True, extra=["--partition=low"])
    s.wait_until(job, run_dir, lambda: (run_dir / "running-0").exists() and complete_steps(run_dir),
                 what="the stand-in training in partition low")
    urgent = tmp / "urgent.sh"
    urgent.write_text("#!/bin/bash\nsleep 2\n")
    high = s.cluster.sbatch(urgent, sbatch_args=["--partition=high", "--exclusive", f"--output={tmp}/urgent.out"])
    s.wait_until(job, run_dir, lambda: restarts(s.state(job)) >= 1, what="Slurm's requeue of the preempted job")
    return {"rec": s.wait_end(job), "run_dir": run_dir, "high": s.wait_end(high)}


def requeue_cap(s: Scenario, tmp: Path) -> dict:
    """(j): the cap reached (GLOW_MAX_REQUEUES=0, so at once): a USR1 stop with progress ends the job."""
    job, run_dir = s.submit("capped", "train.steps=100000", "train.step_seconds=0.05", "train.ckpt_every=100000",
                            nodes=1, config=standin_config(tmp), standin=True, env={"GLOW_MAX_REQUEUES": "0"})
    s.wait_until(job, run_dir, lambda: (run_dir / "running-0").exists(), what="the stand-in training")
    s.cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rec = s.wait_end(job)
    wait_for_processes_gone(job)
    return {"rec": rec, "after": s.state(job), "run_dir": run_dir}


def submit_chain(s: Scenario) -> dict:
    """(k): `submit.sh` (train -> eval array -> figures), finished early with `submit.sh --finish`;
    then one evaluation task resubmitted by hand."""
    home = s.root / "home"
    home.mkdir(exist_ok=True)
    env = {"GLOW_REPO": str(REPO), "GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": "1", "GLOW_RUN_ROOT": str(s.root / "runs"),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "HOME": str(home)}

    def submit(*args: str) -> dict[str, str]:
        out = s.cluster.run(["slurm/submit.sh", *args], env=env, cwd=REPO, timeout=600).stdout
        return dict(line.split()[:2] for line in out.splitlines())

    ids = submit("--name", "chain", "--config", CONFIG, "--in", "toy/test", "--ood", "toyood/test",
                 "--train-split", "none", "--data-root", str(s.shards), "data.dataset=toy",
                 "train.max_steps=100000", "train.checkpoint_every=100000", "train.sample_every=100000")
    run_dir = s.root / "runs" / "chain"
    s.wait_until(ids["train"], run_dir, lambda: (run_dir / "metrics.jsonl").exists(), what="training")
    s.cluster.run(["slurm/submit.sh", "--finish", "chain"], env=env, cwd=REPO, timeout=600)
    result = {"ids": ids, "run_dir": run_dir, "figures": s.wait_end(ids["figures"]),
              "train": s.state(ids["train"]), "eval": s.cluster.job_states(ids["eval"])}
    items = (run_dir / "slurm" / "eval-jobs.txt").read_text().splitlines()
    by_hand = s.cluster.sbatch(REPO / "slurm" / "eval.sbatch", *items, env=env, cwd=REPO,
                               sbatch_args=["--array=1", f"--output={s.root}/again-%a.out"])
    result.update(items=items, by_hand=s.wait_end(by_hand), by_hand_log=(s.root / "again-1.out").read_text())
    return result


@pytest.fixture(scope="module")
def scenarios(slurm_cluster, tmp_path_factory) -> dict[str, Future]:

    root = tmp_path_factory.mktemp("failures")
    s = Scenario(slurm_cluster, root, build_toy_shards(root / "shards"))
    pool = ThreadPoolExecutor(max_workers=8)
    futures = {
        "preempt": pool.submit(preempt_once, s),  # slowest first
        "chain": pool.submit(submit_chain, s),
        "stop": pool.submit(freeze_or_kill, s, "stop"),
        "kill": pool.submit(freeze_or_kill, s, "kill"),
        "cancel": pool.submit(scancel_run, s),
        "config_error": pool.submit(config_error, s),
        "preemption": pool.submit(slurm_preemption, s, root),
        "cap": pool.submit(requeue_cap, s, root),
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- tests
def test_a_world_size_4_preempted_equals_uninterrupted(scenarios):
    r = scenarios["preempt"].result()
    log = log_of(r["run_dir"])
    assert r["rec"]["JobState"] == "COMPLETED" and restarts(r["rec"]) == 1, log
    full = log_of(r["run_dir"], tail=0)
    assert full.count("requeueing job") == 1 and full.count("trainer stopped resumably") == 1, log
    assert r["ref"]["JobState"] == "COMPLETED" and restarts(r["ref"]) == 0, log_of(r["ref_dir"])
    meta = json.loads((r["run_dir"] / "checkpoints" / "step-00000030" / "meta.json").read_text())
    assert meta["world_size"] == 4 and len(set(meta["replica_digests"])) == 1, meta
    assert (meta["global_batch_size"], meta["micro_batch_size"], meta["accumulation_steps"]) == (8, 2, 1), meta
    assert "recipe: global batch 8 = 4 process(es) x 1 micro-batch(es) of 2" in (r["run_dir"] / "log.txt").read_text()
    a, b = weights(r["run_dir"]), weights(r["ref_dir"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed weights differ"
    # the hostile folder name ran nothing, in the job's home, the run, the repository or anywhere here
    assert not list(r["run_dir"].parent.parent.rglob("pwned")) and not (REPO / "pwned").exists(), log
    assert "checkpoint_step=0" in full  # the template saw no checkpoint in that folder


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_b_hung_or_dead_node_fails_the_job_fast(scenarios, how):
    from glow.checkpoint import load_model

    r = scenarios[how].result()
    log = log_of(r["run_dir"])
    print(f"node {'hang (SIGSTOP)' if how == 'stop' else 'death (SIGKILL)'} -> job end: {r['seconds']:.1f} s")
    assert r["pids"], "no trainer process found on n2"
    assert r["rec"]["JobState"] == "FAILED" and restarts(r["rec"]) == 0, log
    model, meta = load_model(r["run_dir"])
    assert meta["step"] == complete_steps(r["run_dir"])[-1] > 0


def test_c_scancel_checkpoints_and_is_not_requeued(scenarios):
    r = scenarios["cancel"].result()
    log = log_of(r["run_dir"])
    assert r["rec"]["JobState"] == "CANCELLED" and r["after"]["JobState"] == "CANCELLED", log
    assert restarts(r["after"]) == 0, log
    step, reason = (r["run_dir"] / "STOPPED").read_text().split()
    assert reason == "SIGTERM", log
    assert complete_steps(r["run_dir"])[-1] == int(step) > 0, log  # saved on TERM, not periodic
    assert "requeueing" not in log


def test_h_a_config_error_ends_the_job_with_2_and_no_traceback(scenarios):
    r = scenarios["config_error"].result()
    log = log_of(r["run_dir"])
    assert r["rec"]["JobState"] == "FAILED" and r["rec"]["ExitCode"] == "2:0" and restarts(r["rec"]) == 0, log
    assert "Traceback" not in log and "ChildFailedError" not in log, log
    last = log.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("error: override 'train.max_stepz=3': unknown key train.max_stepz"), log


def test_i_slurm_preemption_requeue_mode_is_slurms_requeue(scenarios):
    r = scenarios["preemption"].result()
    log = log_of(r["run_dir"], tail=0)
    assert r["high"]["JobState"] == "COMPLETED", r["high"]
    assert r["rec"]["JobState"] == "COMPLETED" and restarts(r["rec"]) == 1, log
    assert "got SIGTERM" in log and "requeueing job" not in log, log  # Slurm requeued it, not the script
    rank0 = json.loads((r["run_dir"] / "rank-0.json").read_text())
    assert rank0["restart"] == "1" and 0 < rank0["start"] < 60, rank0  # resumed from a checkpoint


def test_j_the_requeue_cap_ends_the_job(scenarios):
    r = scenarios["cap"].result()
    log = log_of(r["run_dir"], tail=0)
    assert r["rec"]["JobState"] == "FAILED" and r["rec"]["ExitCode"] == "1:0" and restarts(r["after"]) == 0, log
    assert "requeueing job" not in log and "requeued 0 times already (GLOW_MAX_REQUEUES=0)" in log, log
    assert complete_steps(r["run_dir"]), log  # it had made progress: the cap, not "no progress", ended it


def test_k_submit_finish_early_then_resubmit_a_task_by_hand(scenarios):
    r = scenarios["chain"].result()
    run_dir = r["run_dir"]
    log = log_of(run_dir, tail=0)
    assert r["figures"]["JobState"] == "COMPLETED", log
    assert r["train"]["JobState"] == "COMPLETED" and r["train"]["Restarts"] == "0", log
    step, reason = (run_dir / "STOPPED").read_text().split()
    assert reason == "FINISH" and f"finished early at step {step}" in log and "requeueing" not in log, log
    assert not (run_dir / "FINISH").exists()
    assert {t["JobState"] for t in r["eval"]} == {"COMPLETED"}, log
    table = json.loads((run_dir / "figures" / "ood.json").read_text())
    assert table["step"] == int(step), table  # evaluation and figures on the finish checkpoint
    for f in ("distributions.png", "ood.md", "index.html", "samples.png"):
        assert (run_dir / "figures" / f).is_file(), f
    # one task resubmitted by hand as docs/cluster.md shows (its work items as the array's arguments, from
    # the list submit.sh keeps): it finds its result and skips
    assert len(r["items"]) == 3
    assert r["by_hand"]["JobState"] == "COMPLETED" and f"exists; skipping ({r['items'][1]})" in r["by_hand_log"]
