"""The run directory: one object owns every path and every state under ``runs/<name>``.

    runs/<name>/
        config.yaml  log.txt  metrics.jsonl                     written by training (rank 0)
        wandb/ wandb_id | tensorboard/ | mlflow.db mlflow_ids/  the tracker's files (run.logger)
        LOCK  STOP  FINISH  STOPPED  ATTEMPT                    control files (below)
        checkpoints/step-NNNNNNNN/  state/ model.safetensors meta.json COMPLETE
        checkpoints/latest -> step-NNNNNNNN                     the newest complete checkpoint
        samples/step-NNNNNNNN.png                               training sample grids
        eval/step-NNNNNNNN/  bpd.json bpd.d/ fid.json fid.d/ dumps/<dataset>-<split>.npz
                             samples.png samples.json latents.png latents.json log.txt
        figures/  logs/  slurm/

Nothing else builds a path under a run directory: training, evaluation, the reports and the
Slurm templates (through ``python -m glow.run``) ask a :class:`Run`. A checkpoint counts only
when its ``COMPLETE`` marker exists; ``latest`` is resolved by listing the complete step
folders. The ``checkpoints/latest`` link is kept for people and tools (``ls``, ``rsync``, tab
completion) and is never followed by glow-ood itself.

Control files:
    LOCK     flock held by rank 0 for the trainer's life; records host, pid, Slurm job and
             is refreshed (heartbeat) so that a holder on another node counts where flock is
             node-local (`glow.files.hold_lock`)
    STOP     a stop request (`touch` it, or the Slurm template's USR1/TERM trap): checkpoint,
             stop, and (under Slurm) requeue
    FINISH   a finish request (`touch` it, or `slurm/submit.sh --finish NAME`): checkpoint at the
             next step and end for good; evaluation and figures then run on that checkpoint
    STOPPED  "<step> <reason>", written by the trainer when it stopped on request with a
             complete checkpoint (reason SIGUSR1, SIGTERM, STOP-file or FINISH): what the Slurm
             template's requeue decision reads (`glow.attempts.attempt_end`)
    ATTEMPT  "<slurm job id> <restart count>", written at the start of each Slurm attempt: its
             modification time, by the filesystem's clock, is when the attempt began (a STOP
             older than that is stale)

Trust (`glow.trust`): the run directory and its fixed folders must be real folders of the
user (`check_trusted`, done before anything is written), unless a shared layout is allowed.

Imports no torch: the figures job and the Slurm templates use it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from glow.attempts import FINISH_REASON, AttemptEnd, attempt_began, attempt_end, mark_attempt_start
from glow.errors import CheckpointMissing, ResultsMissing, UserError
from glow.files import atomic_write_text, hold_lock, read_json, read_text
from glow.names import STEP_RE, check_name, parse_spec, step_dir_name, step_of
from glow.trust import not_a_link, own_folder, shared_run_allowed

# AttemptEnd and attempt_end live in glow.attempts; named here for `python -m glow.run attempt-end`
__all__ = ["COMPLETE", "FINISH_REASON", "AttemptEnd", "Checkpoint", "Run", "RunInUse", "attempt_end",
           "resolve_checkpoint"]

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MAX_META_BYTES = 1 << 20  # meta.json: a few KB
MAX_CONTROL_BYTES = 4096  # STOPPED, wandb_id
MAX_CONFIG_BYTES = 1 << 20  # config.yaml: a few KB
# the fixed folders check_trusted checks (besides checkpoints/step-N and eval/step-N)
RUN_FOLDERS = ("checkpoints", "eval", "logs", "slurm", "figures", "samples", "wandb", "tensorboard", "mlflow_ids")
EVAL_FOLDERS = ("dumps", "bpd.d", "fid.d")  # of each eval/step-N
EVAL_FILES = ("bpd.json", "fid.json", "samples.png", "samples.json", "latents.png", "latents.json", "log.txt")


class RunInUse(UserError):
    """Another live trainer holds the run directory's lock (exit 2: choose another run.name)."""


@dataclass(frozen=True)
class Checkpoint:
    """One step folder ``checkpoints/step-NNNNNNNN`` of a run."""

    run: Run
    step: int

    @classmethod
    def at(cls, path: str | os.PathLike) -> Checkpoint:
        """The checkpoint whose folder is ``path`` (``<run>/checkpoints/step-NNNNNNNN``), complete or not."""
        path = Path(path)
        step = step_of(path)
        if step is None or path.parent.name != "checkpoints":
            raise CheckpointMissing(f"{path} is not a checkpoint folder (<run>/checkpoints/step-NNNNNNNN)")
        return cls(Run(path.parent.parent), step)

    path = property(lambda self: self.run.checkpoints_dir / step_dir_name(self.step))
    state_dir = property(lambda self: self.path / "state")
    model_path = property(lambda self: self.path / "model.safetensors")
    meta_path = property(lambda self: self.path / "meta.json")
    complete_marker = property(lambda self: self.path / COMPLETE)

    def is_complete(self) -> bool:
        return self.complete_marker.is_file()

    def meta(self) -> dict:
        """meta.json (step, model config and hash, data, seed, ...), read with a cap, never through a link."""
        try:
            meta = read_json(self.meta_path, MAX_META_BYTES)
        except FileNotFoundError:
            raise CheckpointMissing(f"{self.meta_path} is missing: not a glow-ood checkpoint") from None
        except ValueError as err:
            raise CheckpointMissing(f"{err}: the checkpoint is damaged; use an earlier one") from None
        return {**meta, "path": str(self.path)}


