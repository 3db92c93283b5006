"""Files every part of glow-ood shares: no-follow capped reads, atomic writes, advisory locks (no torch).

A run directory, a shard root or a shared cache may be writable by a whole group, so every
file there is treated as written by someone else. :func:`open_nofollow` is the one way such
a file is opened: ``O_NOFOLLOW`` (a symlink is refused, never followed), ``O_NONBLOCK`` (a
FIFO never blocks the reader) and ``fstat`` afterwards (a regular file with one link, or it
is refused). :func:`read_bytes`, :func:`read_text` and :func:`read_json` read through it with
a size cap that the caller states as a constant: never what the file declares.

Every single-file output (weights, meta.json, dumps, figures, manifests, result tables) goes
through :func:`atomic_write_bytes`: a temporary file beside the target, fsync, then
``os.replace``, so a reader never sees half a file and a killed writer leaves the old one.
Files get the mode the user's umask gives a new file (``mkstemp`` alone would make them
0600, unreadable to the rest of a group that shares a run directory).

:func:`hold_lock` takes an exclusive ``flock`` on a lock file that records who holds it
(host, pid, Slurm job). It refuses at once when another live process holds the lock, naming
the holder from the file; a lock whose holder died is released by the kernel and taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from glow.errors import UserError

__all__ = [
    "LockHeld",
    "UnsafeFile",
    "open_nofollow",
    "read_bytes",
    "read_json",
    "read_text",
    "atomic_save_figure",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "hold_lock",
    "new_file_mode",
]

_umask_lock = threading.Lock()


class UnsafeFile(UserError, PermissionError):
    """A file that glow-ood refuses to read or write: a symlink, not a regular file, a file with
    several hard links, or larger than the stated cap. The message names the file."""


def _check_regular(fd: int, path: Path, cap: int | None = None) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{path} is not a regular file (mode {stat.filemode(st.st_mode)}): refused")
    if st.st_nlink != 1:
        raise UnsafeFile(f"{path} has {st.st_nlink} hard links: refused (a shared directory could link it to "
                         "another user's file)")
    if cap is not None and st.st_size > cap:
        raise UnsafeFile(f"{path} is {st.st_size} bytes, more than the {cap} this file may hold: refused")
    return st


def open_nofollow(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """``os.open`` that never follows a symlink at ``path`` and only returns a regular file with
    one link (a FIFO or device is refused without blocking). Raises :class:`UnsafeFile`, or
    FileNotFoundError when there is nothing at ``path``."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} is a symbolic link: refused (glow-ood never follows links in run "
                             "directories, shard roots or caches); replace it with the file itself") from None
        if err.errno in (errno.ENXIO, errno.EWOULDBLOCK):  # a FIFO without a writer, a socket
            raise UnsafeFile(f"{path} is not a regular file: refused") from None
        raise
    try:
        _check_regular(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike, cap: int) -> bytes:
    """The content of ``path``, opened without following links; refused when over ``cap`` bytes."""
    path = Path(path)
    fd = open_nofollow(path)
    try:
        _check_regular(fd, path, cap)
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:  # grew while being read
                raise UnsafeFile(f"{path} is more than the {cap} bytes this file may hold: refused")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, cap: int) -> str:
    """:func:`read_bytes` decoded as UTF-8 (undecodable bytes replaced)."""
    return read_bytes(path, cap).decode("utf-8", errors="replace")


def read_json(path: str | os.PathLike, cap: int) -> Any:
    """:func:`read_bytes` parsed as JSON; ValueError (naming the file) when it is not JSON."""
    try:
        return json.loads(read_bytes(path, cap))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def new_file_mode(base: int = 0o666) -> int:
    """The mode a newly created file gets under the process umask (e.g. 0644 or 0664)."""
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return base & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """JSON with sorted keys and a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 110, **savefig_kwargs) -> Path:
    """A matplotlib figure as PNG at ``path`` (atomically); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``holder`` is what it recorded (may be empty)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        who = ", ".join(f"{k}={v}" for k, v in holder.items()) or "unknown holder"
        super().__init__(f"{path} is held by another process ({who})")


def _holder_info() -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return info


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode(errors="replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, info: dict | None = None) -> Iterator[dict]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` for the ``with`` block.

    Raises :class:`LockHeld` when a live process holds it. The file records the holder
    (host, pid, Slurm job id, plus ``info``) and is created group-writable where the umask
    allows, so a colleague's process can take over a stale lock. Yields the recorded holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
    except FileExistsError:
        fd, created = open_nofollow(path, os.O_RDWR), False
    try:
        if created:  # never change the mode of a file this process did not make
            os.fchmod(fd, new_file_mode())  # group-writable where the umask allows
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(path, _read_holder(fd)) from None
            if exc.errno == errno.ENOSYS:  # e.g. Lustre mounted without flock
                raise OSError(exc.errno, f"{path}: this filesystem does not support flock; mount it "
                              "with flock (Lustre: -o flock) or put the directory elsewhere") from None
            raise
        holder = {**_holder_info(), **(info or {})}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder, sort_keys=True) + "\n").encode(), 0)
        os.fsync(fd)
        yield holder
    finally:
        os.close(fd)  # releases the flock
