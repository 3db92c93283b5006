"""The run directory's control files: one writer at a time, and stop requests.

    <run>/LOCK     flock held by rank 0 for the trainer's life; records host, pid, Slurm job
    <run>/STOP     a stop request (`touch` it, or the Slurm template's USR1/TERM trap)
    <run>/STOPPED  "<step> <reason>", written by the trainer when it stopped on request with
                   a complete checkpoint: the Slurm template's requeue signal

The lock is an flock, so the kernel drops it when its holder dies and the next launch takes
over a run whose trainer was killed. See docs/cluster.md (failure semantics).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from glow.distributed import gather_objects
from glow.errors import UserError
from glow.files import LockHeld, atomic_write_text, hold_lock

__all__ = ["LOCK", "STOP", "STOPPED", "RunInUse", "clear_stale_markers", "lock_run_dir", "mark_stopped",
           "read_stopped", "stop_requested_by_file"]

LOCK, STOP, STOPPED = "LOCK", "STOP", "STOPPED"
_PROCESS_START = time.time()


class RunInUse(UserError):
    """Another live trainer holds the run directory's lock (exit 2: choose another run.name)."""


def lock_run_dir(stack: contextlib.ExitStack, run_dir: Path, is_main: bool, world_size: int) -> None:
    """Rank 0 takes `<run>/LOCK` until `stack` closes; every rank raises RunInUse if it is held.

    Collective (rank 0 tells the others), so no rank goes on to touch the run directory.
    """
    error = ""
    if is_main:
        try:
            stack.enter_context(hold_lock(run_dir / LOCK, {"run": str(run_dir)}))
        except LockHeld as err:
            error = (f"{err}: another trainer is writing this run. Wait for it to end, stop it "
                     f"(touch {run_dir / STOP}), or choose another run.name")
    error = gather_objects(error, world_size)[0]
    if error:
        raise RunInUse(error)


def clear_stale_markers(run_dir: Path) -> None:
    """Drop the previous attempt's STOPPED, and a STOP older than this attempt (rank 0).

    A STOP written after the attempt began (a preemption signal that reached the batch shell
    while the trainer was starting; the template exports GLOW_ATTEMPT_START) is kept, and
    honoured at the first step.
    """
    (run_dir / STOPPED).unlink(missing_ok=True)
    began = float(os.environ.get("GLOW_ATTEMPT_START", _PROCESS_START))
    with contextlib.suppress(FileNotFoundError):
        if (run_dir / STOP).stat().st_mtime < began:
            (run_dir / STOP).unlink()


def stop_requested_by_file(run_dir: Path) -> bool:
    return (run_dir / STOP).exists()


def mark_stopped(run_dir: Path, step: int, reason: str) -> None:
    """Write STOPPED ("<step> <reason>") and consume STOP (rank 0)."""
    atomic_write_text(run_dir / STOPPED, f"{step} {reason}\n")
    (run_dir / STOP).unlink(missing_ok=True)


def read_stopped(run_dir: Path) -> tuple[int, str] | None:
    """(step, reason) of the last stop on request, or None."""
    try:
        step, reason = (run_dir / STOPPED).read_text().split()
    except FileNotFoundError:
        return None
    return int(step), reason