class Run:
    """The run directory at ``path`` (it need not exist yet). ``allow_shared``: the user allowed
    a shared layout (--allow-shared-run; GLOW_ALLOW_SHARED_RUN=1 in the environment allows it too)."""

    def __init__(self, path: str | os.PathLike, allow_shared: bool = False):
        self.path = Path(path)
        self.allow_shared = shared_run_allowed(allow_shared)

    @classmethod
    def at(cls, root: str | os.PathLike, name: str, allow_shared: bool = False) -> Run:
        """``<root>/<name>``, the name checked (it is one path component)."""
        return cls(Path(root) / check_name(name, "run.name"), allow_shared)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Run) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- files of the training job --------------------------------------------------------
    config_path = property(lambda self: self.path / "config.yaml")
    log_path = property(lambda self: self.path / "log.txt")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    wandb_id_path = property(lambda self: self.path / "wandb_id")  # wandb itself writes wandb/ here
    tensorboard_dir = property(lambda self: self.path / "tensorboard")
    mlflow_db_path = property(lambda self: self.path / "mlflow.db")
    mlflow_ids_dir = property(lambda self: self.path / "mlflow_ids")
    lock_path = property(lambda self: self.path / "LOCK")
    stop_path = property(lambda self: self.path / "STOP")
    finish_path = property(lambda self: self.path / "FINISH")
    stopped_path = property(lambda self: self.path / "STOPPED")
    attempt_path = property(lambda self: self.path / "ATTEMPT")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    latest_link = property(lambda self: self.path / "checkpoints" / "latest")
    figures_dir = property(lambda self: self.path / "figures")
    logs_dir = property(lambda self: self.path / "logs")
    slurm_dir = property(lambda self: self.path / "slurm")

    def check_trusted(self, allow_shared: bool | None = None) -> None:
        """UntrustedRun (exit 2, one line naming the path and how to allow it) for a run directory,
        or a fixed folder in it (RUN_FOLDERS, checkpoints/step-N and state/, eval/step-N and
        EVAL_FOLDERS), that is a link or another user's, or a fixed file that is a link; unless
        a shared layout is allowed. Training, evaluation and figures call it before writing."""
        if shared_run_allowed(self.allow_shared if allow_shared is None else allow_shared):
            return
        if not own_folder(self.path):
            return
        for name in RUN_FOLDERS:
            own_folder(self.path / name)
        for path in (self.config_path, self.log_path, self.metrics_path, self.wandb_id_path, self.mlflow_db_path,
                     self.lock_path, self.stop_path, self.stopped_path, self.attempt_path):
            not_a_link(path)
        for c in self.step_folders():
            if own_folder(c.path):
                own_folder(c.state_dir)
        for step in self.evaluated_steps():
            if own_folder(self.eval_dir(step)):
                for name in EVAL_FOLDERS:
                    own_folder(self.eval_dir(step) / name)
                for name in EVAL_FILES:
                    not_a_link(self.eval_dir(step) / name)

    def _check_checkpoints_folder(self) -> None:
        """Before a checkpoint is written or pruned: the run and checkpoints/ are still real
        folders of the user (a group member could swap one for a link to another run meanwhile)."""
        if not self.allow_shared:
            own_folder(self.path)
            own_folder(self.checkpoints_dir)

    def samples_path(self, step: int) -> Path:
        """The training sample grid of ``step``."""
        return self.path / "samples" / f"{step_dir_name(step)}.png"

    def config_text(self) -> str | None:
        """config.yaml as written by training (None when there is none)."""
        try:
            return read_text(self.config_path, MAX_CONFIG_BYTES)
        except FileNotFoundError:
            return None

    def config(self) -> dict:
        """config.yaml as a plain dict (empty when there is none), through `glow.config`."""
        from glow.config import parse_saved_config

        text = self.config_text()
        return {} if text is None else parse_saved_config(text, self.config_path)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, step: int) -> Checkpoint:
        return Checkpoint(self, int(step))

    def step_folders(self) -> list[Checkpoint]:
        """Every ``step-NNNNNNNN`` folder under checkpoints/, complete or not, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        steps = sorted(s for p in self.checkpoints_dir.iterdir() if (s := step_of(p)) is not None)
        return [self.checkpoint(s) for s in steps]

    def complete_checkpoints(self) -> list[Checkpoint]:
        """The complete checkpoints, oldest first."""
        return [c for c in self.step_folders() if c.is_complete()]

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def latest_step(self) -> int:
        """The step of the newest complete checkpoint; 0 when there is none."""
        latest = self.latest()
        return latest.step if latest else 0

    def new_step_folder(self, step: int) -> Checkpoint:
        """New empty folders for the checkpoint of ``step`` and its state/ (rank 0; a partial save
        is removed first), not writable by group or others: nothing is planted while ranks save."""
        self._check_checkpoints_folder()
        checkpoint = self.checkpoint(step)
        if checkpoint.path.is_symlink():
            checkpoint.path.unlink()
        elif checkpoint.path.exists():
            shutil.rmtree(checkpoint.path)  # removes the links inside, never their targets
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        for folder in (checkpoint.path, checkpoint.state_dir):
            os.mkdir(folder, 0o755)  # the umask may take more, never add
        return checkpoint

    def prune_checkpoints(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and stale partial saves."""
        self._check_checkpoints_folder()
        complete = self.complete_checkpoints()
        if not complete:
            return
        newest = complete[-1].step
        keep_steps = {c.step for c in complete[-keep:]}
        for c in self.step_folders():
            done = c.is_complete()
            if (done and c.step not in keep_steps) or (not done and c.step < newest):
                # The marker goes first: a crash mid-delete leaves an incomplete folder, never
                # a "complete" one with files missing.
                c.complete_marker.unlink(missing_ok=True)
                shutil.rmtree(c.path, ignore_errors=True)

    def update_latest_link(self) -> None:
        """Point ``checkpoints/latest`` at the newest complete checkpoint (rank 0, after COMPLETE)."""
        latest = self.latest()
        if latest is None:
            return
        tmp = self.checkpoints_dir / f".latest.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(step_dir_name(latest.step), tmp)
        try:
            os.replace(tmp, self.latest_link)
        except OSError as err:  # e.g. someone made a folder named latest
            tmp.unlink(missing_ok=True)
            log.warning("could not update %s (%s); the code resolves latest without it", self.latest_link, err)

    # -- evaluation results ---------------------------------------------------------------
    def eval_dir(self, step: int) -> Path:
        """``eval/step-NNNNNNNN``: every result of the evaluation of one checkpoint."""
        return self.path / "eval" / step_dir_name(step)

    def evaluated_steps(self) -> list[int]:
        base = self.path / "eval"
        if not base.is_dir():
            return []
        return sorted(s for p in base.iterdir() if p.is_dir() and (s := step_of(p)) is not None)

    def eval_step(self, step: int | None = None) -> int:
        """``step`` if it was evaluated, else the newest evaluated step; ResultsMissing otherwise."""
        steps = self.evaluated_steps()
        if step is not None:
            if step not in steps:
                raise ResultsMissing(f"no evaluation for step {step}: {self.eval_dir(step)} does not exist; "
                                     "run eval/evaluate.py first")
            return step
        if not steps:
            raise ResultsMissing(f"no evaluation under {self.path / 'eval'} (expected step-NNNNNNNN folders); "
                                 "run eval/evaluate.py first")
        return steps[-1]

    def dump_path(self, step: int, spec: str) -> Path:
        """Where the dump of ``spec`` (``DATASET/SPLIT``) for the checkpoint of ``step`` lives."""
        dataset, split = parse_spec(spec)
        return self.eval_dir(step) / "dumps" / f"{dataset}-{split}.npz"

    def load_dumps(self, step: int, specs: Sequence[str], optional: Sequence[str] = ()) -> dict:
        """``{spec: Dump}`` of one evaluated step: every spec of ``specs`` (ResultsMissing if absent)
        and those of ``optional`` that exist; all must come from the same model, and each must be
        a file of this user's unless a shared layout is allowed."""
        from glow.evaluation.dumps import check_same_model, load_dump

        wanted = list(dict.fromkeys(specs))
        wanted += [s for s in dict.fromkeys(optional) if s not in wanted and self.dump_path(step, s).is_file()]
        dumps = {s: load_dump(self.dump_path(step, s), own=not self.allow_shared) for s in wanted}
        if dumps:
            check_same_model(list(dumps.values()))
        return dumps

    # -- control files ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[dict]:
        """Check the run is the user's (`check_trusted`), hold ``LOCK`` (one trainer per run; RunInUse
        names the live holder), and check again (a new run's folder was made in between)."""
        from glow.files import LockHeld

        self.check_trusted()
        try:
            with hold_lock(self.lock_path, {"run": str(self.path)}) as holder:
                self.check_trusted()
                yield holder
        except LockHeld as err:
            raise RunInUse(f"{err}: another trainer is writing this run. Wait for it to end, stop it "
                           f"(touch {self.stop_path}), or choose another run.name") from None

    def clear_stale_markers(self) -> None:
        """Drop the previous attempt's STOPPED, and a STOP older than this attempt (rank 0).

        A STOP written after the attempt began (a preemption signal that reached the batch shell
        while the trainer was starting) is kept, and honoured at the first step. Ages are judged
        by the filesystem's clock (`glow.attempts.attempt_began`), never by this node's.
        """
        self.stopped_path.unlink(missing_ok=True)
        began = attempt_began(self)
        with contextlib.suppress(FileNotFoundError):
            if self.stop_path.lstat().st_mtime < began:
                log.info("%s predates this attempt: removed as stale", self.stop_path)
                self.stop_path.unlink()

    def stop_requested(self) -> bool:
        return os.path.lexists(self.stop_path)

    def finish_requested(self) -> bool:
        """FINISH exists: end training at the next step, for good (never stale: only a user writes it)."""
        return os.path.lexists(self.finish_path)

    def mark_stopped(self, step: int, reason: str) -> None:
        """Write STOPPED ("<step> <reason>") and consume STOP and FINISH (rank 0)."""
        atomic_write_text(self.stopped_path, f"{int(step)} {reason}\n")
        self.stop_path.unlink(missing_ok=True)
        self.finish_path.unlink(missing_ok=True)

    def read_stopped(self) -> tuple[int, str] | None:
        """(step, reason) of the last stop on request; None when there is none or it is not ours."""
        try:
            fields = read_text(self.stopped_path, MAX_CONTROL_BYTES).split()
        except FileNotFoundError:
            return None
        if len(fields) != 2 or not fields[0].isdigit() or not fields[1].replace("-", "").isalnum():
            log.warning("%s does not hold '<step> <reason>': ignored", self.stopped_path)
            return None
        return int(fields[0]), fields[1]


