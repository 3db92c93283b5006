"""Reading one shard with bounded memory: headers, members, sizes and images checked before anything is read.

Shard roots live on shared filesystems; a reader must not trust a file because of where it
lies. Everything here is checked against the manifest (:mod:`glow.data.manifest`, which has
already checked the shard names) and against constants *before* it is read or decoded:

* the shard is opened without following a symlink and must be a regular file with one link
  (a FIFO or device is refused without blocking);
* its size on disk equals the manifest's ``bytes`` and is at most :func:`shard_cap` for the
  manifest's sample count and never more than :data:`MAX_SHARD_BYTES` (in every mode:
  training, evaluation, random access, ``verify``); it is a plain tar (a compressed stream,
  e.g. a gzip bomb, is refused before one byte is inflated);
* the 512-byte tar headers are walked here, not by :mod:`tarfile`'s reader: each header is
  parsed on its own (``TarInfo.frombuf``), extended headers (types ``x``, ``g``, ``L``, ``K``,
  whose payload tarfile would read in full whatever size they declare) and every member that
  is not a regular file are refused; every member must be named ``<8-digit key>.png`` or
  ``<key>.json`` and declare at most :func:`member_cap` bytes for the manifest's resolution and
  channels, and only then are its bytes read;
* the sample count must match the manifest, and a shard read without one must hold a sample;
* a PNG's header must declare exactly the manifest's resolution and mode (``RGB`` or ``L``)
  before its pixels are decoded.

A failed check raises :class:`ShardReadError` naming the shard and what to do; nothing is
ever read in full first, so memory stays below one member cap whatever a file declares.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image

from glow.data.manifest import ImageSpec, ShardError
from glow.files import UnsafeFile, open_nofollow

__all__ = ["MAX_SHARD_BYTES", "ImageSpec", "ShardReadError", "convert_channels", "decode_png", "iter_shard",
           "member_cap", "open_shard", "shard_cap"]

JSON_CAP = 1 << 16  # a sample's metadata is a few hundred bytes
# 500 samples (the default) of 64x64 RGB make ~4.1 MB; a build refuses to write a larger shard.
MAX_SHARD_BYTES = 1 << 30
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_EXTENDED = {b"x": "PAX extended header", b"g": "PAX global header", b"L": "GNU long name header",
             b"K": "GNU long link header"}
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_KEY_RE = re.compile(r"\d{8}")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class ShardReadError(ShardError):
    """A shard could not be read, or disagrees with its manifest; the message names it."""


class ShardFileMissing(ShardReadError, FileNotFoundError):
    """A shard the manifest lists is not there."""


def member_cap(spec: ImageSpec) -> int:
    """Largest PNG member accepted: twice the raw pixel bytes plus 64 KiB. A PNG of an image
    holds at most about its raw size (stored deflate blocks) plus headers."""
    return 2 * spec.resolution * spec.resolution * spec.channels + (1 << 16)


def shard_cap(spec: ImageSpec, count: int | None) -> int:
    """Largest shard file accepted for ``count`` samples (tar headers included; None: any
    count), never more than :data:`MAX_SHARD_BYTES`."""
    if count is None:
        return MAX_SHARD_BYTES
    return min(MAX_SHARD_BYTES, count * (member_cap(spec) + JSON_CAP + 4 * _BLOCK) + 20 * _BLOCK)


def _refuse(url: str, what: str) -> ShardReadError:
    return ShardReadError(f"shard {url}: {what}; the shard is corrupt or was not written by shards/build.py: "
                          f"check it with `python shards/build.py verify` and rebuild it")


def open_shard(url: str | os.PathLike) -> BinaryIO:
    """The shard file opened for reading without following a symlink; a missing file, a
    symlink, a FIFO, a device or a file with several links raises :class:`ShardReadError`."""
    try:
        return os.fdopen(open_nofollow(url), "rb")
    except FileNotFoundError:
        raise ShardFileMissing(f"shard {url} is missing; rerun the build command (it resumes) or check the "
                             f"shard root") from None
    except UnsafeFile as err:
        raise ShardReadError(f"shard {err}; a shard is a regular file written by shards/build.py: "
                             f"rebuild it") from None


def _open_checked(url: str, expected_bytes: int | None, spec: ImageSpec, count: int | None) -> BinaryIO:
    stream = open_shard(url)
    try:
        size = os.fstat(stream.fileno()).st_size
        if expected_bytes is not None and size != expected_bytes:
            raise _refuse(url, f"{size} bytes on disk, the manifest says {expected_bytes}")
        if size > shard_cap(spec, count):
            raise _refuse(url, f"{size} bytes for {count if count is not None else 'any number of'} samples of "
                               f"{spec.resolution}x{spec.resolution}x{spec.channels}, more than the "
                               f"{shard_cap(spec, count)} such a shard can take")
        head = stream.read(8)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                raise _refuse(url, f"a {kind}-compressed stream, shards are plain tar files")
        stream.seek(0)
        return stream
    except BaseException:
        stream.close()
        raise


def _members(stream: BinaryIO, url: str, spec: ImageSpec) -> Iterator[tuple[str, str, bytes]]:
    """``(key, ext, data)`` of each member, each header checked before its data is read."""
    caps = {"png": member_cap(spec), "json": JSON_CAP}
    offset = 0
    while True:
        block = stream.read(_BLOCK)
        if not block or block == _ZERO_BLOCK:  # end of the file, or the end-of-archive marker
            return
        if len(block) < _BLOCK:
            raise _refuse(url, f"truncated tar header at byte {offset}")
        kind = block[156:157]
        if kind in _EXTENDED:
            raise _refuse(url, f"a {_EXTENDED[kind]} (tar type {kind.decode()!r}) at byte {offset}: shards hold "
                               f"plain members only, never extended headers")
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exn:
            raise _refuse(url, f"no valid tar header at byte {offset} ({exn})") from None
        key, _, ext = info.name.partition(".")
        if info.type not in _REGULAR or not _KEY_RE.fullmatch(key) or ext not in caps:
            raise _refuse(url, f"unexpected member {info.name!r} of tar type {info.type.decode(errors='replace')!r} "
                               f"at byte {offset} (expected regular files <8-digit key>.png and .json)")
        if info.size > caps[ext]:
            raise _refuse(url, f"member {info.name} declares {info.size} bytes, more than the "
                               f"{caps[ext]} a {ext} of a {spec.resolution}x{spec.resolution}x"
                               f"{spec.channels} sample can take")
        data = stream.read(info.size)
        padding = -info.size % _BLOCK
        if len(data) != info.size or len(stream.read(padding)) != padding:
            raise _refuse(url, f"member {info.name} is truncated")
        offset += _BLOCK + info.size + padding
        yield key, ext, data


def iter_shard(url: str, spec: ImageSpec, *, expected_bytes: int | None = None,
               count: int | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", "png", "json"}`` of one shard, each member checked
    before it is read (see the module docstring). ``count``, when given, must match; without
    it the shard must hold at least one sample."""
    n, sample = 0, None
    try:
        with _open_checked(url, expected_bytes, spec, count) as stream:
            for key, ext, data in _members(stream, url, spec):
                if sample is not None and sample["__key__"] != key:
                    n += 1
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise _refuse(url, f"member {key}.{ext} appears twice")
                sample[ext] = data
    except ShardReadError:
        raise
    except OSError as exn:
        raise ShardReadError(f"shard {url} could not be read ({type(exn).__name__}: {exn}); check it with "
                             f"`python shards/build.py verify` and rebuild it") from None
    if sample is not None:
        n += 1
        yield sample
    if count is not None and n != count:
        raise ShardReadError(f"shard {url} holds {n} samples but its manifest says {count}; "
                             f"it is truncated or was replaced: rebuild it")
    if count is None and n == 0:
        raise ShardReadError(f"shard {url} holds no samples; it is truncated or was replaced: rebuild it")


def decode_png(data: bytes, where: str, spec: ImageSpec) -> np.ndarray:
    """An HxWxC uint8 array; the PNG header must declare the manifest's size and mode
    (checked before the pixels are decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.size != (spec.resolution, spec.resolution) or im.mode != spec.mode:
                raise ShardReadError(
                    f"the image {where} is {im.size[0]}x{im.size[1]} {im.mode}, its manifest says "
                    f"{spec.resolution}x{spec.resolution} {spec.mode}: not decoded; the shard is corrupt or "
                    f"hostile: rebuild it")
            im.load()
            arr = np.asarray(im)
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
