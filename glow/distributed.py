"""Process-group helpers shared by training and evaluation.

`make_accelerator` picks GPUs or CPU/gloo (and keeps DeepSpeed on CPU working);
`all_reduce_mean` is the ActNorm statistics reducer; `gather_objects` and `barrier` serve
the evaluation jobs, whose ranks see unequal numbers of samples; `StopFlag` records a
stop request (SIGUSR1 / SIGTERM) for the training loop to act on at a step boundary.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from accelerate import Accelerator

__all__ = ["StopFlag", "all_reduce_mean", "barrier", "gather_objects", "make_accelerator"]


def make_accelerator() -> Accelerator:
    """An Accelerator that trains on GPUs, or on CPUs with gloo where there are none.

    On a CPU-only machine plain DDP needs `cpu=True`; DeepSpeed needs `cpu=False` with a
    gloo process group instead (with `cpu=True` accelerate silently drops DeepSpeed).
    """
    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available():
        return Accelerator(mixed_precision="no")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return Accelerator(mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(cpu=True, mixed_precision="no")


def all_reduce_mean(accelerator: Accelerator):
    """ActNorm statistics reducer: the mean over every rank's first batch."""

    def reduce(mean: torch.Tensor, sq_mean: torch.Tensor):
        if accelerator.num_processes == 1:
            return mean, sq_mean
        stats = torch.stack([mean, sq_mean]).contiguous()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        stats /= accelerator.num_processes
        return stats[0], stats[1]

    return reduce


def gather_objects(obj, world_size: int) -> list:
    """All processes' `obj` on every process (unequal sizes are fine); no-op for one."""
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


class StopFlag:
    """Set by SIGUSR1 / SIGTERM; the trainer polls it once per step."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def uninstall(self) -> None:
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
