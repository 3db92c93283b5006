"""Result tables that many jobs add to at once: bpd.json and fid.json of an evaluated step.

Evaluation array tasks on different nodes add entries to the same table. A lock-then-merge
of one JSON file is only as good as the filesystem's ``flock``, which on cluster filesystems
is often node-local (Lustre ``localflock``, BeeGFS, NFS ``nolock``) or missing. So every
entry is its own file, ``<table>.d/<entry>.json``, written atomically by the one task that
computed it; :func:`read_table` merges the entries when read. The table file itself
(``bpd.json``) is rewritten after each entry as a convenience view for people: every
entry is in it once the last writer is done, and readers in the code never depend on it.

An entry records the settings that produced it (step, model hash, seed, data root, manifest
hash); `glow.evaluation.records` reuses a result only when those settings match.
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


def _read_entry(path: Path) -> dict | None:
    try:
        entry = read_json(path, MAX_ENTRY_BYTES)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # UnsafeFile (a link, a FIFO, too large) is an OSError too
        log.warning("%s is unreadable (%s): ignored", path, err)
        return None
    return entry if isinstance(entry, dict) else None


def read_table(table: str | Path) -> dict:
    """Every entry of ``table``: those in its ``.d`` folder, over any in the file itself.

    Files are read without following links and with a size cap; an unreadable one is ignored
    (a result it stood for is recomputed)."""
    table = Path(table)
    merged = _read_entry(table) or {}
    folder = _entries_dir(table)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            entry = _read_entry(path)
            if entry is not None:
                merged[unquote(path.stem)] = entry
    return merged


def add_entries(table: str | Path, entries: Mapping[str, dict]) -> None:
    """Write each entry to its own file, then refresh the merged view ``table``."""
    table = Path(table)
    folder = _entries_dir(table)
    for key, entry in entries.items():
        atomic_write_json(folder / f"{quote(key, safe='')}.json", entry)
    atomic_write_json(table, read_table(table))


def table_entry(table: str | Path, key: str) -> dict | None:
    """The entry ``key`` of ``table`` (None when absent): what `glow.evaluation.records` compares."""
    return read_table(table).get(key)
