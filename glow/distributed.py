"""Process-group helpers shared by training and evaluation.

`make_accelerator` picks GPUs or CPU/gloo (and keeps DeepSpeed on CPU working) with a
bounded collective timeout; `check_launcher_precision` refuses a launcher's mixed precision that
the config does not ask for; `die_with_launcher` ties a worker's life to its launcher's;
`all_reduce_mean` is the ActNorm statistics reducer; `gather_objects` and `barrier` serve
the evaluation jobs, whose ranks see unequal numbers of samples; `StopFlag` records a
stop request (SIGUSR1 / SIGTERM) for the training loop to act on at a step boundary;
`finish` ends a script with every rank leaving together.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator

from glow.errors import UserError

__all__ = ["StopFlag", "all_reduce_mean", "all_reduce_sum", "barrier", "check_launcher_precision", "die_with_launcher",
           "finish", "gather_objects", "launcher_precision", "make_accelerator", "on_main", "replica_digests",
           "settle_ddp_buckets", "state_digest"]

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600
_PR_SET_PDEATHSIG = 1


def make_accelerator(timeout_s: float = DEFAULT_TIMEOUT_S) -> Accelerator:
    """An Accelerator that trains on GPUs, or on CPUs with gloo where there are none.

    Every collective gives up after `timeout_s` seconds (gloo and NCCL both honour the
    process group's timeout; NCCL through TORCH_NCCL_ASYNC_ERROR_HANDLING, set in
    slurm/env.sh), so a hung peer ends the job instead of holding it for the default 30 min.
    On a CPU-only machine plain DDP needs `cpu=True`; DeepSpeed needs `cpu=False` with a
    gloo process group instead (with `cpu=True` accelerate silently drops DeepSpeed).
    """
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        return Accelerator(mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        kwargs = InitProcessGroupKwargs(backend="gloo", timeout=timeout)
        return Accelerator(mixed_precision="no", kwargs_handlers=[kwargs])
    return Accelerator(cpu=True, mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def launcher_precision() -> str:
    """The mixed precision the launcher asked for: `accelerate launch --mixed_precision`, or the
    accelerate config it read (a user's default config included); "no" when nothing asked."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"


def check_launcher_precision(precision: str) -> None:
    """Refuse a launcher's mixed precision that differs from ``precision`` (`train.precision`).

    The Accelerator is always built with ``mixed_precision="no"``: the trainer applies
    `train.precision` itself (bf16 autocast of the coupling networks; log-determinants, priors
    and 1x1 weights stay fp32), which accelerate's autocast of the whole model would break. So a
    launcher saying bf16 to a fp32 config would otherwise be ignored without a word. "no" states
    nothing (it is the launcher's default) and leaves `train.precision` in charge.
    """
    from glow.config import ConfigError

    asked = launcher_precision()
    if asked in ("no", precision):
        return
    fix = "add train.precision=bf16 to train in bf16, or " if asked == "bf16" else ""
    raise ConfigError(f"the launcher asks for mixed precision {asked!r} (accelerate launch --mixed_precision or "
                      f"the accelerate config it read) but train.precision={precision}: {fix}launch with "
                      "--mixed_precision no (glow-ood trains at train.precision: fp32 or bf16)")


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this worker when its launcher dies (Linux; no-op elsewhere).

    torchrun starts each worker in its own session, so killing the launcher (even with its
    process group) leaves the workers training and pruning checkpoints while a new launch
    on the same run races them. Applies only under a launcher (`LOCAL_RANK` set): a plain
    `python train/train.py` keeps the usual behaviour.
    """
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers may outlive their launcher",
                    ctypes.get_errno())
        return
    if launcher == 1 or os.getppid() != launcher:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


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


def all_reduce_sum(array, world_size: int, device: torch.device | str = "cpu"):
    """Elementwise sum of a float64 numpy array over all processes (every rank gets it).

    `device` is where the collective runs: the accelerator's device (NCCL needs CUDA
    tensors; gloo takes CPU ones). Float64 throughout, so sums of many features stay exact
    enough for FID (a covariance from sums of outer products).
    """
    import numpy as np

    if world_size == 1:
        return np.asarray(array, dtype=np.float64)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def state_digest(state_dict: dict) -> str:
    """A 16-hex-digit digest of `state_dict`: names and exact bytes, in its order."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def replica_digests(state_dict: dict, accelerator: Accelerator) -> list[str]:
    """`state_digest` of `state_dict` from every rank."""
    local = state_digest(state_dict)
    codes = torch.tensor([int(local[i : i + 4], 16) for i in range(0, 16, 4)], device=accelerator.device)
    gathered = accelerator.gather(codes).view(-1, 4).tolist()
    return ["".join(f"{v:04x}" for v in row) for row in gathered]


def settle_ddp_buckets(zero_weight_loss, optimizer) -> None:
    """One forward/backward whose gradients are dropped, right after DDP is built.

    DDP regroups its gradient buckets (in gradient-ready order) after the first backward
    following its construction, and a ring all-reduce over 3 or more ranks sums each element
    in an order that depends on its place in the bucket. Without this pass a resumed run's
    first step would sum in the initial order and an uninterrupted run's in the regrouped
    one: an ulp apart, so resume would not be bitwise exact at world size 4 (it is at 2,
    where a sum of two is order-free). `zero_weight_loss()` runs the model on any input; no
    data, RNG or optimizer state is touched.
    """
    zero_weight_loss().mul(0.0).backward()
    optimizer.zero_grad(set_to_none=True)


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


def finish(accelerator: Accelerator) -> None:
    """End a distributed script: every rank leaves together, then the process group goes.

    A rank that tears its gloo process group down and exits while a peer is still busy
    (rank 0 closing the tracker, say) can die in C++ at interpreter exit ("terminate called
    without an active exception", SIGABRT), which the launcher reports as a failed run.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()


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


def on_main(decide: Callable[[], T], world_size: int, rank: int) -> T:
    """Run ``decide()`` on rank 0 alone and give its result to every rank.

    For every decision that precedes a collective or picks what a rank loads (which checkpoint
    is latest, whether a result is up to date, a cache hit): ranks that looked at a shared
    filesystem on their own could see it at different moments and part ways. A UserError raised
    on rank 0 is raised on every rank (same class and message), so no rank is left waiting in a
    collective that the others skipped. ``decide``'s result must be picklable (it crosses the
    process group, never a file).
    """
    result, error = None, None
    if rank == 0:
        try:
            result = decide()
        except UserError as err:
            error = (type(err), str(err))
    if world_size > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise _rebuilt(*error)
    return result


def _rebuilt(cls: type[BaseException], message: str) -> BaseException:
    """An exception of class ``cls`` saying ``message``, without calling its ``__init__`` (whose
    signature may differ). The first ``__new__`` along its bases that accepts it (a class that
    is also an OSError, such as ShardsMissing, needs OSError's)."""
    for base in cls.__mro__:
        try:
            raised = base.__new__(cls)
        except TypeError:
            continue
        raised.args = (message,)
        return raised
    raise TypeError(f"cannot rebuild {cls.__name__}")
