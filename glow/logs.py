"""Logging set-up, the same for every entry point.

stdlib logging: the main process at INFO to stdout (and `log.txt` of the run or evaluation
folder), the others at WARNING with a rank prefix.

A log line is one line: control characters in a message (newlines, carriage returns, terminal
escapes), which may come from a file someone else wrote (a manifest's text, a file name), are
written escaped (``\\n``, ``\\x1b``), so no value can add a line of its own to `log.txt` or to
a Slurm log. A traceback keeps its lines; only its exception message is escaped. `log.txt` is
opened through `glow.files.open_append`: never through a symbolic link.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from pathlib import Path

from glow.files import open_append

__all__ = ["FORMAT", "NoFollowFileHandler", "OneLineFormatter", "escape_control", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose message is always one line; a traceback keeps its lines."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info:  # another handler may have cached its own text of the traceback
            record.exc_text = self.formatException(record.exc_info)
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        exc = traceback.TracebackException(*ei)
        seen, todo = set(), [exc]
        while todo:  # the chain: causes, contexts, groups
            item = todo.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(getattr(item, "_str", None), str):
                item._str = escape_control(item._str)
            todo += [e for e in (item.__cause__, item.__context__) if e is not None]
            todo += list(getattr(item, "exceptions", None) or [])
        return "".join(exc.format()).rstrip("\n")


class NoFollowFileHandler(logging.FileHandler):
    """A ``FileHandler`` that appends without following a symbolic link (`glow.files.open_append`):
    a ``log.txt`` planted as a link to someone's file is refused (UnsafeFile), not written through."""

    def _open(self):
        return open(open_append(self.baseFilename), "a", encoding=self.encoding or "utf-8", errors=self.errors)


def setup_logging(run_dir: Path | None = None, is_main: bool = True, rank: int = 0, level: int | None = None) -> None:
    """Configure the root logger (again, replacing our handlers); ``level`` overrides INFO / WARNING."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_glow", False):
            root.removeHandler(handler)
            handler.close()
    level = level if level is not None else (logging.INFO if is_main else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(NoFollowFileHandler(run_dir / "log.txt"))
    prefix = "" if is_main else f"[rank {rank}] "
    for handler in handlers:
        handler.setFormatter(OneLineFormatter(prefix + FORMAT))
        handler._glow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # accelerate reports every file of every save at INFO; keep the run log readable.
    for noisy in ("accelerate", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
