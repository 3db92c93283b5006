"""How a worker tells glow's launcher which user error ended it (no torch).

``accelerate launch`` (torchrun underneath) turns every failed worker into exit status 1 and a
``ChildFailedError`` traceback, so our documented codes (2 usage, 4 data, 5 checkpoint) and the
rule "a traceback means a bug" would be lost in every multi-process run and every Slurm log.
:mod:`glow.cli.launch` runs ``accelerate launch`` in-process with ``GLOW_EXIT_DIR`` pointing at
a private directory (mode 0700, owned by the user, on the node's local temp space). A worker
that ends on a :class:`~glow.errors.UserError` writes ``rank-<RANK>`` there (first line the exit
code, second line the one-line message) and exits with its code; the launcher then ends with the
lowest rank's message as its last line and that code as its status. A worker that fails any
other way writes nothing, so the launcher keeps its traceback (a bug).

The directory is trusted only when it is a real directory owned by this user and closed to
everyone else: a report can never be planted by another user, and a worker never writes one into
a directory someone else could read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXIT_DIR_ENV", "MAX_REPORT_BYTES", "Report", "private_dir", "read_reports", "write_report"]

EXIT_DIR_ENV = "GLOW_EXIT_DIR"
MAX_REPORT_BYTES = 64 << 10  # one exit code and one line of message
_PREFIX = "rank-"


@dataclass(frozen=True)
class Report:
    """The user error one worker (``rank``) ended with."""

    rank: int
    exit_code: int
    message: str


def private_dir(path: str | os.PathLike | None) -> Path | None:
    """``path`` when it is a directory (not a link) owned by this user with no group/other
    permissions, else None."""
    if not path:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return Path(path)


def write_report(exit_code: int, message: str) -> bool:
    """Leave this worker's report for the launcher; False when no launcher asked for one (the
    caller then prints the message itself)."""
    from glow.files import atomic_write_text
    from glow.logs import escape_control

    directory = private_dir(os.environ.get(EXIT_DIR_ENV))
    if directory is None:
        return False
    rank = os.environ.get("RANK", "0")
    rank = rank if rank.isdigit() else "0"
    try:  # one line, control characters escaped, as glow.errors.report_user_error prints it
        atomic_write_text(directory / f"{_PREFIX}{rank}", f"{int(exit_code)}\n{escape_control(message)}\n")
    except OSError:
        return False
    return True


def read_reports(directory: str | os.PathLike) -> list[Report]:
    """Every worker report in ``directory`` (a private directory), lowest rank first."""
    from glow.files import read_text

    directory = private_dir(directory)
    if directory is None:
        return []
    reports = []
    for entry in directory.iterdir():
        rank = entry.name[len(_PREFIX):]
        if not entry.name.startswith(_PREFIX) or not rank.isdigit():
            continue
        try:
            code, _, message = read_text(entry, MAX_REPORT_BYTES).partition("\n")
        except (OSError, ValueError):
            continue
        if code.strip().isdigit():
            reports.append(Report(int(rank), int(code), message.strip()))
    return sorted(reports, key=lambda r: r.rank)
