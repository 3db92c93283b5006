"""The training entry point, run for real: DDP over gloo, exact resume, preemption, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glow.checkpoint import load_model
from glow.errors import EXIT_CHECKPOINT, EXIT_USAGE
from glow.run import Run
from glow.training.optim import lr_factor
from glow.training.trainer import EXIT_FAILED
from tests.helpers.gloo import spawn_gloo, train_on_gloo
from tests.helpers.repo import REPO, cpu_env, run
from tests.helpers.toy import build_toy_shards, train_command

pytestmark = pytest.mark.slow
TIMING_KEYS = {"images_per_s", "peak_memory_mb"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_toy_shards(tmp_path_factory.mktemp("shards"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Run(run_dir).checkpoint(step).path / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def wait_until(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended early with {proc.returncode}:\n{out[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_lr_schedule():
    assert lr_factor(0, 10, 100, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "constant") == 1.0
    assert lr_factor(50, 10, 100, "constant") == 1.0
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)


def test_two_processes_stay_identical_and_learn(shards, tmp_path):
    result = run(train_command(tmp_path, shards, nproc=2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "tiny" / "log.txt").read_text()
    assert "world size 2" in log  # the CPU launch trap would silently give 1
    assert "parameters identical on 2 ranks after initialization" in log
    for path in (c.path for c in Run(tmp_path / "tiny").complete_checkpoints()):
        meta = json.loads((path / "meta.json").read_text())
        assert meta["world_size"] == 2
        assert len(meta["replica_digests"]) == 2 and len(set(meta["replica_digests"])) == 1
    losses = [m["loss"] for m in metrics(tmp_path / "tiny")]
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses))
    assert losses[-1] < losses[0] - 0.2
    assert (tmp_path / "tiny" / "samples" / "step-00000010.png").is_file()
    # The global batch (tiny.yaml: 8) is split over both processes.
    assert "recipe: global batch 8 = 2 process(es) x 1 micro-batch(es) of 4" in log
    assert metrics(tmp_path / "tiny")[-1]["images_seen"] == 20 * 8


def _actnorm_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from glow.distributed import all_reduce_mean
    from glow.model.flows import ActNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Acc:
        num_processes = world

    layer = ActNorm(3)
    layer.reducer = all_reduce_mean(Acc())
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2, 16, 3, 4, 4, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    layer(data[rank])
    torch.save(layer.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_actnorm_init_uses_statistics_of_all_ranks(tmp_path):
    spawn_gloo(_actnorm_worker, 2, tmp_path)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(a["loc"], b["loc"]) and torch.equal(a["log_scale"], b["log_scale"])
    # Equal to a local init on the union of both ranks' batches.
    from glow.model.flows import ActNorm

    g = torch.Generator().manual_seed(0)
    data = torch.randn(2, 16, 3, 4, 4, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    union = ActNorm(3)
    union(data.reshape(32, 3, 4, 4))
    assert torch.allclose(a["log_scale"], union.log_scale, atol=1e-6)


def _finish_worker(rank: int, world: int, port: int, out: str) -> None:
    import time

    import torch.distributed as dist

    from glow.distributed import finish

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Acc:  # the two Accelerator methods finish() uses, on the real process group
        wait_for_everyone = staticmethod(dist.barrier)
        end_training = staticmethod(dist.destroy_process_group)

    if rank == 0:
        time.sleep(1.0)  # rank 0 still busy (closing the tracker, say)
    entered = time.time()
    finish(Acc())
    Path(f"{out}/rank{rank}.txt").write_text(f"{entered} {time.time()}")


def test_ranks_leave_together(tmp_path):
    """A rank that tore its gloo group down while rank 0 was still busy could abort at exit
    (SIGABRT, seen in about 1 of 5 resumed demo runs): finish() holds every rank until all arrive."""
    spawn_gloo(_finish_worker, 2, tmp_path)
    (enter0, _), (enter1, left1) = (map(float, (tmp_path / f"rank{r}.txt").read_text().split()) for r in range(2))
    assert enter1 < enter0 <= left1


def test_stop_signal_then_resume_is_bitwise_identical_to_straight_run(shards, tmp_path):
    common = ("train.max_steps=30", "data.num_workers=2", "train.checkpoint_every=10")
    straight = run(train_command(tmp_path / "a", shards, *common))
    assert straight.returncode == 0, straight.stderr[-3000:]

    cmd = train_command(tmp_path / "b", shards, *common)
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    run_dir = tmp_path / "b" / "tiny"
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and metrics(run_dir)[-1]["step"] >= 12, 120, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    step_text, reason = (run_dir / "STOPPED").read_text().split()
    stopped_at = int(step_text)
    assert reason == "SIGUSR1"
    assert 12 <= stopped_at < 30
    assert Run(run_dir).complete_checkpoints()[-1].step == stopped_at  # a complete checkpoint at the stop

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped_at}" in (run_dir / "log.txt").read_text()
    assert not (run_dir / "STOPPED").exists()
    assert_bitwise_equal(final_weights(tmp_path / "a" / "tiny", 30), final_weights(run_dir, 30))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "a" / "tiny")) == strip(metrics(run_dir))


def test_kill_9_during_checkpoint_save_keeps_previous_checkpoint(shards, tmp_path):
    cmd = train_command(tmp_path, shards, "train.max_steps=15", "train.checkpoint_every=5")
    env = cpu_env(GLOW_TEST_PAUSE_BEFORE_COMPLETE="4")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    run_dir = tmp_path / "tiny"
    partial = Run(run_dir).checkpoint(10).path
    wait_until(lambda: (partial / "state").is_dir() and (Run(run_dir).checkpoint(5).path / "COMPLETE").exists(), 120, proc)
    time.sleep(1.0)  # inside the save, before COMPLETE
    proc.kill()
    proc.wait()
    assert not (partial / "COMPLETE").exists()
    assert [c.step for c in Run(run_dir).complete_checkpoints()] == [5]
    model, meta = load_model(run_dir / "checkpoints" / "latest")
    assert meta["step"] == 5

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 5" in (run_dir / "log.txt").read_text()
    assert [c.step for c in Run(run_dir).complete_checkpoints()] == [5, 10, 15]


def test_config_errors_are_clear(shards, tmp_path):
    def dry(*overrides):
        return run(train_command(tmp_path, shards, "--dry-run", *overrides))

    assert dry().returncode == 0
    bad_key = dry("train.bogus=1")
    assert bad_key.returncode != 0 and "bogus" in bad_key.stderr
    bad_type = dry("train.max_steps=many")
    assert bad_type.returncode == EXIT_USAGE and "override 'train.max_steps=many'" in bad_type.stderr
    bad_choice = dry("optim.optimizer=sgd")
    assert bad_choice.returncode != 0 and "optim.optimizer" in bad_choice.stderr

    first = run(train_command(tmp_path, shards, "train.max_steps=5"))
    assert first.returncode == 0, first.stderr[-2000:]
    incompatible = run(train_command(tmp_path, shards, "train.max_steps=10", "model.hidden_channels=8"))
    assert incompatible.returncode == EXIT_CHECKPOINT and "Traceback" not in incompatible.stderr
    assert "cannot resume" in incompatible.stderr and "hidden_channels" in incompatible.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.training.trainer import Trainer

    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [
        f"run.root={tmp_path}", f"data.root={shards}", "data.dataset=toy", "train.max_steps=40",
        "train.max_bad_steps=3", "train.checkpoint_every=4", "train.log_every=1",
    ])
    original = Trainer._loss
    bad_steps = {5} | set(range(9, 40))  # one isolated bad step, then a run of them

    def loss(self, x):
        value = original(self, x)
        return value * float("nan") if self.state.step in bad_steps else value

    monkeypatch.setattr(Trainer, "_loss", loss)
    trainer = Trainer(cfg, Accelerator(cpu=True))
    before = {}

    original_step = Trainer.train_step

    def step(self, batches):
        if self.state.step == 5:
            before.update({k: v.clone() for k, v in self.model_unwrapped.state_dict().items()})
        out = original_step(self, batches)
        if self.state.step == 6:
            after = self.model_unwrapped.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # no update on a bad step
        return out

    monkeypatch.setattr(Trainer, "train_step", step)
    assert trainer.fit() == EXIT_FAILED
    rows = metrics(tmp_path / "tiny")
    assert rows[5]["skipped_steps"] == 1 and rows[4]["skipped_steps"] == 0
    assert [c.step for c in Run(tmp_path / "tiny").complete_checkpoints()][-1] == 8
    assert load_model(tmp_path / "tiny")[1]["step"] == 8  # the last good checkpoint is intact


def test_wandb_offline_writes_files_and_contacts_no_network(shards, tmp_path):
    env = cpu_env()
    env.pop("WANDB_MODE")
    trace = tmp_path / "connect.trace"
    cmd = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
           *train_command(tmp_path, shards, "run.logger=wandb", "train.max_steps=4")]
    result = run(cmd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    remote = [
        line for line in trace.read_text().splitlines()
        if "sin_addr" in line or "sin6_addr" in line
        if not any(local in line for local in ('inet_addr("127.', "::1", "inet_pton(AF_INET6, \"::1\""))
    ]
    assert remote == []


@pytest.mark.skipif(os.environ.get("GLOW_SKIP_DEEPSPEED") == "1", reason="GLOW_SKIP_DEEPSPEED=1")
def test_deepspeed_zero2_trains_saves_and_resumes(shards, tmp_path):
    pytest.importorskip("deepspeed")
    launch = ("--use_deepspeed", "--zero_stage", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--gradient_accumulation_steps", "1")
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with cpu=True accelerate silently drops DeepSpeed
    # tiny.yaml's global batch 8 over 2 processes, capped at 2 images: accumulation 2, derived for the
    # engine as for DDP (the launcher's --gradient_accumulation_steps 1 is accelerate's default).
    layout = ("train.micro_batch_size=2", "train.log_every=1")
    first = run(train_command(tmp_path, shards, "train.max_steps=6", *layout, nproc=2, launcher_args=launch), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = (tmp_path / "tiny" / "log.txt").read_text()
    assert "DistributedType.DEEPSPEED" in log and "world size 2" in log
    assert "recipe: global batch 8 = 2 process(es) x 2 micro-batch(es) of 2" in log
    assert "train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, train_batch_size=8" in log
    # The same steps as DDP with the same layout (2 gloo ranks in-process): loss and gradient norm.
    train_on_gloo(2, tmp_path / "ddp-plan", [[f"run.root={tmp_path / 'ddp'}", f"data.root={shards}",
                                              "data.dataset=toy", "train.max_steps=6", *layout]])
    for ds, ddp in zip(metrics(tmp_path / "tiny"), metrics(tmp_path / "ddp" / "tiny"), strict=True):
        assert ds["images_seen"] == ddp["images_seen"]
        assert ds["loss"] == pytest.approx(ddp["loss"], rel=1e-5) and ds["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-4)
    second = run(train_command(tmp_path, shards, "train.max_steps=10", *layout, nproc=2, launcher_args=launch),
                 env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed at step 6" in (tmp_path / "tiny" / "log.txt").read_text()
    assert Run(tmp_path / "tiny").complete_checkpoints()[-1].step == 10


def test_a_launcher_asking_for_bf16_is_refused_when_the_config_says_fp32(shards, tmp_path):
    """accelerate launch --mixed_precision bf16 with train.precision=fp32: refused before training
    (docs/configuration.md: the launcher's precision must agree with the config's), never ignored."""
    launch = ("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no")
    result = run(train_command(tmp_path, shards, "train.precision=fp32", launcher_args=launch))
    assert result.returncode != 0
    assert "error: the launcher asks for mixed precision 'bf16'" in result.stderr and "train.precision=fp32" in result.stderr
    assert not (tmp_path / "tiny" / "checkpoints").exists()


# -- issue 12: one sync per step, one writer per run, workers die with their launcher ------
def _nan_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    """Two trainers on 2 ranks with accumulation 2: one clean, one with a NaN micro-batch on
    rank 1 only (step 3, first micro-batch). Records each micro-batch's digest and each
    step's parameter digest."""
    import hashlib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.training.trainer import Trainer

    class Recording(Trainer):
        def _loss(self, x):
            self.seen.append(hashlib.sha256(x.numpy().tobytes()).hexdigest()[:12])
            value = super()._loss(x)
            poisoned = self.poison and self.acc.process_index == 1 and self.state.step == 3 and len(self.seen) % 2 == 1
            return value * float("nan") if poisoned else value

        def train_step(self, batches):
            result = super().train_step(batches)
            self.params.append(self.check_replicas(f"after step {self.state.step}")[0])
            return result

    record = {}
    for poison in (False, True):
        cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [
            f"run.root={out}/{poison}", f"data.root={shards}", "data.dataset=toy", "train.max_steps=6",
            "train.global_batch_size=32", "train.micro_batch_size=8", "train.log_every=1",
            "train.checkpoint_every=100"])
        trainer = Recording(cfg, Accelerator(cpu=True))
        trainer.seen, trainer.params, trainer.poison = [], [], poison
        assert trainer.fit() == 0
        record[str(poison)] = {"seen": trainer.seen, "params": trainer.params,
                               "skipped": trainer.state.skipped_total}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def test_nan_micro_batch_on_one_rank_skips_the_update_everywhere_and_keeps_the_stream(shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nan_worker, args=(2, port, str(shards), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rec in ranks:
        clean, poisoned = rec["False"], rec["True"]
        assert poisoned["seen"] == clean["seen"] and len(clean["seen"]) == 12  # same micro-batches, in order
        assert clean["skipped"] == 0 and poisoned["skipped"] == 1
        # params[i] is the digest after step i + 1: step 4 (index 3) left the weights alone.
        assert poisoned["params"][3] == poisoned["params"][2] and clean["params"][3] != clean["params"][2]
        assert poisoned["params"][:3] == clean["params"][:3]
    assert ranks[0]["True"]["params"] == ranks[1]["True"]["params"]  # every rank skipped it


def test_second_trainer_on_a_live_run_refuses_naming_the_holder(shards, tmp_path):
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.files import hold_lock
    from glow.training.trainer import RunInUse, Trainer

    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [f"run.root={tmp_path}", f"data.root={shards}",
                                                                "data.dataset=toy", "train.max_steps=2"])
    with hold_lock(tmp_path / "tiny" / "LOCK", {"note": "the live run"}):
        with pytest.raises(RunInUse, match=rf"held by another process .*pid={os.getpid()}"):
            Trainer(cfg, Accelerator(cpu=True)).fit()
    assert not (tmp_path / "tiny" / "checkpoints").exists()
    assert Trainer(cfg, Accelerator(cpu=True)).fit() == 0  # a released lock is taken


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    """Any thread of `pid` not yet dead (a killed process's leader turns zombie before its
    other threads have exited and released its files)."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            states.append((task / "stat").read_text().split(")")[-1].split()[0])
        except OSError:
            pass
    return any(state not in ("Z", "X") for state in states)


def test_sigkill_of_the_launcher_leaves_no_worker(shards, tmp_path):
    """(h) torchrun starts workers in their own sessions; they must still die with it."""
    cmd = train_command(tmp_path, shards, "train.max_steps=100000", "train.checkpoint_every=1000", nproc=2)
    proc = subprocess.Popen(cmd, env=cpu_env(GLOW_TEST_STEP_SECONDS="0.05"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    run_dir = tmp_path / "tiny"
    workers: list[int] = []
    try:
        wait_until(lambda: (run_dir / "metrics.jsonl").exists(), 180, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        while any(map(_alive, workers)) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert not any(map(_alive, workers)), f"workers {workers} outlived their launcher"
        assert elapsed < 5, elapsed
    finally:
        for pid in [p for p in workers if _alive(p)] + ([] if proc.poll() is not None else [proc.pid]):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    from glow.files import LockHeld, hold_lock

    try:
        with hold_lock(run_dir / "LOCK"):  # the dead rank 0's lock is free again
            pass
    except LockHeld as err:
        holders = subprocess.run(["ps", "-eo", "pid,ppid,stat,cmd"], capture_output=True, text=True).stdout
        raise AssertionError(f"{err}; workers were {workers}\n{holders}") from None
