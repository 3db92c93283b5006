"""Errors the user has to fix, and how entry points end on them.

Every error a user can fix (a config key or value, an override, missing or corrupt shards,
a model that does not fit its shards, a checkpoint that does not match, missing FID weights)
is a :class:`UserError`: its message names the file, key or value and says what to do, and
its ``exit_code`` tells scripts and schedulers which kind it was. Entry points catch
:class:`UserError` once (:func:`exit_on_user_error`) and end with that message alone; any
other exception is a bug and keeps its traceback.

Exit codes of every entry point (README "Exit codes"):

    0   done (training: finished, or stopped on request and resumable: `<run>/STOPPED`)
    1   internal error: a bug, reported with its traceback
    2   usage or configuration error (an option, a config key or value, an override), or
        a run directory held by another live trainer (`<run>/LOCK`)
    3   ``eval/evaluate.py --check-done``: results are missing (work to do)
    4   data error: shards missing, incomplete, corrupt, or not fitting the model
    5   checkpoint error: missing, incomplete, or not matching the config; FID weights missing
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

__all__ = [
    "EXIT_CHECKPOINT",
    "EXIT_DATA",
    "EXIT_USAGE",
    "BadArgument",
    "CheckpointError",
    "CheckpointMismatch",
    "CheckpointMissing",
    "DataError",
    "ResultsInvalid",
    "ResultsMissing",
    "UserError",
    "exit_on_user_error",
    "report_user_error",
]

EXIT_USAGE = 2
EXIT_DATA = 4
EXIT_CHECKPOINT = 5

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Something the user has to fix; the message says where (file, key, value) and how."""

    exit_code = EXIT_USAGE


class DataError(UserError):
    """Shards missing, incomplete, corrupt or not fitting the model."""

    exit_code = EXIT_DATA


class CheckpointError(UserError):
    """A checkpoint (or the FID weights) missing, incomplete, or not matching the config."""

    exit_code = EXIT_CHECKPOINT


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint, or no FID weights, where the user pointed."""


class CheckpointMismatch(CheckpointError, ValueError):
    """A checkpoint (or weights file) that does not match the config or cannot be read."""


class BadArgument(UserError, ValueError):
    """A command-line argument or function argument the user has to change."""


class ResultsMissing(DataError, FileNotFoundError):
    """Evaluation results (dumps, eval/step-N) that a later step needs are not there."""


class ResultsInvalid(DataError, ValueError):
    """Evaluation results that cannot be used together or lack fields; rewrite them."""


def report_user_error(err: UserError) -> int:
    """Write ``error: <message>`` to stderr (control characters escaped: always one line) and
    return the error's exit code."""
    from glow.logs import escape_control

    sys.stderr.write(f"error: {escape_control(str(err))}\n")
    sys.stderr.flush()
    return err.exit_code


def exit_on_user_error(func: F) -> F:
    """Run ``func``; on a :class:`UserError`, end with :func:`report_user_error` and its exit
    code, without a traceback (under ``python -m glow.cli.launch`` the message goes to the
    launcher instead, which prints it once, last: :mod:`glow.exit_reports`). Every other
    exception propagates unchanged."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            from glow.exit_reports import write_report

            if write_report(err.exit_code, str(err)):  # glow's launcher prints it and ends with the code
                sys.exit(err.exit_code)
            sys.exit(report_user_error(err))

    return wrapper  # type: ignore[return-value]
