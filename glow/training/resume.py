"""A training checkpoint: what `save_checkpoint` writes, which one an attempt resumes, what it restores.

`choose_resume` runs on rank 0 alone (the trainer broadcasts its answer: every rank resumes the
same step); `restore` runs on every rank. A checkpoint resumes on the world size it was saved
with bit for bit: each rank continues its own saved RNG stream. On another world size (not under
DeepSpeed, whose optimizer state is partitioned over the saving ranks) the weights, optimizer,
schedule and counters go on and the dequantization noise is reseeded from (seed, rank, step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glow import checkpoint as ckpt
from glow.config import Config, config_hash
from glow.distributed import on_main
from glow.errors import CheckpointMismatch, UserError
from glow.files import atomic_write_text
from glow.run import Checkpoint, Run
from glow.training.shape import saved_layout
from glow.training.state import fault_injection_pause

__all__ = ["ResumePoint", "RunExists", "choose_resume", "restore", "save_checkpoint", "seed_noise"]

log = logging.getLogger(__name__)


class RunExists(UserError, FileExistsError):
    """--no-resume on a run directory that already holds checkpoints."""


@dataclass
class ResumePoint:
    """The checkpoint to resume (rank 0's choice, sent to every rank) and what it was saved with."""

    step: int
    layout: dict  # glow.training.shape.saved_layout of its meta.json
    config_changed: bool  # saved under another (model-compatible) config


def choose_resume(run: Run, cfg: Config, *, resume: bool, deepspeed: bool, world_size: int) -> ResumePoint | None:
    """Rank 0: the newest complete checkpoint of ``run``, checked against ``cfg`` (None: start fresh)."""
    latest = run.latest()
    if latest is None:
        return None
    if not resume:
        raise RunExists(f"{run.checkpoints_dir} already holds checkpoints and --no-resume was given: "
                        "choose another run.name or move that directory away")
    meta = latest.meta()
    ckpt.check_model_hash(meta, cfg.model, "cannot resume")
    saved_world = meta.get("world_size")
    if deepspeed and saved_world != world_size:
        raise CheckpointMismatch(
            f"{latest.path} was saved by {saved_world} processes and DeepSpeed partitions the optimizer state over "
            f"them: resume with {saved_world} processes, or warm-start a new run from its weights (run.init_from)")
    return ResumePoint(latest.step, saved_layout(meta), meta["config_hash"] != config_hash(cfg))


def seed_noise(seed: int, rank: int, step: int) -> None:
    """Seed this rank's dequantization noise from (seed, rank, step)."""
    torch.manual_seed(seed * 1000 + 1 + rank + 1_000_003 * step)


def restore(accelerator, checkpoint: Checkpoint, point: ResumePoint, *, state, scheduler, ema, seed: int,
            deepspeed: bool) -> None:
    """Every rank: the accelerate state (model, optimizer, this rank's RNG), the trainer's counters,
    the learning-rate schedule and the EMA of ``checkpoint``."""
    state_dir = checkpoint.state_dir
    same_world = point.layout.get("world_size", accelerator.num_processes) == accelerator.num_processes
    if deepspeed:  # it unpickles its state: refused if anyone else could have changed it
        on_main(lambda: ckpt.check_deepspeed_state(state_dir), accelerator.num_processes, accelerator.process_index)
    if same_world:  # each rank continues its own noise stream
        ckpt.check_rng_state(state_dir, accelerator.process_index)
    accelerator.load_state(str(state_dir))
    counters, scheduler_state, ema_state = ckpt.load_trainer_state(state_dir, ema is not None)
    state.load_state_dict(counters)
    scheduler.load_state_dict(scheduler_state)
    if ema is not None:
        ema.load_state_dict(ema_state)
    if not same_world:  # the saved streams belong to other ranks
        seed_noise(seed, accelerator.process_index, state.step)


def save_checkpoint(accelerator, run: Run, cfg: Config, *, state, scheduler, ema, export: torch.nn.Module,
                    layout: dict, check_replicas: Callable[[str], list[str]]) -> Checkpoint:
    """Every rank saves its accelerate state for step ``state.step``; rank 0 adds the trainer's state,
    the exported weights (``export``) and meta.json, then COMPLETE (only then does the step count),
    prunes old checkpoints and moves `latest`."""
    acc, step = accelerator, state.step
    checkpoint = run.checkpoint(step)  # room for it, and a fresh folder (a partial save goes)
    on_main(lambda: ckpt.prepare_save(run, step), acc.num_processes, acc.process_index)
    acc.wait_for_everyone()
    acc.save_state(str(checkpoint.state_dir))
    if acc.is_main_process:
        ckpt.save_trainer_state(checkpoint.state_dir, state.state_dict(), scheduler.state_dict(),
                                None if ema is None else ema.state_dict())
    digests = check_replicas(f"at step {step}")
    fault_injection_pause(step)
    if acc.is_main_process:
        meta = ckpt.checkpoint_meta(cfg, step=step, images_seen=state.images_seen, ema=ema is not None,
                                    replica_digests=digests, layout=layout)
        ckpt.write_export(checkpoint, export.state_dict(), meta)
        ckpt.seal_state(checkpoint.state_dir)  # no one else can change it before a resume
        atomic_write_text(checkpoint.complete_marker, f"{step}\n")
        run.prune_checkpoints(cfg.train.keep_checkpoints)
        run.update_latest_link()
        log.info("checkpoint %s", checkpoint.path)
    acc.wait_for_everyone()
    return checkpoint
