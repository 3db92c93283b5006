"""Files every part of glow-ood shares: no-follow capped reads, atomic writes, advisory locks (no torch).

A run directory, a shard root or a shared cache may be writable by a whole group, so every
file there is treated as written by someone else. :func:`open_nofollow` is the one way such
a file is opened: ``O_NOFOLLOW`` (a symlink is refused, never followed), ``O_NONBLOCK`` (a
FIFO never blocks the reader) and ``fstat`` afterwards (a regular file with one link, or it
is refused). :func:`read_bytes`, :func:`read_text` and :func:`read_json` read through it with
a size cap that the caller states as a constant: never what the file declares; with
``own=True`` a file another user wrote is refused too (:class:`ForeignFile`). Files opened for
writing in place (logs, ``metrics.jsonl``, locks) go through :func:`open_append` or
:func:`hold_lock`: ``O_NOFOLLOW``, ``O_EXCL`` when creating, ``fchmod`` only on a file this
process created.

Every single-file output (weights, meta.json, dumps, figures, manifests, result tables) goes
through :func:`atomic_write_bytes`: a temporary file beside the target, fsync, then
``os.replace``, so a reader never sees half a file and a killed writer leaves the old one.
Files are readable as the user's umask allows (``mkstemp`` alone would make them 0600,
unreadable to the rest of a group that shares a run directory) and writable by their owner
only (:data:`OUTPUT_MODE`): a group member cannot change a result, a checkpoint or a log in
place, and replacing one (a rename) makes it theirs, which the readers of results refuse.
Lock files alone are group-writable where the umask allows, so a stale lock can be taken over.

:func:`hold_lock` takes an exclusive ``flock`` on a lock file that records who holds it
(host, pid, Slurm job). It refuses at once when another live process holds the lock, naming
the holder from the file; a lock whose holder died is released by the kernel and taken over.
Where ``flock`` is node-local (Lustre ``localflock``, NFS ``nolock``) the kernel cannot see a
holder on another node, so the holder also refreshes the file's modification time every
:data:`LOCK_HEARTBEAT_S` seconds: a lock recorded by another host whose heartbeat is younger
than :data:`LOCK_STALE_S` (judged by the filesystem's own clock, :func:`filesystem_now`) is
refused as held. A clean release empties the file, so the next attempt on any node starts at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pwd
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from glow.errors import UserError

__all__ = [
    "LOCK_HEARTBEAT_S",
    "LOCK_STALE_S",
    "OUTPUT_MODE",
    "ForeignFile",
    "LockHeld",
    "LockUnsupported",
    "UnsafeFile",
    "atomic_save_figure",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "filesystem_now",
    "hold_lock",
    "new_file_mode",
    "open_append",
    "open_nofollow",
    "read_bytes",
    "read_json",
    "read_text",
    "user_name",
    "writer",
]

_umask_lock = threading.Lock()


class UnsafeFile(UserError, PermissionError):
    """A file that glow-ood refuses to read or write: a symlink, not a regular file, a file with
    several hard links, or larger than the stated cap. The message names the file."""


class ForeignFile(UnsafeFile):
    """A file another user wrote, where only the user's own files are accepted."""


def user_name(uid: int) -> str:
    """The login name of ``uid`` (the number itself when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def writer() -> dict:
    """Who writes a result, as recorded in result entries, image records and dumps:
    ``{"writer_uid": ..., "writer_user": ...}`` of this process."""
    uid = os.getuid()
    return {"writer_uid": uid, "writer_user": user_name(uid)}


def _check_owner(st: os.stat_result, path: Path) -> None:
    if st.st_uid != os.getuid():
        raise ForeignFile(f"{path} was written by user {user_name(st.st_uid)} (uid {st.st_uid}), not by you: refused "
                          "(a shared run is read only with --allow-shared-run or GLOW_ALLOW_SHARED_RUN=1)")


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


def read_bytes(path: str | os.PathLike, cap: int, *, own: bool = False) -> bytes:
    """The content of ``path``, opened without following links; refused when over ``cap`` bytes,
    and with ``own`` when another user owns the file (:class:`ForeignFile`)."""
    path = Path(path)
    fd = open_nofollow(path)
    try:
        st = _check_regular(fd, path, cap)
        if own:
            _check_owner(st, path)
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, cap + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:  # grew while being read
                raise UnsafeFile(f"{path} is more than the {cap} bytes this file may hold: refused")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, cap: int, *, own: bool = False) -> str:
    """:func:`read_bytes` decoded as UTF-8 (undecodable bytes replaced)."""
    return read_bytes(path, cap, own=own).decode("utf-8", errors="replace")


def read_json(path: str | os.PathLike, cap: int, *, own: bool = False) -> Any:
    """:func:`read_bytes` parsed as JSON; ValueError (naming the file) when it is not JSON."""
    try:
        return json.loads(read_bytes(path, cap, own=own))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def open_append(path: str | os.PathLike) -> int:
    """A descriptor that appends to ``path`` (a log, ``metrics.jsonl``): created with ``O_EXCL``
    (:data:`OUTPUT_MODE`) when absent, else opened without following a link and only if it is a
    regular file with one link. Never changes the mode of a file it did not create."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND
    try:
        return open_nofollow(path, flags | os.O_CREAT | os.O_EXCL, OUTPUT_MODE)
    except FileExistsError:
        return open_nofollow(path, flags)


