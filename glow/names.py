"""Names that become paths: run names, data sets and splits, `DATASET/SPLIT` specs, step folders.

Run directories, shard trees and evaluation outputs are built from user-given names, on
filesystems a whole group shares. Every such name is checked here against one conservative
pattern (letters, digits, `.`, `_`, `-`; starting with a letter or digit; no `.`/`..`, no
separators, no whitespace), so a name can never leave the directory it names a child of.
"""

from __future__ import annotations

import re
from pathlib import Path

from glow.errors import BadArgument

__all__ = [
    "NAME_RE",
    "STEP_RE",
    "check_name",
    "newest_step_dir",
    "parse_spec",
    "step_dir_name",
    "step_of",
]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
STEP_RE = re.compile(r"^step-(\d{8})$")


def check_name(value: str, what: str) -> str:
    """``value`` if it is a safe single path component; BadArgument (a ValueError) naming ``what`` otherwise."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise BadArgument(
            f"{what} {value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', whitespace, '.' or '..')"
        )
    return value


def parse_spec(spec: str) -> tuple[str, str]:
    """``"<dataset>/<split>"`` -> (dataset, split), both checked names."""
    dataset, sep, split = str(spec).partition("/")
    if not sep or not dataset or not split or "/" in split:
        raise BadArgument(f"data spec {spec!r} is not of the form <dataset>/<split> (e.g. svhn/test)")
    return check_name(dataset, f"dataset in {spec!r}"), check_name(split, f"split in {spec!r}")


def step_dir_name(step: int) -> str:
    """The folder (or file stem) of a training step: ``step-%08d``."""
    return f"step-{int(step):08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a ``step-NNNNNNNN`` folder, None for any other name."""
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def newest_step_dir(base: str | Path) -> Path | None:
    """The ``step-NNNNNNNN`` sub-folder of ``base`` with the highest step, or None."""
    base = Path(base)
    if not base.is_dir():
        return None
    steps = sorted((s, p) for p in base.iterdir() if p.is_dir() and (s := step_of(p)) is not None)
    return steps[-1][1] if steps else None
