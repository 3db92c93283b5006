"""Result tables that many jobs add to at once: bpd.json and fid.json of an evaluated step.

Evaluation array tasks on different nodes add entries to the same table. A lock-then-merge
of one JSON file is only as good as the filesystem's ``flock``, which on cluster filesystems
is often node-local (Lustre ``localflock``, BeeGFS, NFS ``nolock``) or missing. So every
entry is its own file, ``<table>.d/<entry>.json``, written atomically by the one task that
computed it; :func:`read_table` merges the entries when read. The table file itself
(``bpd.json``) is rewritten after each entry as a convenience view for people: every
entry is in it once the last writer is done, and readers in the code never depend on it.

An entry records the settings that produced it (step, model hash, seed, data root, manifest
hash); :func:`is_done` reuses a result only when those settings match.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, unquote

from glow.files import atomic_write_json

__all__ = ["add_entries", "is_done", "mismatched_settings", "read_table"]

log = logging.getLogger(__name__)


def _entries_dir(table: Path) -> Path:
    return table.with_name(table.name.removesuffix(".json") + ".d")


def read_table(table: str | Path) -> dict:
    """Every entry of ``table``: those in its ``.d`` folder, over any in the file itself."""
    table = Path(table)
    merged = json.loads(table.read_text()) if table.is_file() else {}
    folder = _entries_dir(table)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            merged[unquote(path.stem)] = json.loads(path.read_text())
    return merged


def add_entries(table: str | Path, entries: Mapping[str, dict]) -> None:
    """Write each entry to its own file, then refresh the merged view ``table``."""
    table = Path(table)
    folder = _entries_dir(table)
    for key, entry in entries.items():
        atomic_write_json(folder / f"{quote(key, safe='')}.json", entry)
    atomic_write_json(table, read_table(table))


def mismatched_settings(entry: Mapping, settings: Mapping) -> dict:
    """The fields of ``settings`` whose value differs in ``entry``: {field: (stored, wanted)}."""
    return {k: (entry.get(k), v) for k, v in settings.items() if entry.get(k) != v}


def is_done(table: str | Path, key: str, settings: Mapping) -> bool:
    """True when ``table`` holds ``key`` computed with exactly ``settings``; logs why not."""
    entry = read_table(table).get(key)
    if entry is None:
        return False
    diff = mismatched_settings(entry, settings)
    if diff:
        log.info("%s in %s was computed with other settings (%s): recomputing", key, table,
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
        return False
    return True
