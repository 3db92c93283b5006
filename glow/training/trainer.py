"""The training loop: distributed-correct, exactly resumable, preemptible, fail-fast.

`Trainer(cfg, accelerator).fit()` returns a process exit code:
    0            finished (`train.max_steps` reached), finished early on request
                 (`<run>/FINISH`), or stopped on request (SIGUSR1, SIGTERM or `<run>/STOP`);
                 each with a complete checkpoint saved and `<run>/STOPPED` written
                 ("<step> <reason>", reason FINISH for a finish). A stop is not a
                 failure, so a launcher never mistakes it for one (torchrun would turn a
                 non-zero code into a traceback and SIGTERM the other local ranks); the
                 Slurm template reads STOPPED and the reason to decide on a requeue.
    EXIT_FAILED  too many consecutive non-finite steps; the last complete checkpoint is
                 untouched
A second trainer on a live run raises `RunInUse` at start: rank 0 holds `<run>/LOCK` for
the run's life. A hung or dead peer makes a collective fail after `dist.timeout_s`.

Host syncs: none per micro-batch. Once per optimizer step, after backward, one small
all-reduce carries the loss and the stop flag, and one host read takes it together with
the all-reduced gradient norm (the same on every rank): a non-finite norm skips the update
on every rank while the data stream advances as usual.

The model is a Glow on images or a flow on feature vectors (``model.kind: tabular``); what differs
(the shards, the model input, discrete or continuous bits/dim, sample grids) is
`glow.training.batches`'s, so the loop below is the same for both.

The recipe: `train.global_batch_size` images per optimizer step on any world size that divides
it (`glow.training.shape` derives the micro-batch and accumulation), logged at start and stored
in every meta.json with the precision.

Exactness: the data stream is a function of (seed, epoch, rank, world size, workers, micro-batch)
and the number of micro-batches consumed; the dequantization noise comes from the torch RNG,
which accelerate saves per rank. Resuming from step N on the same layout therefore continues bit
for bit where a straight run would be. Resuming on another world size keeps the recipe (global
batch, schedule, optimizer state) but not the data order: the noise is reseeded from (seed, rank,
step) and the log says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from glow import checkpoint as ckpt
from glow.config import Config, to_dict, to_yaml
from glow.distributed import (
    StopFlag,
    all_reduce_mean,
    on_main,
    replica_digests,
    settle_ddp_buckets,
)
from glow.files import atomic_write_text
from glow.logs import setup_logging
from glow.model import build_model
from glow.model.flows import set_actnorm_reducer
from glow.model.performance import apply_train_config
from glow.model.sampling import save_sample_grid
from glow.progress import Progress
from glow.run import FINISH_REASON, Checkpoint, Run, RunInUse, resolve_checkpoint
from glow.tracking import MetricsLog, Tracker
from glow.training.batches import training_data
from glow.training.deepspeed import configure_deepspeed
from glow.training.optim import make_ema, make_optimizer, make_scheduler
from glow.training.resume import (
    ResumePoint,
    RunExists,
    choose_resume,
    restore,
    save_checkpoint,
    seed_noise,
)
from glow.training.startup import check_launch, log_startup
from glow.training.state import TrainState, fault_injection_step_delay, peak_memory_mb

__all__ = ["EXIT_FAILED", "RunExists", "RunInUse", "Trainer"]

log = logging.getLogger(__name__)
EXIT_FAILED = 1


class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator, resume: bool = True, allow_shared: bool = False):
        self.cfg = cfg
        self.acc = accelerator
        self.resume = resume
        self.run = Run.at(cfg.run.root, cfg.run.name, allow_shared)  # glow.trust: shared layouts only when allowed
        self.state = TrainState()
        self.stop = StopFlag()
        self.tracker: Tracker | None = None
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.shape = check_launch(cfg, accelerator, self.deepspeed)  # before anything is written
        self.data = training_data(cfg)  # images or feature vectors, by model.kind (glow.training.batches)
        self.resumed: ResumePoint | None = None

    # -- set-up ------------------------------------------------------------------------
    def _prepare_run_dir(self) -> Checkpoint | None:
        """Clear stale stop markers, pick the checkpoint to resume and check it (rank 0 decides)."""
        acc, run = self.acc, self.run

        def decide() -> ResumePoint | None:
            run.clear_stale_markers()
            point = choose_resume(run, self.cfg, resume=self.resume, deepspeed=self.deepspeed,
                                  world_size=acc.num_processes)
            atomic_write_text(run.config_path, to_yaml(self.cfg))
            return point

        self.resumed = on_main(decide, acc.num_processes, acc.process_index)
        setup_logging(run.path, acc.is_main_process, acc.process_index)
        return None if self.resumed is None else run.checkpoint(self.resumed.step)

    def _build(self, resume_from: Checkpoint | None) -> None:
        c, acc = self.cfg, self.acc
        torch.manual_seed(c.train.seed)  # identical initial weights on every rank
        model = build_model(c.model).to(acc.device)
        if c.run.init_from and resume_from is None:  # one checkpoint for every rank, chosen by rank 0
            source = on_main(lambda: str(resolve_checkpoint(c.run.init_from).path), acc.num_processes,
                             acc.process_index)
            log.info("warm start from %s", ckpt.warm_start(model, source).path)
        self.model_unwrapped = model
        if resume_from is None:
            self._init_actnorm(model)
        self.ema = make_ema(model, c.optim.ema_decay)
        apply_train_config(model, c.train)  # compile / channels_last / checkpointing (after EMA's copy)
        optimizer = make_optimizer(model, c.optim)
        self.scheduler = make_scheduler(optimizer, c.optim, c.train.max_steps)
        if self.deepspeed:
            configure_deepspeed(acc.state.deepspeed_plugin.deepspeed_config, self.shape, c.optim.grad_clip)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.model_unwrapped = acc.unwrap_model(self.model)
        self._settle_ddp_buckets()
        if resume_from is None:  # different dequantization noise per rank
            seed_noise(c.train.seed, acc.process_index, 0)
            return
        restore(acc, resume_from, self.resumed, state=self.state, scheduler=self.scheduler, ema=self.ema,
                seed=c.train.seed, deepspeed=self.deepspeed)
        log.info("resumed at step %d (%d images seen)", self.state.step, self.state.images_seen)

    def _settle_ddp_buckets(self) -> None:
        """Bitwise-exact resume at any world size (see `glow.distributed.settle_ddp_buckets`)."""
        if self.deepspeed or self.acc.num_processes == 1:
            return
        y = self.data.example(self.shape.micro_batch, self.acc.device)  # the training shape: compiled once
        settle_ddp_buckets(lambda: self._log_p_y(y).sum(), self.optimizer)

    def _init_actnorm(self, model: torch.nn.Module) -> None:
        """One data-dependent init pass whose statistics are averaged over all ranks."""
        c = self.cfg
        batch = next(iter(self._loader(epoch=0, skip=0)))
        generator = torch.Generator().manual_seed(c.train.seed * 1000 + 7 + self.acc.process_index)
        y = self.data.init_input(batch.to(self.acc.device),
                                 lambda shape: torch.rand(shape, generator=generator).to(self.acc.device))
        set_actnorm_reducer(model, all_reduce_mean(self.acc))
        with torch.no_grad():
            model.log_prob(y)
        set_actnorm_reducer(model, None)

    # -- data --------------------------------------------------------------------------
    def _loader(self, epoch: int, skip: int):
        return self.data.loader(batch_size=self.shape.micro_batch, epoch=epoch, skip=skip,
                                rank=self.acc.process_index, world_size=self.acc.num_processes)

    def _batches(self) -> Iterator[torch.Tensor]:
        """Endless stream of this rank's batches, starting where the resumed step left off."""
        consumed = self.state.step * self.shape.accumulation
        per_epoch = self.cfg.data.batches_per_epoch
        epoch, skip = divmod(consumed, per_epoch)
        while True:
            yield from self._loader(epoch, skip)
            epoch, skip = epoch + 1, 0

    # -- one step ----------------------------------------------------------------------
    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        y = self.data.train_input(x.to(self.acc.device, non_blocking=True))
        return self.data.bits_per_dim(self._log_p_y(y)).mean()

    def _log_p_y(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"):
            return self.model(y).float()

    def _stop_votes(self) -> list[float]:
        """This rank's votes (stop, finish): a signal or STOP asks to stop (and be requeued);
        FINISH, seen by rank 0, asks to end for good."""
        main = self.acc.is_main_process
        return [float(self.stop.requested or (main and self.run.stop_requested())),
                float(main and self.run.finish_requested())]

    def _grad_norm(self) -> torch.Tensor | None:
        """Clip (DDP) and return the global gradient norm: all-reduced, so equal on every rank.

        Under DeepSpeed the engine clipped and stepped inside backward (skipping the update
        itself when the norm is not finite); its norm is read back.
        """
        if self.deepspeed:
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            return None if norm is None else torch.as_tensor(float(norm))
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return self.acc.clip_grad_norm_(self.model.parameters(), max_norm)

    def _agree(self, losses: list[torch.Tensor], norm: torch.Tensor | None) -> tuple[float, str, float | None]:
        """One small all-reduce (mean loss, stop and finish votes) and one host read per optimizer
        step -> (mean loss, "finish" | "stop" | "", grad norm)."""
        device = losses[0].device
        votes = torch.tensor(self._stop_votes(), device=device)
        packed = self.acc.reduce(torch.cat([torch.stack(losses).float().mean().reshape(1), votes]), reduction="sum")
        known = norm is not None
        norm = norm.detach().float().reshape(1).to(device) if known else torch.zeros(1, device=device)
        loss, stops, finishes, norm_value = torch.cat([packed.float(), norm]).tolist()
        stop = "finish" if finishes > 0 else "stop" if stops > 0 else ""
        return loss / self.acc.num_processes, stop, (norm_value if known else None)

    def train_step(self, batches: Iterator[torch.Tensor]) -> tuple[float, float | None, str]:
        """One optimizer step over `shape.accumulation` micro-batches -> (loss, grad norm, stop), stop
        being "finish", "stop" or "" (every rank gets the same).

        No host sync per micro-batch: every micro-batch goes through backward, and a
        non-finite one (on any rank) makes the all-reduced gradient norm non-finite on every
        rank, which skips the update everywhere; the micro-batches are consumed either way,
        so the data stream position stays exact.
        """
        accum, losses = self.shape.accumulation, []
        for i in range(accum):
            loss = self._loss(next(batches))
            losses.append(loss.detach())
            self._backward(loss, last=i == accum - 1)
        loss, stop, grad_norm = self._agree(losses, self._grad_norm())
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            self.optimizer.step()  # a no-op under DeepSpeed (the engine stepped in backward)
            if self.ema is not None:
                self.ema.update_parameters(self.model_unwrapped)
            self.state.bad_in_a_row = 0
        else:
            self.state.bad_in_a_row += 1
            self.state.skipped_total += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        self.state.step, self.state.bad_in_a_row)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.images_seen += self.shape.global_batch
        return (loss if finite else float("nan")), grad_norm, stop

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's gradient; the last one of the step synchronises them.

        DDP: the mean over micro-batches, gradients all-reduced only with the last. DeepSpeed:
        the engine divides by its `gradient_accumulation_steps` (set from the same shape) and
        steps at the boundary, which accelerate marks with `sync_gradients`.
        """
        if self.deepspeed:
            self.acc.sync_gradients = last
            self.acc.backward(loss)
        elif last:
            self.acc.backward(loss / self.shape.accumulation)
        else:
            with self.acc.no_sync(self.model):
                self.acc.backward(loss / self.shape.accumulation)

    # -- outputs -----------------------------------------------------------------------
    def _export_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model_unwrapped

    def check_replicas(self, when: str) -> list[str]:
        """Digest of every parameter and buffer on each rank; raise if any rank differs.

        Catches silent divergence (a rank-dependent init, a missed all-reduce) at once.
        """
        digests = replica_digests(self.model_unwrapped.state_dict(), self.acc)
        if len(set(digests)) != 1:
            raise RuntimeError(f"model replicas differ across ranks {when}: {digests}")
        log.info("parameters identical on %d ranks %s (digest %s)", len(digests), when, digests[0])
        return digests

    def save_checkpoint(self) -> Checkpoint:
        return save_checkpoint(self.acc, self.run, self.cfg, state=self.state, scheduler=self.scheduler, ema=self.ema,
                               export=self._export_model(), layout=self.shape.as_meta(),
                               check_replicas=self.check_replicas)

    def save_samples(self) -> None:
        if not self.acc.is_main_process or not self.data.samples:
            return
        t = self.cfg.train
        path = self.run.samples_path(self.state.step)
        model = self._export_model()
        was_training = model.training
        model.eval()
        save_sample_grid(model, path, t.sample_temperatures, t.samples_per_temperature, seed=t.seed)
        model.train(was_training)
        if self.tracker is not None:
            self.tracker.log_image("samples", path, self.state.step)

    def _mark_stopped(self, finish: bool) -> None:
        reason = FINISH_REASON if finish else self.stop.signal_name or "STOP-file"
        if finish:
            log.info("finish requested (%s): finished early at step %d with a complete checkpoint; exit 0, "
                     "%s written (evaluation uses this checkpoint)", self.run.finish_path, self.state.step,
                     self.run.stopped_path)
        else:
            log.info("stop requested (%s): stopped at step %d with a complete checkpoint; exit 0, "
                     "%s written (resumable)", reason, self.state.step, self.run.stopped_path)
        if self.acc.is_main_process:
            self.run.mark_stopped(self.state.step, reason)

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> int:
        # Before the lock (a refused start leaves no run directory behind); rank 0 reads the shards'
        # manifest, so every rank takes the same decision.
        on_main(self.data.check, self.acc.num_processes, self.acc.process_index)
        with contextlib.ExitStack() as stack:
            on_main(lambda: stack.enter_context(self.run.lock()) and None, self.acc.num_processes,
                    self.acc.process_index)
            stack.enter_context(ckpt.disk_full_named(self.run, self.acc.is_main_process))  # one line, in log.txt
            return self._fit()

    def _fit(self) -> int:
        c, acc = self.cfg, self.acc
        resume_from = self._prepare_run_dir()
        self._build(resume_from)
        log_startup(c, acc, self.shape, self.data, run_path=self.run.path, resumed=self.resumed,
                    resumed_from=resume_from and resume_from.path,
                    n_parameters=sum(p.numel() for p in self.model_unwrapped.parameters()))
        self.check_replicas("after initialization" if resume_from is None else "after resuming")
        self.stop.install()
        metrics = MetricsLog(self.run.metrics_path)
        if acc.is_main_process:
            metrics.truncate_after(self.state.step)
            self.tracker = Tracker(c.run.logger, self.run.path, c.run.wandb_project, c.run.name, to_dict(c))
        try:
            return self._loop(metrics)
        finally:
            self.stop.uninstall()
            if self.tracker is not None:
                self.tracker.close()

    def _loop(self, metrics: MetricsLog) -> int:
        c, acc, state = self.cfg, self.acc, self.state
        self.model.train()
        batches = self._batches()
        bar = Progress(c.train.max_steps, state.step, desc="train", enabled=acc.is_main_process and c.train.progress,
                       images_per_unit=self.shape.global_batch, every_s=c.train.progress_every_s)
        timed_steps = 0
        tick = time.perf_counter()
        while state.step < c.train.max_steps:
            loss, grad_norm, stop = self.train_step(batches)
            fault_injection_step_delay()
            state.window.append(loss)
            timed_steps += 1
            bar.update(1, **({"bits/dim": f"{loss:.3f}"} if math.isfinite(loss) else {}))
            if state.bad_in_a_row >= c.train.max_bad_steps:
                log.error("%d consecutive non-finite steps: stopping; the last complete checkpoint (%s) is intact",
                          state.bad_in_a_row, self.run.latest())
                return EXIT_FAILED
            if state.step % c.train.log_every == 0 or state.step == c.train.max_steps:
                elapsed = time.perf_counter() - tick
                record = {
                    "step": state.step,
                    "images_seen": state.images_seen,
                    "loss": sum(state.window) / len(state.window),
                    "bpd": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "images_per_s": timed_steps * self.shape.global_batch / max(elapsed, 1e-9),
                    "peak_memory_mb": peak_memory_mb(acc.device),
                    "skipped_steps": state.skipped_total,
                }
                if acc.is_main_process:
                    metrics.write(record)
                    if self.tracker is not None:
                        self.tracker.log(record, state.step)
                state.window, timed_steps, tick = [], 0, time.perf_counter()
            if state.step % c.train.sample_every == 0:
                self.save_samples()
            if state.step % c.train.checkpoint_every == 0 or state.step == c.train.max_steps or stop:
                self.save_checkpoint()
            if stop and state.step < c.train.max_steps:
                bar.close()
                self._mark_stopped(finish=stop == "finish")
                return 0
        bar.close()
        if acc.is_main_process:  # came too late to matter
            self.run.stop_path.unlink(missing_ok=True)
            self.run.finish_path.unlink(missing_ok=True)
        log.info("finished: %d steps, %d images", state.step, state.images_seen)
        return 0
