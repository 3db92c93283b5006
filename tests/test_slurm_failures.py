"""Issue 12 acceptance tests: failure semantics at scale on the real two-node Slurm cluster.

(a)+(d) 2 nodes x 2 processes (world size 4), three USR1 preemptions in a row: identical
        replicas, and final weights bitwise equal to an uninterrupted world-size-4 run;
(b)     the trainer processes of one node frozen (SIGSTOP: a hung node keeps its sockets open),
        and in another job killed: the job ends FAILED within dist.timeout_s + slack, is not
        requeued, and the last complete checkpoint loads;
(c)     scancel: CANCELLED, not requeued, the trainer saved a complete checkpoint on TERM;
(e)     an attempt that makes no progress is not requeued (stand-in trainer: the sbatch logic);
(f)     DeepSpeed ZeRO-2 through slurm/train.sbatch on 2 nodes with one USR1 preemption,
        equal to an uninterrupted DeepSpeed run;
(g)     a second launch on a live run refuses (exit 2), naming the holder, and the live run goes on;
(h)     a config error inside the job (1 node x 2 processes): FAILED with exit status 2, no
        traceback, the one-line message last in the log;
(i)     Slurm's own preemption (PreemptMode=REQUEUE, partition low preempted by high): TERM to the
        job, the script does not requeue, Slurm does, and the run resumes from a checkpoint;
(j)     the requeue cap: with GLOW_MAX_REQUEUES=0 a preempted job that made progress ends FAILED.

Every scenario is one Slurm job (or two) driven by its own thread, all started together by
the module fixture, so the module costs about as long as its slowest scenario. Jobs ask for
one CPU per node (the cluster advertises more CPUs than the machine has) and sleep between
steps (GLOW_TEST_STEP_SECONDS) where they must live until the test acts on them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.slurm_cluster import TERMINAL_STATES

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = "train/configs/tiny.yaml"
TIMEOUT_S = 30          # dist.timeout_s of the fail-fast jobs
SLACK_S = 60            # detection, srun teardown and Slurm bookkeeping on a loaded 2-core machine
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
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))


def weights(run_dir: Path):
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoints" / f"step-{complete_steps(run_dir)[-1]:08d}" / "model.safetensors")


def trainer_pids(job: str, node: str) -> list[int]:
    """The trainer worker processes (not the launcher) of `job` on `node`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env:
            found.append(int(entry.name))
    return found


def wait_for_processes_gone(job: str, timeout: float = 60) -> None:
    """A job's state turns CANCELLED at once; its processes may still be saving a checkpoint."""
    deadline = time.monotonic() + timeout
    while trainer_pids(job, "n1") + trainer_pids(job, "n2") and time.monotonic() < deadline:
        time.sleep(0.3)


def restarts(rec) -> int:
    return int(rec.get("Restarts", "0"))


# ----------------------------------------------------------------------------- scenarios
def preempt_three_times(s: Scenario) -> dict:
    """(a)+(d): world size 4 preempted by USR1 three times, and its uninterrupted twin."""
    common = ["train.max_steps=60", "train.checkpoint_every=5"]
    slow = {"GLOW_TEST_PAUSE_BEFORE_COMPLETE": "1"}
    job, run_dir = s.submit("pre4", *common, procs=2, env=slow)
    ref, ref_dir = s.submit("ref4", *common, procs=2, env=slow)
    for attempt in range(3):
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
    if how == "stop":  # (g) piggybacks on this live run: a second launch must refuse
        second, _ = s.submit("hang-stop", "train.max_steps=100000", nodes=1, script=None)
        result["second"] = s.wait_end(second, timeout=300)
        result["alive_after_second"] = s.state(job)["JobState"]
        result["lock"] = json.loads((run_dir / "LOCK").read_text())
        result["job"] = job
    pids = trainer_pids(job, "n2")
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
    try:
        rec = s.wait_end(job, timeout=TIMEOUT_S + 3 * SLACK_S)
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
    job, run_dir = s.submit("cancel", "train.max_steps=100000", "train.checkpoint_every=1000",
                            env={"GLOW_TEST_STEP_SECONDS": "0.1"})
    s.wait_until(job, run_dir, lambda: (run_dir / "metrics.jsonl").exists(), what="training")
    s.cluster.run(["scancel", job])
    rec = s.wait_end(job)
    wait_for_processes_gone(job)
    time.sleep(2)  # a requeued job would show up as PENDING again
    return {"rec": rec, "after": s.state(job), "run_dir": run_dir}


def no_progress(s: Scenario, tmp: Path) -> dict:
    """(e): a preempted attempt that saved nothing new is not requeued."""
    cfg = tmp / "standin.yaml"
    cfg.write_text("run: {}\n")
    job, run_dir = s.submit("stuck", "train.steps=100000", "train.ckpt_every=100000", "train.save_on_stop=0",
                            nodes=1, config=str(cfg), standin=True)
    s.wait_until(job, run_dir, lambda: (run_dir / "RUNNING").exists(), what="the stand-in running")
    s.cluster.run(["scancel", "--signal=USR1", "--batch", job])
    rec = s.wait_end(job)
    time.sleep(2)
    return {"rec": rec, "after": s.state(job), "run_dir": run_dir}


