"""Logging set-up, the same for every entry point.

stdlib logging: the main process at INFO to stdout (and `log.txt` of the run or evaluation
folder), the others at WARNING with a rank prefix.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["FORMAT", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: Path | None = None, is_main: bool = True, rank: int = 0, level: int | None = None) -> None:
    """Configure the root logger (again, replacing our handlers); ``level`` overrides INFO / WARNING."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_glow", False):
            root.removeHandler(handler)
    level = level if level is not None else (logging.INFO if is_main else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    prefix = "" if is_main else f"[rank {rank}] "
    for handler in handlers:
        handler.setFormatter(logging.Formatter(prefix + FORMAT))
        handler._glow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # accelerate reports every file of every save at INFO; keep the run log readable.
    for noisy in ("accelerate", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
