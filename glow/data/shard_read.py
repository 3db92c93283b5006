"""Reading one shard with bounded memory: members, sizes and images checked before decoding.

Shard roots live on shared filesystems; a reader must not trust a file because of where it
lies. Everything here is checked against the manifest *before* it is read or decoded:

* the manifest's shard names follow the naming scheme (:func:`glow.data.shards.check_shard_name`),
  so no manifest can point a reader outside its split directory;
* the shard's size on disk equals the manifest's ``bytes`` (so a reader never holds more than
  what the manifest declared), and it is a plain tar (a compressed stream, e.g. a gzip bomb,
  is refused before one byte is inflated);
* every member is a regular file named ``<8-digit key>.png`` or ``<key>.json`` whose declared
  size is at most :func:`member_cap` for the manifest's resolution and channels;
* a PNG's header must declare exactly the manifest's resolution and mode (``RGB`` or ``L``)
  before its pixels are decoded.

A failed check raises :class:`ShardReadError` naming the shard and what to do; nothing is
ever read in full first.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import tarfile
from typing import Iterator

import numpy as np
from PIL import Image

from glow.data.shards import ShardError

__all__ = ["ImageSpec", "ShardReadError", "convert_channels", "decode_png", "iter_shard", "member_cap"]

JSON_CAP = 1 << 16  # a sample's metadata is a few hundred bytes
_KEY_RE = re.compile(r"\d{8}")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_MODES = {1: "L", 3: "RGB"}


class ShardReadError(ShardError):
    """A shard could not be read, or disagrees with its manifest; the message names it."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What every image of a split is, per its manifest: ``resolution`` x ``resolution`` x ``channels``."""

    resolution: int
    channels: int = 3

    @classmethod
    def of(cls, manifest: dict) -> "ImageSpec":
        """From a manifest; manifests written before ``channels`` existed are RGB."""
        res, ch = manifest.get("resolution"), manifest.get("channels", 3)
        if not isinstance(res, int) or not 1 <= res <= 4096 or ch not in _MODES:
            raise ShardError(f"manifest of {manifest.get('dataset')}/{manifest.get('split')} declares resolution "
                             f"{res!r} and channels {ch!r}; expected 1..4096 and 1 or 3: rebuild the shards")
        return cls(res, ch)

    @property
    def mode(self) -> str:
        return _MODES[self.channels]


def member_cap(spec: ImageSpec) -> int:
    """Largest PNG member accepted: twice the raw pixel bytes plus 64 KiB. A PNG of an image
    holds at most about its raw size (stored deflate blocks) plus headers."""
    return 2 * spec.resolution * spec.resolution * spec.channels + (1 << 16)


def shard_cap(spec: ImageSpec, count: int) -> int:
    """Largest shard file a manifest may declare for ``count`` samples (tar headers included)."""
    return count * (member_cap(spec) + JSON_CAP + 4 * 512) + 20 * 512


def _refuse(url: str, what: str) -> ShardReadError:
    return ShardReadError(f"shard {url}: {what}; the shard is corrupt or was not written by shards/build.py: "
                          f"check it with `python shards/build.py verify` and rebuild it")


def _open_checked(url: str, expected_bytes: int | None, spec: ImageSpec, count: int | None):
    stream = open(url, "rb")
    try:
        size = os.fstat(stream.fileno()).st_size
        if expected_bytes is not None and size != expected_bytes:
            raise _refuse(url, f"{size} bytes on disk, the manifest says {expected_bytes}")
        if count is not None and size > shard_cap(spec, count):
            raise _refuse(url, f"{size} bytes for {count} samples of {spec.resolution}x{spec.resolution}x"
                               f"{spec.channels}, more than the {shard_cap(spec, count)} such a shard can take")
        head = stream.read(8)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                raise _refuse(url, f"a {kind}-compressed stream, shards are plain tar files")
        stream.seek(0)
        return stream
    except BaseException:
        stream.close()
        raise


def iter_shard(url: str, spec: ImageSpec, *, expected_bytes: int | None = None,
               count: int | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", "png", "json"}`` of one shard, each member checked
    before it is read (see the module docstring). ``count``, when given, must match."""
    n, sample = 0, None
    caps = {"png": member_cap(spec), "json": JSON_CAP}
    try:
        with _open_checked(url, expected_bytes, spec, count) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not member.isfile() or not _KEY_RE.fullmatch(key) or ext not in caps:
                    raise _refuse(url, f"unexpected member {member.name!r} (expected regular files "
                                       f"<8-digit key>.png and .json)")
                if member.size > caps[ext]:
                    raise _refuse(url, f"member {member.name} declares {member.size} bytes, more than the "
                                       f"{caps[ext]} a {ext} of a {spec.resolution}x{spec.resolution}x"
                                       f"{spec.channels} sample can take")
                if sample is not None and sample["__key__"] != key:
                    n += 1
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise _refuse(url, f"member {member.name} appears twice")
                sample[ext] = tar.extractfile(member).read()
    except ShardReadError:
        raise
    except Exception as exn:
        raise ShardReadError(f"shard {url} is missing, truncated or corrupt ({type(exn).__name__}: "
                             f"{exn.args[0] if exn.args else exn}); check it with "
                             f"`python shards/build.py verify` and rebuild it") from None
    if sample is not None:
        n += 1
        yield sample
    if count is not None and n != count:
        raise ShardReadError(f"shard {url} holds {n} samples but its manifest says {count}; "
                             f"it is truncated or was replaced: rebuild it")


def decode_png(data: bytes, where: str, spec: ImageSpec | None = None) -> np.ndarray:
    """An HxWxC uint8 array. With ``spec``, the PNG header must declare the manifest's size
    and mode (checked before decoding); without, any PNG is decoded as RGB."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if spec is not None and (im.size != (spec.resolution, spec.resolution) or im.mode != spec.mode):
                raise ShardReadError(
                    f"the image {where} is {im.size[0]}x{im.size[1]} {im.mode}, its manifest says "
                    f"{spec.resolution}x{spec.resolution} {spec.mode}: not decoded; the shard is corrupt or "
                    f"hostile: rebuild it")
            im.load()
            arr = np.asarray(im if spec is not None else im.convert("RGB"))
    except ShardReadError:
        raise
    except Exception as exn:
        raise ShardReadError(f"cannot decode the image {where}: {exn}; run `python shards/build.py verify` "
                             f"and rebuild the shard") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """HxWxC uint8 to ``channels``: grayscale is replicated to RGB; RGB becomes luma
    (Pillow's ``convert("L")``, ITU-R 601-2: L = R*299/1000 + G*587/1000 + B*114/1000)."""
    have = arr.shape[2]
    if have == channels:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if have == 3 and channels == 1:
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr), "RGB").convert("L"))[:, :, None]
    raise ValueError(f"cannot convert {have} channels to {channels}")
