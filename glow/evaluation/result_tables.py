"""Result tables that many jobs add to at once: bpd.json and fid.json of an evaluated step.

Evaluation array tasks on different nodes add entries to the same table. A lock-then-merge
of one JSON file is only as good as the filesystem's ``flock``, which on cluster filesystems
is often node-local (Lustre ``localflock``, BeeGFS, NFS ``nolock``) or missing. So every
entry is its own file, ``<table>.d/<entry>.json``, written atomically by the one task that
computed it; :func:`read_table` merges the entries when read. The table file itself
(``bpd.json``) is rewritten after each entry as a convenience view for people: every
entry is in it once the last writer is done, and readers in the code never depend on it.

An entry records the settings that produced it (step, model hash, seed, data root, manifest
hash) and its writer (uid and user name); `glow.evaluation.records` reuses a result only when
those settings match. With ``own`` (the default of the jobs unless a shared layout is allowed)
an entry file another user wrote is ignored, whatever it says: a forged entry is never taken
for a result. The table file is read only where there is no ``.d`` folder (tables of older
versions, whose entries move into the folder at the next write), so nothing reaches the merged
view that the entry files would not give.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, unquote

from glow.files import atomic_write_json, read_json

__all__ = ["MAX_ENTRY_BYTES", "add_entries", "read_table", "table_entry"]

log = logging.getLogger(__name__)
MAX_ENTRY_BYTES = 1 << 20  # an entry is a few hundred bytes; the merged view a few KB per split


def _entries_dir(table: Path) -> Path:
    return table.with_name(table.name.removesuffix(".json") + ".d")


def _read_entry(path: Path, own: bool) -> dict | None:
    try:
        entry = read_json(path, MAX_ENTRY_BYTES, own=own)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # UnsafeFile (a link, a FIFO, too large, another user's) too
        log.warning("%s is unreadable (%s): ignored", path, err)
        return None
    return entry if isinstance(entry, dict) else None


def read_table(table: str | Path, own: bool = False) -> dict:
    """Every entry of ``table``: one file each in its ``.d`` folder (the file itself only where
    there is no folder). Files are read without following links and with a size cap; an
    unreadable one, or with ``own`` one another user wrote, is ignored (its result is recomputed)."""
    table = Path(table)
    folder = _entries_dir(table)
    if not folder.is_dir():
        return _read_entry(table, own) or {}
    merged = {}
    for path in sorted(folder.glob("*.json")):
        entry = _read_entry(path, own)
        if entry is not None:
            merged[unquote(path.stem)] = entry
    return merged


def add_entries(table: str | Path, entries: Mapping[str, dict], own: bool = False) -> None:
    """Write each entry to its own file, then refresh the merged view ``table``."""
    table = Path(table)
    folder = _entries_dir(table)
    if not folder.is_dir():  # a table of an older version: its entries move into the folder first
        entries = {**read_table(table, own), **entries}
    for key, entry in entries.items():
        atomic_write_json(folder / f"{quote(key, safe='')}.json", entry)
    atomic_write_json(table, read_table(table, own))


def table_entry(table: str | Path, key: str, own: bool = False) -> dict | None:
    """The entry ``key`` of ``table`` (None when absent): what `glow.evaluation.records` compares."""
    return read_table(table, own).get(key)
