"""One Slurm attempt of a training job: when it began, and what the batch script does after it.

``ATTEMPT`` ("<slurm job id> <restart count>", written by ``python -m glow.run attempt-start``
as the attempt begins) dates the attempt by the clock of the run directory's filesystem, the
clock that also dates a ``STOP`` written from any node: a STOP older than the attempt is stale
(`glow.run.Run.clear_stale_markers`). Node clocks are never compared with file times.
`attempt_end` is the requeue decision (``python -m glow.run attempt-end``). Imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glow.files import atomic_write_text, filesystem_now, read_text

if TYPE_CHECKING:
    from glow.run import Run

__all__ = ["FINISH_REASON", "AttemptEnd", "attempt_began", "attempt_end", "mark_attempt_start"]

MAX_ATTEMPT_BYTES = 4096  # "<job id> <restart count>"
FINISH_REASON = "FINISH"  # the STOPPED reason of a finish on request (<run>/FINISH)
_node_time = time.time  # this node's clock (tests stand in a skewed one)
_PROCESS_START = _node_time()


def mark_attempt_start(run: Run) -> None:
    """Write ATTEMPT ("<job id> <restart count>") at the start of a Slurm attempt: its time
    stamp comes from the filesystem's clock, as a STOP's does (`python -m glow.run attempt-start`)."""
    job, restarts = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT", "0")
    atomic_write_text(run.attempt_path, f"{job} {restarts}\n")


def attempt_began(run: Run) -> float:
    """When this attempt began by the run filesystem's clock: ATTEMPT's time stamp if it is this
    Slurm attempt's, else GLOW_ATTEMPT_START (or the process start) moved onto that clock by
    the time elapsed since, as this node measures it."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    with contextlib.suppress(OSError, ValueError):
        if job and read_text(run.attempt_path, MAX_ATTEMPT_BYTES).split() == [job, restarts]:
            return run.attempt_path.lstat().st_mtime
    began = float(os.environ.get("GLOW_ATTEMPT_START", _PROCESS_START))
    return filesystem_now(run.path) - (_node_time() - began)


@dataclass(frozen=True)
class AttemptEnd:
    """What the Slurm template does after a training attempt: ``action`` (finished,
    finished-early, requeue, term, no-progress, cap) and the line it logs. ``exit_code``: the
    batch script's status."""

    action: str
    message: str

    @property
    def exit_code(self) -> int:
        return {"finished": 0, "finished-early": 0, "requeue": 0, "term": 75}.get(self.action, 1)


def attempt_end(run: Run, *, start_step: int, restarts: int, max_requeues: int, got_term: bool) -> AttemptEnd:
    """The requeue decision after an attempt whose trainer exited 0 (docs/cluster.md, failure semantics).

    Requeue only after a stop on request (USR1 or STOP: ``STOPPED`` holds a reason other than
    SIGTERM or FINISH) that made progress (a newer complete checkpoint than ``start_step``) while
    the job was requeued fewer than ``max_requeues`` times. A finish on request (FINISH) ends the
    job as done, so the evaluation and figures jobs chained after it run on its checkpoint. TERM
    (scancel, Slurm's own preemption) never requeues here; no progress or the cap ends the job as
    failed, saying why.
    """
    end_step = run.latest_step()
    stopped = run.read_stopped()
    if stopped is None:
        return AttemptEnd("finished", f"finished at step {end_step}")
    step, reason = stopped
    if reason == FINISH_REASON and not got_term:
        return AttemptEnd("finished-early", f"finished early at step {step} on request ({run.finish_path}): "
                                            "not requeued; evaluation and figures run on this checkpoint")
    if got_term or reason == "SIGTERM":
        return AttemptEnd("term", f"stopped at step {step} by SIGTERM (scancel or Slurm preemption): not requeued "
                                  "by this script; resubmit to continue")
    if end_step <= start_step:
        return AttemptEnd("no-progress", f"no progress in this attempt (still at checkpoint step {end_step}): not "
                                         "requeued; fix the cause (e.g. a time limit shorter than start-up) and resubmit")
    if restarts >= max_requeues:
        return AttemptEnd("cap", f"requeued {restarts} times already (GLOW_MAX_REQUEUES={max_requeues}): not requeued "
                                 f"again; resubmit to continue from step {end_step}")
    return AttemptEnd("requeue", f"the trainer stopped resumably at step {step} ({reason}), progress {start_step} -> "
                                 f"{end_step}: requeue {restarts + 1} of at most {max_requeues}")