def filesystem_now(directory: str | os.PathLike) -> float:
    """The current time by the clock that stamps files in ``directory`` (a file server's clock on
    NFS), read from a file created there and removed at once. Ages of files written from other
    nodes (STOP, a lock's heartbeat) are judged against it, never against this node's clock."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".clock.", suffix=".tmp")
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(tmp)


OUTPUT_MODE = 0o644  # every file glow-ood writes, less what the umask takes: never group- or other-writable


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
        os.fchmod(fd, new_file_mode(OUTPUT_MODE))
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


LOCK_HEARTBEAT_S = 30.0  # a lock's holder refreshes the file's modification time this often
LOCK_STALE_S = 300.0  # a lock recorded by another host and not refreshed for this long is stale


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``holder`` is what it recorded (may be empty)."""

    def __init__(self, path: Path, holder: dict, detail: str = ""):
        self.path, self.holder = path, holder
        who = ", ".join(f"{k}={v}" for k, v in holder.items()) or "unknown holder"
        super().__init__(f"{path} is held by another process ({who}){detail}")


class LockUnsupported(UserError):
    """The filesystem cannot lock the file (ENOLCK: no lock manager; ENOSYS/EOPNOTSUPP: no flock)."""


def _holder_info() -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        info["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return info


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _open_lock_file(path: Path) -> int:
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        try:
            return open_nofollow(path, os.O_RDWR)
        except UnsafeFile:
            raise
        except PermissionError:  # EACCES: a lock file another user made without group write
            owner = path.lstat().st_uid
            raise UnsafeFile(f"{path} belongs to {user_name(owner)} (uid {owner}) and is not writable by you: "
                             "ask them to remove it, or choose another run") from None
    try:  # never change the mode of a file this process did not make
        os.fchmod(fd, new_file_mode())  # group-writable where the umask allows
    except BaseException:
        os.close(fd)
        raise
    return fd


def _flock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockHeld(path, _read_holder(fd)) from None
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise LockUnsupported(
                f"{path}: this filesystem cannot lock files ({errno.errorcode[exc.errno]}: {exc.strerror}); mount "
                "it with locking (Lustre: -o flock; NFS: with the lock manager, not nolock) or put the run root on "
                "a filesystem that locks") from None
        raise


def _refuse_live_remote_holder(fd: int, path: Path) -> None:
    """flock succeeded, but it may be node-local: a holder recorded by another host whose
    heartbeat is fresh by the filesystem's clock is still alive there, unless it was an earlier
    attempt of this same Slurm job (Slurm ends an attempt before it starts the next)."""
    holder = _read_holder(fd)
    host = holder.get("host")
    if not host or host == socket.gethostname():  # on this host flock is authoritative
        return
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job and \
            holder.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return
    age = filesystem_now(path.parent) - os.fstat(fd).st_mtime
    if age < LOCK_STALE_S:
        raise LockHeld(path, holder, f"; its heartbeat is {max(age, 0):.0f} s old (flock may be node-local here; "
                                     f"the lock is stale {LOCK_STALE_S:.0f} s after its last heartbeat)")


class _Heartbeat(threading.Thread):
    """Refreshes the lock file's modification time every ``every`` seconds until stopped."""

    def __init__(self, fd: int, every: float):
        super().__init__(name="glow-lock-heartbeat", daemon=True)
        self.fd, self.every, self.stopped = fd, every, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            with contextlib.suppress(OSError):  # a hiccup of the filesystem: the next beat retries
                os.utime(self.fd)


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, info: dict | None = None,
              heartbeat_s: float = LOCK_HEARTBEAT_S) -> Iterator[dict]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` for the ``with`` block.

    Raises :class:`LockHeld` when a live process holds it (on this node by flock, on another
    by a fresh heartbeat), :class:`LockUnsupported` when the filesystem cannot lock. The file
    records the holder (host, pid, Slurm job id, plus ``info``), is refreshed every
    ``heartbeat_s`` seconds and emptied on release; it is created group-writable where the
    umask allows, so a colleague's process can take over a stale lock. Yields the recorded holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(path)
    heartbeat = None
    try:
        _flock(fd, path)
        _refuse_live_remote_holder(fd, path)
        holder = {**_holder_info(), **(info or {})}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder, sort_keys=True) + "\n").encode(), 0)
        os.fsync(fd)
        heartbeat = _Heartbeat(fd, heartbeat_s)
        heartbeat.start()
        yield holder
    finally:
        if heartbeat is not None:
            heartbeat.stopped.set()
            heartbeat.join()
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: the next attempt, on any host, takes it at once
        os.close(fd)  # releases the flock
