"""Hostile shards for the data-safety tests: tars built member by member, planted in a shard root
with a manifest that matches them (as someone with write access to a shared root could), and the
memory a refusal costs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

from glow.data import shards as S

SMALL = 8 << 20  # what refusing a hostile file may cost in this process (tracemalloc)


def plant(root: Path, index: int, data: bytes, dataset="gaussian", split="test") -> Path:
    """Replace shard ``index`` with ``data`` and make its manifest entry match it."""
    d = root / dataset / split
    man = json.loads((d / S.MANIFEST).read_text())
    entry = man["shards"][index]
    (d / entry["name"]).write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (d / S.MANIFEST).write_text(json.dumps(man))
    return d / entry["name"]


def tar_bytes(members: list[tuple[str, object]], mode: str = "w") -> bytes:
    """A tar of (name, bytes or (size, fileobj)) members; mode "w:gz" compresses it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            size, fileobj = (len(data), io.BytesIO(data)) if isinstance(data, bytes) else data
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, fileobj)
    return buf.getvalue()


class Zeros(io.RawIOBase):
    """A stream of zero bytes that never holds them all in memory."""

    def read(self, n=-1):
        return bytes(n)


def traced_peak(fn):
    """(the exception ``fn`` raised, the peak bytes tracemalloc saw while it ran)."""
    tracemalloc.start()
    try:
        try:
            fn()
        except Exception as exn:  # noqa: BLE001  (returned to the caller, which checks its type)
            return exn, tracemalloc.get_traced_memory()[1]
        raise AssertionError(f"{fn} raised nothing")
    finally:
        tracemalloc.stop()


def one_line(exn: BaseException, *names: object) -> str:
    msg = str(exn)
    lines = msg.splitlines()
    if msg.startswith("verification failed:"):  # verify lists its problems, one a line
        lines = lines[1:]
    assert len(lines) == 1, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg
