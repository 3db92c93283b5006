"""The shard layout and THE manifest reader: every part of glow-ood reads a manifest here.

Layout: ``<root>/<dataset>/<split>/<dataset>-<split>-NNNNNN.tar`` plus ``manifest.json``
(:func:`split_dir`, :func:`shard_name`, :data:`MANIFEST`).

A shard root may be writable by a whole group, so a manifest is read as written by someone
else (:func:`read_manifest`): opened without following a symlink (a FIFO or device refused),
at most :data:`MAX_MANIFEST_BYTES` and :data:`MAX_MANIFEST_CONTAINERS` JSON objects and lists
(both constants, so parsing one takes at most ~110 MB whatever the file holds); every shard
name must follow the naming scheme (no manifest can point a reader outside its split
directory), every entry's counts and sizes must be non-negative integers, resolution and
channels must be sane, and the build must be complete unless the caller (a resuming build,
``verify``) asks for an incomplete one. Training, evaluation, the build and ``verify`` all read
through it; a caller that needs the manifest several times reads it once and passes it on.

:func:`manifest_hash` identifies a shard build in results (sha256 of the canonical JSON).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from glow.digest import json_digest
from glow.errors import DataError
from glow.files import UnsafeFile, read_bytes

__all__ = ["MANIFEST", "MAX_MANIFEST_BYTES", "MAX_MANIFEST_CONTAINERS", "ImageSpec", "ShardError", "ShardsMissing",
           "check_shard_name", "manifest_hash", "manifest_path", "read_manifest", "shard_name", "split_dir"]

MANIFEST = "manifest.json"
SHARD_NAME_RE = r"{dataset}-{split}-\d{{6}}\.tar"
# A manifest takes ~300 bytes and 2-3 JSON containers a shard: 8 MiB is ~27,000 shards (CelebA
# train at the default 500 samples a shard is 326). Measured worst case for a hostile file
# within both caps: ~110 MB to parse (two-character strings; without the container cap, empty
# objects take 25x the bytes: ~200 MB).
MAX_MANIFEST_BYTES = 8 << 20
MAX_MANIFEST_CONTAINERS = 200_000
BUILD_COMMANDS = ("demo", "gaussian", "svhn", "celeba", "cifar10", "cifar100", "mnist", "fashion-mnist")
_ENTRY_INTS = ("shard", "count", "bytes", "first_index", "last_index")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MODES = {1: "L", 3: "RGB"}


class ShardError(DataError, RuntimeError):
    """A shard set on disk is missing, corrupt, or does not match its manifest (exit code 4)."""


class ShardsMissing(ShardError, FileNotFoundError):
    """No manifest where shards were expected; the message says how to build them."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What every image of a split is, per its manifest: ``resolution`` x ``resolution`` x ``channels``."""

    resolution: int
    channels: int = 3

    @classmethod
    def of(cls, manifest: dict) -> "ImageSpec":
        """From a manifest; manifests written before ``channels`` existed are RGB."""
        res, ch = manifest.get("resolution"), manifest.get("channels", 3)
        if type(res) is not int or not 1 <= res <= 4096 or type(ch) is not int or ch not in _MODES:
            raise ShardError(f"manifest of {manifest.get('dataset')}/{manifest.get('split')} declares resolution "
                             f"{res!r} and channels {ch!r}; expected 1..4096 and 1 or 3: rebuild the shards")
        return cls(res, ch)

    @property
    def mode(self) -> str:
        """The PIL mode of the split's images: ``RGB`` or ``L``."""
        return _MODES[self.channels]


def split_dir(root: str | os.PathLike, dataset: str, split: str) -> Path:
    return Path(root) / dataset / split


def manifest_path(root: str | os.PathLike, dataset: str, split: str) -> Path:
    return split_dir(root, dataset, split) / MANIFEST


def shard_name(dataset: str, split: str, i: int) -> str:
    return f"{dataset}-{split}-{i:06d}.tar"


def check_shard_name(name: str, dataset: str, split: str, where: str | os.PathLike) -> str:
    """``name`` if it follows the naming scheme (so it lies inside the split directory),
    else :class:`ShardError` naming the manifest ``where`` it was found: a manifest must not
    point a reader at any other file (``../``, absolute paths, other sets' shards)."""
    pattern = SHARD_NAME_RE.format(dataset=re.escape(dataset), split=re.escape(split))
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise ShardError(f"{where}: shard name {name!r} does not match the naming scheme "
                         f"{dataset}-{split}-NNNNNN.tar; the manifest is corrupt or hostile: rebuild the shards")
    return name


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, first 16 hex characters."""
    return json_digest(manifest)


def read_manifest(root: str | os.PathLike, dataset: str, split: str, *, require_complete: bool = True) -> dict:
    """The checked manifest of ``root/dataset/split`` (see the module docstring).

    Raises :class:`ShardsMissing` (naming the expected path and the build command) when there is
    none, and :class:`ShardError` naming the file for anything refused. ``require_complete=False``
    accepts a build still in progress (a resuming build, ``verify``)."""
    path = manifest_path(root, dataset, split)
    try:
        raw = read_bytes(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        command = dataset if dataset in BUILD_COMMANDS else "folder"
        raise ShardsMissing(f"no shard manifest at {path}; build the shards first, e.g. "
                            f"`python shards/build.py {command} --out {root}`") from None
    except UnsafeFile as err:
        raise ShardError(f"manifest {err}; rebuild the shards") from None
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_MANIFEST_CONTAINERS:
        raise ShardError(f"manifest {path} holds {containers} JSON objects or lists, more than the "
                         f"{MAX_MANIFEST_CONTAINERS} any build writes: it is corrupt or hostile: rebuild the shards")
    try:
        man = json.loads(raw)
    except ValueError as exn:
        raise ShardError(f"manifest {path} is not valid JSON ({exn}); rebuild the shards") from None
    _check(man, path, dataset, split, require_complete)
    return man


def _check(man: object, path: Path, dataset: str, split: str, require_complete: bool) -> None:
    def bad(what: str) -> ShardError:
        return ShardError(f"manifest {path}: {what}; the manifest is corrupt or hostile: rebuild the shards")

    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        raise bad("not a JSON object with a list of shards")
    seen = set()
    for entry in man["shards"]:
        if not isinstance(entry, dict):
            raise bad(f"shard entry {entry!r:.80} is not an object")
        name = check_shard_name(entry.get("name"), dataset, split, path)
        if any(type(entry.get(k)) is not int or entry[k] < 0 for k in _ENTRY_INTS):
            raise bad(f"entry {name} needs non-negative integers {', '.join(_ENTRY_INTS)}")
        if name != shard_name(dataset, split, entry["shard"]) or name in seen:
            raise bad(f"entry {name} is listed twice or under shard number {entry['shard']}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256_RE.fullmatch(entry["sha256"]):
            raise bad(f"entry {name} has no sha256 of 64 hex digits")
        seen.add(name)
    ImageSpec.of(man)  # resolution and channels are sane
    if not require_complete:
        return
    if man.get("complete") is not True:
        raise ShardError(f"{path}: the shard build is incomplete; rerun the build command to finish it")
    # The total is not compared with the shards' counts here: verify reports a difference, and
    # evaluation compares what it gathered with it (a stream that lost samples fails loudly).
    if type(man.get("count")) is not int or man["count"] < 1:
        raise bad(f"the split holds {man.get('count')!r} samples; a split holds at least one")
