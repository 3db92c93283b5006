"""`accelerate launch` whose exit status tells the truth: the one launcher of every multi-process run.

    python -m glow.cli.launch [accelerate launch options] SCRIPT [script arguments]

Takes exactly the arguments of `accelerate launch` and runs it in this process, e.g.

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m glow.cli.launch \\
        --config_file train/accelerate/cpu_2proc.yaml train/train.py --config train/configs/demo.yaml

`accelerate launch` alone turns every failed worker into status 1 and a launcher traceback
(`ChildFailedError`), so a typo in an override looked like a crash. Here:

- a worker that ends on a user error (glow.errors.UserError: 2 usage or configuration, 4 data,
  5 checkpoint) reports it through a private temporary directory (glow.exit_reports); the
  launcher ends with that status and the lowest rank's one-line `error: ...` message as its
  last line, without a launcher traceback;
- a worker that exits 2, 4 or 5 without a report (e.g. click's own usage errors, whose message
  is already printed) keeps that status, with one closing line saying so;
- anything else (a bug, a dead rank, a signal) is left to accelerate: the worker's traceback
  and the launcher's, status 1.

The Makefile, slurm/train.sbatch and slurm/eval.sbatch launch through it. Under Slurm the batch
script passes its own private directory in GLOW_EXIT_DIR; the launcher leaves its closing line
there (`error`) and the script repeats it as the job log's last line (srun prints its own
lines after a failed task).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from glow.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_USAGE
from glow.exit_reports import EXIT_DIR_ENV, private_dir, read_reports

__all__ = ["ERROR_FILE", "USER_EXIT_CODES", "main"]

USER_EXIT_CODES = (EXIT_USAGE, EXIT_DATA, EXIT_CHECKPOINT)
ERROR_FILE = "error"  # the closing line, left in a directory the batch script passed


def _first_exit_code(err: BaseException) -> int | None:
    """The exit status of the first worker that failed, as the launcher saw it."""
    if isinstance(err, subprocess.CalledProcessError):  # one process: accelerate's simple launcher
        return err.returncode
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else None
    first = getattr(err, "get_first_failure", None)  # torchrun's ChildFailedError
    if first is None:
        return None
    try:
        return int(first()[1].exitcode)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def _end(line: str, code: int, given: Path | None) -> int:
    """Print the closing line; leave it in the batch script's directory too (``given``) as
    ``error``, for the script to repeat as the job log's last line."""
    from glow.files import atomic_write_text

    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if given is not None:
        with contextlib.suppress(OSError):
            atomic_write_text(given / ERROR_FILE, line + "\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "python -m glow.cli.launch"
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        # The batch script's private directory when it passes one (it reads the report back),
        # else our own; either way mode 0700 on this node's local temp space.
        given = private_dir(os.environ.get(EXIT_DIR_ENV))
        directory = given or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="glow-exit-")))
        os.environ[EXIT_DIR_ENV] = str(directory)
        try:
            launch_command(args)
        except (Exception, SystemExit) as err:  # re-raised unless a worker explained it
            reports = read_reports(directory)
            if reports:
                return _end(f"error: {reports[0].message}", reports[0].exit_code, given)
            code = _first_exit_code(err)
            if code in USER_EXIT_CODES:
                return _end(f"error: {args.training_script} exited with status {code} (a usage, data or "
                            "checkpoint error: its message is above)", code, given)
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
