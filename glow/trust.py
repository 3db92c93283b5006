"""What glow-ood trusts in a directory a whole group can write (no torch).

A run directory is a trust boundary. Training, evaluation and figures work only in a run
directory, and in fixed folders under it, that are real folders (not symbolic links) owned by
the user who runs them (`glow.run.Run.check_trusted`); a result another user wrote is not
taken as done, nor read into figures. A deliberately shared layout (a colleague's run you
evaluate, a run folder someone else made for you) is allowed explicitly: ``--allow-shared-run``
on the commands, or ``GLOW_ALLOW_SHARED_RUN=1`` in the environment (the Slurm templates pass
it on). State that is unpickled on load (DeepSpeed's) is accepted only when nothing in it is a
link, another user's, or writable by group or others: :func:`check_private_tree`, and
:func:`make_private_tree` after each save.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from glow.errors import UserError
from glow.files import user_name

__all__ = [
    "ALLOW_SHARED_ENV",
    "ALLOW_SHARED_HINT",
    "UntrustedRun",
    "check_private_tree",
    "make_private_tree",
    "not_a_link",
    "own_folder",
    "shared_run_allowed",
]

ALLOW_SHARED_ENV = "GLOW_ALLOW_SHARED_RUN"
ALLOW_SHARED_HINT = f"if this layout is deliberate, pass --allow-shared-run or set {ALLOW_SHARED_ENV}=1"


class UntrustedRun(UserError):
    """A run directory, or a fixed folder in it, that is a link or another user's (exit 2)."""


def shared_run_allowed(flag: bool = False) -> bool:
    """True when the user allowed a shared layout: ``flag`` (--allow-shared-run) or the environment."""
    return bool(flag) or os.environ.get(ALLOW_SHARED_ENV, "") == "1"


def _whose(st: os.stat_result) -> str:
    return f"user {user_name(st.st_uid)} (uid {st.st_uid}), not to you (uid {os.getuid()})"


def own_folder(path: Path) -> bool:
    """Check that ``path``, when it exists, is a real folder owned by this user; False when absent.
    UntrustedRun (one line naming the path and how to allow it) otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        why = f"is a symbolic link (to {os.readlink(path)!r})"
    elif not stat.S_ISDIR(st.st_mode):
        why = f"is not a folder (mode {stat.filemode(st.st_mode)})"
    elif st.st_uid != os.getuid():
        why = f"belongs to {_whose(st)}"
    else:
        return True
    raise UntrustedRun(f"{path} {why}: refused; glow-ood works in a run only through real folders you own; "
                       f"{ALLOW_SHARED_HINT}")


def not_a_link(path: Path) -> None:
    """A control file of a run (config.yaml, log.txt, LOCK, ...) must not be a symbolic link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedRun(f"{path} is a symbolic link (to {os.readlink(path)!r}): refused; replace it with the "
                           "file itself or remove it")


def _tree(directory: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """``directory`` and everything below it, by lstat (no link followed), folders first."""
    st = os.lstat(directory)
    yield directory, st
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(directory) as entries:
            children = sorted(entries, key=lambda e: e.name)
        for entry in children:
            yield from _tree(Path(entry.path))


def check_private_tree(directory: str | os.PathLike, error: type[UserError], what: str) -> None:
    """Refuse (``error``, naming the path) a tree holding a link, a file or folder of another user,
    anything but files and folders, or anything writable by group or others."""
    for path, st in _tree(Path(directory)):
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            why = "is a symbolic link"
        elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            why = f"is not a file or folder (mode {stat.filemode(mode)})"
        elif st.st_uid != os.getuid():
            why = f"belongs to {_whose(st)}"
        elif mode & (stat.S_IWGRP | stat.S_IWOTH):
            why = f"is writable by {'group' if mode & stat.S_IWGRP else 'others'} ({stat.filemode(mode)})"
        else:
            continue
        raise error(f"{path} {why}: {what}")


def make_private_tree(directory: str | os.PathLike, error: type[UserError], what: str) -> None:
    """Take group and other write permission from every file and folder of the tree (whatever
    the umask), through descriptors opened without following links; anything that is not this
    user's own file or folder is refused (``error``)."""
    for path, st in _tree(Path(directory)):
        if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) \
                or st.st_uid != os.getuid():
            check_private_tree(path, error, what)  # raises, naming what is wrong
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(path, flags | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0))
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # replaced since it was listed
                raise error(f"{path} changed while its permissions were being set: {what}")
            os.fchmod(fd, stat.S_IMODE(now.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        finally:
            os.close(fd)
