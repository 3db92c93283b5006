"""The one skip-if-done rule of the evaluation results.

Every result of an evaluated checkpoint (a dump, a bpd.json or fid.json entry, samples.png,
latents.png) records the settings it was computed with: the dump in its scalar fields, a table
entry in its JSON, the images in a ``.json`` beside them. A result is reused only when every
setting it depends on is the same (checkpoint step and model hash, seed, data root and shard
build, and what else the kind of result depends on) and, unless a shared layout is allowed, when
you wrote it: its files are yours and it records your uid (``writer_uid``, one of the settings);
anything else recomputes, and the log says why. The tasks skip by this rule, and a scheduler asks it before starting any
process (``eval/evaluate.py --check-done``). Under several processes rank 0 applies it and the
others follow (`glow.distributed.on_main`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from glow.files import read_json

__all__ = ["MAX_RECORD_BYTES", "Result", "mismatched_settings", "read_record", "up_to_date"]

log = logging.getLogger(__name__)
MAX_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes


def mismatched_settings(stored: Mapping, wanted: Mapping) -> dict:
    """The fields of ``wanted`` whose value differs in ``stored``: {field: (stored, wanted)}."""
    return {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}


def up_to_date(stored: Mapping | None, wanted: Mapping, what: str) -> bool:
    """True when a result computed with ``stored`` settings may stand for one wanted with
    ``wanted``; logs why it is recomputed otherwise (None: there is no usable result)."""
    if stored is None:
        return False
    diff = mismatched_settings(stored, wanted)
    if diff:
        log.info("%s was computed with other settings (%s): recomputing", what,
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    return not diff


def read_record(image: Path, record: Path, own: bool = False) -> dict | None:
    """The settings record beside an image result (samples.json beside samples.png); None when
    either is absent, unreadable or (with ``own``) another user's: the result is then recomputed."""
    try:
        if not image.is_file() or (own and image.lstat().st_uid != os.getuid()):
            return None
        stored = read_json(record, MAX_RECORD_BYTES, own=own)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # UnsafeFile (a link, too large, another user's) too
        log.warning("%s is unreadable (%s): recomputing", record, err)
        return None
    return stored if isinstance(stored, dict) else None


@dataclass
class Result:
    """One requested result: what it is (for messages), the settings it must have been computed
    with, and how to read the settings of the stored one (None when there is none)."""

    what: str
    settings: dict
    stored: Callable[[], Mapping | None]

    def done(self) -> bool:
        return up_to_date(self.stored(), self.settings, self.what)
