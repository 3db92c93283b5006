"""Training for real: exact resume, stops, non-finite steps, DDP over gloo, DeepSpeed, crashes.

In this process (fast): STOP and resume, non-finite steps, config errors, the launcher's precision,
a live run's lock. On real gloo ranks (spawned): ActNorm statistics, leaving together, a NaN on one
rank of two. Subprocesses only where the process is the subject: plain `python train/train.py`
(wandb offline under strace), kill -9 during a save, the launcher killed, and the one DeepSpeed
proof (ZeRO-2, 2 processes: layout, the same steps as DDP, the sealed state, a planted pickle, resume).
"""

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
from glow.cli.train import main as train_main
from glow.errors import EXIT_CHECKPOINT, EXIT_USAGE
from glow.run import Run
from glow.training.optim import lr_factor
from glow.training.trainer import EXIT_FAILED, Trainer
from tests.helpers.gloo import spawn_gloo, train_on_gloo
from tests.helpers.repo import REPO, TINY, cpu_env, invoke, run
from tests.helpers.toy import train_command, train_in_process

TIMING_KEYS = {"images_per_s", "peak_memory_mb"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Run(run_dir).checkpoint(step).path / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def wait_until(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate``; ``timeout`` only bounds a hung test (nothing is asserted on time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended early with {proc.returncode}:\n{out[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_lr_schedule():
    assert lr_factor(0, 10, 100, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "constant") == 1.0
    assert lr_factor(50, 10, 100, "constant") == 1.0
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)


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
    import torch.distributed as dist

    from glow.distributed import finish

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Acc:  # the two Accelerator methods finish() uses, on the real process group
        wait_for_everyone = staticmethod(dist.barrier)
        end_training = staticmethod(dist.destroy_process_group)

    entered = Path(out, f"entered-{rank}")
    if rank == 0:  # still busy (closing the tracker, say) until rank 1 is inside finish()
        while not Path(out, "entered-1").exists():
            time.sleep(0.01)
    entered.write_text("")
    finish(Acc())
    Path(out, f"left-{rank}").write_text("")
    if rank == 1:  # rank 1 left: rank 0 must have entered finish() before
        assert Path(out, "entered-0").exists(), "rank 1 left finish() before rank 0 entered it"


def test_ranks_leave_together(tmp_path):
    """A rank that tore its gloo group down while rank 0 was still busy could abort at exit
    (SIGABRT, seen in about 1 of 5 resumed demo runs): finish() holds every rank until all arrive."""
    spawn_gloo(_finish_worker, 2, tmp_path)
    assert all((tmp_path / f"left-{r}").exists() for r in range(2))


def test_stop_file_stops_at_the_next_step_and_resume_is_bitwise_identical(toy_shards, tmp_path, monkeypatch):
    """<run>/STOP (what the Slurm trap writes on USR1) ends the step it is seen in with a complete
    checkpoint and STOPPED ("<step> STOP-file"), exit 0; the resumed run is bitwise the straight one,
    data loader workers and metrics included."""
    common = ("train.max_steps=12", "data.num_workers=2", "train.checkpoint_every=4", "train.log_every=1")
    assert train_in_process(tmp_path / "a", toy_shards, *common) == 0
    original = Trainer.train_step

    def step(self, batches):
        if self.state.step == 5:  # during step 6: the vote of that step sees it
            self.run.stop_path.touch()
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", step)
    assert train_in_process(tmp_path / "b", toy_shards, *common) == 0
    run_dir = tmp_path / "b" / "tiny"
    assert (run_dir / "STOPPED").read_text().split() == ["6", "STOP-file"]
    assert [c.step for c in Run(run_dir).complete_checkpoints()] == [4, 6]  # saved at the stop
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train_in_process(tmp_path / "b", toy_shards, *common) == 0
    assert "resumed at step 6" in (run_dir / "log.txt").read_text()
    assert not (run_dir / "STOPPED").exists() and not (run_dir / "STOP").exists()
    assert_bitwise_equal(final_weights(tmp_path / "a" / "tiny", 12), final_weights(run_dir, 12))
    assert without_timing(metrics(tmp_path / "a" / "tiny")) == without_timing(metrics(run_dir))


def test_kill_9_during_checkpoint_save_keeps_previous_checkpoint(toy_shards, tmp_path):
    """kill -9 of `python train/train.py` (the plain launch path) inside the save of step 10, held
    there by a file gate: step 5 stays the latest; the resumed run completes 10 and 15."""
    cmd = train_command(tmp_path, toy_shards, "train.max_steps=15", "train.checkpoint_every=5")
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "release-5").touch()
    proc = subprocess.Popen(cmd, env=cpu_env(GLOW_TEST_HOLD_BEFORE_COMPLETE=str(gate)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    run_dir = tmp_path / "tiny"
    wait_until(lambda: (gate / "holding-10").exists(), 300, proc)
    proc.kill()
    proc.wait()
    assert (Run(run_dir).checkpoint(10).path / "state").is_dir()  # a partial save
    assert [c.step for c in Run(run_dir).complete_checkpoints()] == [5]
    model, meta = load_model(run_dir / "checkpoints" / "latest")
    assert meta["step"] == 5
    assert train_in_process(tmp_path, toy_shards, "train.max_steps=15", "train.checkpoint_every=5") == 0
    assert "resumed at step 5" in (run_dir / "log.txt").read_text()
    assert [c.step for c in Run(run_dir).complete_checkpoints()] == [5, 10, 15]


def test_a_finished_run_started_again_writes_nothing(toy_shards, tmp_path):
    """What a second `make demo` relies on: the run is at max_steps, so it resumes, finishes at once and
    writes no checkpoint, sample or metrics line (config.yaml, LOCK and log.txt are the attempt's own)."""
    assert train_in_process(tmp_path, toy_shards, "train.max_steps=4", "train.checkpoint_every=2") == 0
    run_dir = tmp_path / "tiny"

    def files():
        made = [*run_dir.glob("checkpoints/**/*"), *run_dir.glob("samples/*")]
        return {str(p): p.stat().st_mtime_ns for p in made if p.is_file()}, (run_dir / "metrics.jsonl").read_text()

    before = files()
    assert train_in_process(tmp_path, toy_shards, "train.max_steps=4", "train.checkpoint_every=2") == 0
    assert files() == before
    assert "resumed at step 4" in (run_dir / "log.txt").read_text()


def _train_cli(tmp_path: Path, shards: Path, *overrides: str):
    return invoke(train_main, "--config", TINY, f"run.root={tmp_path}", f"data.root={shards}", "data.dataset=toy",
                  *overrides)


def test_config_errors_are_clear(toy_shards, tmp_path):
    assert _train_cli(tmp_path, toy_shards, "--dry-run").returncode == 0
    bad_key = _train_cli(tmp_path, toy_shards, "--dry-run", "train.bogus=1")
    assert bad_key.returncode == EXIT_USAGE and "bogus" in bad_key.stderr
    bad_type = _train_cli(tmp_path, toy_shards, "--dry-run", "train.max_steps=many")
    assert bad_type.returncode == EXIT_USAGE and "override 'train.max_steps=many'" in bad_type.stderr
    bad_choice = _train_cli(tmp_path, toy_shards, "--dry-run", "optim.optimizer=sgd")
    assert bad_choice.returncode == EXIT_USAGE and "optim.optimizer" in bad_choice.stderr

    assert train_in_process(tmp_path, toy_shards, "train.max_steps=2") == 0
    incompatible = _train_cli(tmp_path, toy_shards, "train.max_steps=4", "model.hidden_channels=8")
    assert incompatible.returncode == EXIT_CHECKPOINT and "Traceback" not in incompatible.stderr
    assert "cannot resume" in incompatible.stderr and "hidden_channels" in incompatible.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(toy_shards, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.training.trainer import Trainer

    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [
        f"run.root={tmp_path}", f"data.root={toy_shards}", "data.dataset=toy", "train.max_steps=40",
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


def test_wandb_offline_writes_files_and_contacts_no_network(toy_shards, tmp_path):
    env = cpu_env()
    env.pop("WANDB_MODE")
    trace = tmp_path / "connect.trace"
    cmd = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
           *train_command(tmp_path, toy_shards, "run.logger=wandb", "train.max_steps=4")]
    result = run(cmd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    remote = [
        line for line in trace.read_text().splitlines()
        if "sin_addr" in line or "sin6_addr" in line
        if not any(local in line for local in ('inet_addr("127.', "::1", "inet_pton(AF_INET6, \"::1\""))
    ]
    assert remote == []


def test_a_launcher_asking_for_bf16_is_refused_when_the_config_says_fp32(toy_shards, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` hands its workers ACCELERATE_MIXED_PRECISION=bf16; with
    train.precision=fp32 that is refused before training (docs/configuration.md: the launcher's
    precision must agree with the config's), never ignored."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result = _train_cli(tmp_path, toy_shards, "train.precision=fp32")
    assert result.returncode == EXIT_USAGE
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


def test_nan_micro_batch_on_one_rank_skips_the_update_everywhere_and_keeps_the_stream(toy_shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nan_worker, args=(2, port, str(toy_shards), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rec in ranks:
        clean, poisoned = rec["False"], rec["True"]
        assert poisoned["seen"] == clean["seen"] and len(clean["seen"]) == 12  # same micro-batches, in order
        assert clean["skipped"] == 0 and poisoned["skipped"] == 1
        # params[i] is the digest after step i + 1: step 4 (index 3) left the weights alone.
        assert poisoned["params"][3] == poisoned["params"][2] and clean["params"][3] != clean["params"][2]
        assert poisoned["params"][:3] == clean["params"][:3]
    assert ranks[0]["True"]["params"] == ranks[1]["True"]["params"]  # every rank skipped it


def test_second_trainer_on_a_live_run_refuses_naming_the_holder(toy_shards, tmp_path):
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.files import hold_lock
    from glow.training.trainer import RunInUse, Trainer

    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml", [f"run.root={tmp_path}", f"data.root={toy_shards}",
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


def test_sigkill_of_the_launcher_leaves_no_worker(toy_shards, tmp_path):
    """(h) torchrun starts workers in their own sessions; they must still die with it."""
    cmd = train_command(tmp_path, toy_shards, "train.max_steps=100000", "train.checkpoint_every=1000", nproc=2)
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
        deadline = time.monotonic() + 60  # bounds a hang; no time is asserted
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), f"workers {workers} outlived their launcher"
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


# -- the one DeepSpeed proof ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GLOW_SKIP_DEEPSPEED") == "1", reason="GLOW_SKIP_DEEPSPEED=1")
def test_deepspeed_zero2_trains_like_ddp_seals_its_state_and_resumes(toy_shards, tmp_path):
    """ZeRO-2 on 2 CPU processes with the shipped launch file and the module entry
    (`accelerate launch --config_file <deepspeed_zero2> -m glow.cli.train`, from another directory):
    the layout derived as for DDP, the same losses and gradient norms as 2 gloo DDP ranks; under
    umask 002 no file of the saved state is group-writable;
    the run resumes and continues the DDP trajectory. (A state a group member could have changed is
    refused before DeepSpeed reads it: tests/test_trust.py, in this process.)"""
    pytest.importorskip("deepspeed")
    from glow.config import launch_config_path

    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # with cpu=True accelerate silently drops DeepSpeed
    # tiny.yaml's global batch 8 over 2 processes, capped at 2 images: accumulation 2, derived for the
    # engine as for DDP (the launch file's gradient_accumulation_steps is accelerate's default, 1).
    layout = ("train.micro_batch_size=2", "train.log_every=1", "train.checkpoint_every=6")

    def launch(steps: int) -> subprocess.CompletedProcess:
        accelerate = str(Path(os.sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--config_file", str(launch_config_path("deepspeed_zero2")), "--num_processes",
               "2", "-m", "glow.cli.train", "--config", "tiny", f"run.root={tmp_path / 'runs'}",
               f"data.root={toy_shards}", "data.dataset=toy", f"train.max_steps={steps}", *layout]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    old = os.umask(0o002)
    try:
        first = launch(6)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        run_dir = tmp_path / "runs" / "tiny"
        log = (run_dir / "log.txt").read_text()
        assert "DistributedType.DEEPSPEED" in log and "world size 2" in log
        assert "recipe: global batch 8 = 2 process(es) x 2 micro-batch(es) of 2" in log
        assert "train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, train_batch_size=8" in log
        checkpoint = Run(run_dir).latest()
        assert checkpoint.step == 6 and list(checkpoint.state_dir.glob("pytorch_model/*.pt"))
        for path in [checkpoint.state_dir, *checkpoint.state_dir.rglob("*")]:
            assert path.lstat().st_mode & 0o022 == 0, path
        resumed = launch(10)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        os.umask(old)
    assert "resumed at step 6" in (run_dir / "log.txt").read_text()
    assert Run(run_dir).complete_checkpoints()[-1].step == 10
    # The same 10 steps as DDP with the same layout (2 gloo ranks, in-process trainers): loss and norm.
    train_on_gloo(2, tmp_path / "ddp-plan", [[f"run.root={tmp_path / 'ddp'}", f"data.root={toy_shards}",
                                              "data.dataset=toy", "train.max_steps=10", *layout]])
    for ds, ddp in zip(metrics(run_dir), metrics(tmp_path / "ddp" / "tiny"), strict=True):
        assert ds["step"] == ddp["step"] and ds["images_seen"] == ddp["images_seen"]
        assert ds["loss"] == pytest.approx(ddp["loss"], rel=1e-5) and ds["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-4)