def resolve_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """A step folder, a run folder, its ``checkpoints/`` folder or ``<run>/checkpoints/latest``
    -> that complete checkpoint (the newest complete one for a run or ``latest``)."""
    path = Path(spec)
    if path.name == "latest":
        path = path.parent
    if path.name == "checkpoints":
        path = path.parent
    if STEP_RE.match(path.name) and path.parent.name == "checkpoints":
        checkpoint = Checkpoint.at(path)
        if not checkpoint.is_complete():
            raise CheckpointMissing(f"checkpoint {path} is not complete (no {COMPLETE} file) or does not exist")
        return checkpoint
    latest = Run(path).latest()
    if latest is None:
        raise CheckpointMissing(f"no complete checkpoint under {path / 'checkpoints'}")
    return latest


def main(argv: Sequence[str] | None = None) -> int:
    """The run directory's facts for shell scripts, so that no script parses a folder name:

    ``latest-step RUN_DIR``: the newest complete step (0 if none);
    ``attempt-start RUN_DIR``: write ATTEMPT (the start of this Slurm attempt, by the filesystem's clock);
    ``attempt-end RUN_DIR START_STEP RESTARTS MAX_REQUEUES GOT_TERM``: the requeue decision after
    an attempt (`attempt_end`): the action and a message on one line, and the batch script's status;
    ``check-trust RUN_DIR``: exit 0 when the run is the user's (`Run.check_trusted`; honours
    GLOW_ALLOW_SHARED_RUN=1), else one ``error: ...`` line on stderr and exit 2.
    """
    import argparse

    from glow.errors import report_user_error

    parser = argparse.ArgumentParser(prog="python -m glow.run", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("latest-step", "newest complete checkpoint step (0 if none)"),
                       ("attempt-start", "record the start of a Slurm attempt (RUN_DIR/ATTEMPT)"),
                       ("check-trust", "exit 2 unless the run directory and its folders are yours")):
        sub.add_parser(name, help=what).add_argument("run_dir")
    end = sub.add_parser("attempt-end", help="requeue decision after a training attempt that exited 0")
    end.add_argument("run_dir")
    for name in ("start_step", "restarts", "max_requeues"):
        end.add_argument(name, type=int)
    end.add_argument("got_term", type=int, choices=(0, 1))
    args = parser.parse_args(argv)
    run = Run(args.run_dir)
    try:
        if args.command == "check-trust":
            run.check_trusted()
            return 0
        if args.command == "attempt-start":
            mark_attempt_start(run)
            return 0
    except UserError as err:
        return report_user_error(err)
    if args.command == "latest-step":
        sys.stdout.write(f"{run.latest_step()}\n")
        return 0
    decision = attempt_end(run, start_step=args.start_step, restarts=args.restarts,
                           max_requeues=args.max_requeues, got_term=bool(args.got_term))
    sys.stdout.write(f"{decision.action} {decision.message}\n")
    return decision.exit_code


if __name__ == "__main__":
    sys.exit(main())
