"""How a recipe's global batch is laid out over the processes of one job.

A config states `train.global_batch_size`: images per optimizer step, over every process and
every accumulated micro-batch. The layout follows from the world size: each process takes
`global / world_size` images per step, in one micro-batch, or in `accumulation` micro-batches
of at most `train.micro_batch_size` images when that memory cap is set. So the same config
takes the same optimizer steps (batch, learning rate, schedule) on any allocation whose process
count divides the global batch; any other process count is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from glow.config import ConfigError

__all__ = ["LAYOUT_KEYS", "BatchShape", "batch_shape", "layout_changes", "saved_layout", "working_process_counts"]

LAYOUT_KEYS = ("world_size", "micro_batch_size", "accumulation_steps", "global_batch_size")  # as meta.json has them


@dataclass(frozen=True)
class BatchShape:
    """One optimizer step: `accumulation` micro-batches of `micro_batch` images on each of `world_size` processes."""

    world_size: int
    micro_batch: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.accumulation

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x {self.accumulation} "
                f"micro-batch(es) of {self.micro_batch}")

    def as_meta(self) -> dict:
        """The layout as meta.json records it (`LAYOUT_KEYS`)."""
        return dict(zip(LAYOUT_KEYS, (self.world_size, self.micro_batch, self.accumulation, self.global_batch)))


def working_process_counts(global_batch: int) -> list[int]:
    """The process counts that split ``global_batch`` exactly (its divisors)."""
    return [n for n in range(1, global_batch + 1) if global_batch % n == 0]


def batch_shape(global_batch: int, world_size: int, micro_batch_cap: int = 0) -> BatchShape:
    """The layout of ``global_batch`` images per step over ``world_size`` processes.

    ``micro_batch_cap`` (`train.micro_batch_size`, 0: none) bounds the images one process puts
    through the model at once: accumulation is the smallest count of equal micro-batches that
    fits under it. Raises ConfigError (exit 2) when ``world_size`` does not divide the global
    batch, naming the process counts that do.
    """
    if global_batch < 1 or world_size < 1 or micro_batch_cap < 0:
        raise ValueError(f"batch_shape({global_batch}, {world_size}, {micro_batch_cap})")
    if global_batch % world_size:
        *most, last = map(str, working_process_counts(global_batch))
        counts = f"{', '.join(most)} or {last}" if most else last
        below, above = global_batch // world_size * world_size, (global_batch // world_size + 1) * world_size
        nearby = f"{below} or {above}" if below else str(above)
        raise ConfigError(
            f"train.global_batch_size={global_batch} cannot be split evenly over {world_size} processes: "
            f"launch {counts} process{'es' if most else ''}, or set a global batch divisible by {world_size} (e.g. {nearby})")
    per_process = global_batch // world_size
    if micro_batch_cap == 0 or per_process <= micro_batch_cap:
        return BatchShape(world_size, per_process, 1)
    accumulation = -(-per_process // micro_batch_cap)
    while per_process % accumulation:
        accumulation += 1
    return BatchShape(world_size, per_process // accumulation, accumulation)


def saved_layout(meta: Mapping) -> dict:
    """The layout a checkpoint's meta.json records (checkpoints of earlier versions: the world size alone)."""
    return {key: int(meta[key]) for key in LAYOUT_KEYS if key in meta}


def layout_changes(saved: Mapping, now: BatchShape) -> list[str]:
    """What resuming a checkpoint saved with layout ``saved`` under ``now`` changes, as log lines
    (none when nothing does)."""
    notes = []
    if saved.get("global_batch_size", now.global_batch) != now.global_batch:
        notes.append(f"train.global_batch_size changed from {saved['global_batch_size']} to {now.global_batch}: "
                     "the recipe changed (the learning-rate schedule goes on per step)")
    current = now.as_meta()
    moved = {key: (saved[key], current[key]) for key in LAYOUT_KEYS[:3] if saved.get(key, current[key]) != current[key]}
    if moved:
        what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in moved.items())
        notes.append(f"resuming on another layout ({what}): the global batch and the schedule go on, but the data "
                     "order and the dequantization noise change, so the run does not repeat an uninterrupted one "
                     "bit for bit")
    return notes