def deepspeed_preempted(s: Scenario) -> dict:
    """(f): DeepSpeed ZeRO-2 on 2 nodes, one USR1 preemption, and its uninterrupted twin."""
    env = {"GLOW_ACCELERATE_CONFIG": "train/accelerate/deepspeed_zero2.yaml",
           "GLOW_TEST_PAUSE_BEFORE_COMPLETE": "1"}
    common = ["train.max_steps=20", "train.checkpoint_every=5"]
    job, run_dir = s.submit("ds", *common, env=env)
    ref, ref_dir = s.submit("ds-ref", *common, env=env)
    s.wait_until(job, run_dir, lambda: bool(complete_steps(run_dir)), timeout=600, what="a DeepSpeed checkpoint")
    s.cluster.run(["scancel", "--signal=USR1", "--batch", job])
    return {"rec": s.wait_end(job, 600), "run_dir": run_dir, "ref": s.wait_end(ref, 600), "ref_dir": ref_dir}


def config_error(s: Scenario) -> dict:
    """(h): an override typo inside a Slurm job of 2 processes."""
    job, run_dir = s.submit("typo", "train.max_stepz=3", nodes=1, procs=2)
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
    time.sleep(2)  # a requeued job would show up as PENDING again
    return {"rec": rec, "after": s.state(job), "run_dir": run_dir}


@pytest.fixture(scope="module")
def scenarios(slurm_cluster, tmp_path_factory) -> dict[str, Future]:
    from tests.helpers.toy import build_toy_shards

    if not (REPO / "train" / "train.py").is_file():
        pytest.skip("train/train.py does not exist yet")
    root = tmp_path_factory.mktemp("failures")
    s = Scenario(slurm_cluster, root, build_toy_shards(root / "shards"))
    pool = ThreadPoolExecutor(max_workers=9)
    futures = {
        "deepspeed": pool.submit(deepspeed_preempted, s),  # slowest first (DeepSpeed start-up)
        "preempt": pool.submit(preempt_three_times, s),
        "stop": pool.submit(freeze_or_kill, s, "stop"),
        "kill": pool.submit(freeze_or_kill, s, "kill"),
        "cancel": pool.submit(scancel_run, s),
        "no_progress": pool.submit(no_progress, s, root),
        "config_error": pool.submit(config_error, s),
        "preemption": pool.submit(slurm_preemption, s, root),
        "cap": pool.submit(requeue_cap, s, root),
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- tests
def test_a_d_world_size_4_three_preemptions_equal_uninterrupted(scenarios):
    r = scenarios["preempt"].result()
    log = log_of(r["run_dir"])
    assert r["rec"]["JobState"] == "COMPLETED" and restarts(r["rec"]) == 3, log
    full = log_of(r["run_dir"], tail=0)
    assert full.count("requeueing job") == 3 and full.count("trainer stopped resumably") == 3, log
    assert r["ref"]["JobState"] == "COMPLETED" and restarts(r["ref"]) == 0, log_of(r["ref_dir"])
    meta = json.loads((r["run_dir"] / "checkpoints" / "step-00000060" / "meta.json").read_text())
    assert meta["world_size"] == 4 and len(set(meta["replica_digests"])) == 1, meta
    a, b = weights(r["run_dir"]), weights(r["ref_dir"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed weights differ"


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_b_hung_or_dead_node_fails_the_job_fast(scenarios, how):
    from glow.checkpoint import load_model

    r = scenarios[how].result()
    log = log_of(r["run_dir"])
    print(f"node {'hang (SIGSTOP)' if how == 'stop' else 'death (SIGKILL)'} -> job end: {r['seconds']:.1f} s")
    assert r["pids"], "no trainer process found on n2"
    assert r["rec"]["JobState"] == "FAILED" and restarts(r["rec"]) == 0, log
    assert r["seconds"] < TIMEOUT_S + SLACK_S, log
    if how == "kill":
        assert r["seconds"] < SLACK_S, log
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


def test_e_attempt_without_progress_is_not_requeued(scenarios):
    r = scenarios["no_progress"].result()
    log = log_of(r["run_dir"])
    assert r["rec"]["JobState"] == "FAILED" and restarts(r["after"]) == 0, log
    assert "no progress in this attempt" in log, log


def test_f_deepspeed_zero2_two_nodes_preempted_resumes_and_finishes(scenarios):
    r = scenarios["deepspeed"].result()
    log = log_of(r["run_dir"])
    assert r["rec"]["JobState"] == "COMPLETED" and restarts(r["rec"]) == 1, log
    assert "DistributedType.DEEPSPEED" in log and "world size 2" in log, log
    assert r["ref"]["JobState"] == "COMPLETED", log_of(r["ref_dir"])
    a, b = weights(r["run_dir"]), weights(r["ref_dir"])
    # ZeRO-2 on CPU (gloo) resumes exactly: bitwise equal to the uninterrupted DeepSpeed run.
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed DeepSpeed weights differ"


def test_g_second_launch_on_a_live_run_refuses(scenarios):
    r = scenarios["stop"].result()
    second = r["second"]
    assert second["JobState"] == "FAILED" and second["ExitCode"] == "2:0" and restarts(second) == 0, second
    text = "\n".join(p.read_text() for p in (r["run_dir"] / "logs").glob(f"train-{second['JobId']}.out"))
    assert "is held by another process" in text and f"slurm_job_id={r['job']}" in text, text
    assert r["alive_after_second"] == "RUNNING"
    assert r["lock"]["slurm_job_id"] == r["job"]


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
