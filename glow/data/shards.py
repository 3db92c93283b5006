"""Write WebDataset tar shards from an image source, with a manifest, resume and verification.

Layout: ``<root>/<dataset>/<split>/<dataset>-<split>-%06d.tar`` plus ``manifest.json``.
Each sample holds ``<key>.png`` (lossless uint8, RGB or grayscale: ``channels`` in the
manifest) and ``<key>.json`` ({dataset, split, index, source, label, ...}); the key is the
zero-padded item index.

A build is resumable and reproducible:

* item ``i`` of a source always lands in shard ``i // samples_per_shard`` (a skipped bad
  item leaves a gap in the keys, never shifts later items), so every shard is a pure
  function of the settings;
* tar headers carry no time or owner and PNGs are written with fixed options, so a shard's
  sha256 does not depend on when or where it was written;
* a shard is written to a unique temporary name and renamed when complete; its sha256 is
  computed from the final file; the manifest (``complete: false`` until the end) is
  rewritten atomically after every shard, so a rerun keeps shards whose sha256 matches and
  rebuilds the rest;
* one build at a time per split directory: a build holds ``<split dir>/BUILD.lock``
  (:func:`glow.files.hold_lock`, which never follows a symlink) and a second concurrent build
  refuses, naming the holder;
* the manifest holds a fingerprint of the settings; a build with other settings into the
  same directory (or whose manifest cannot be read, :func:`glow.data.manifest.read_manifest`)
  is refused unless ``overwrite=True``.

:func:`verify` checks a split against its manifest through the same bounded reader training
and evaluation use (:mod:`glow.data.shard_read`), and also decodes every image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import multiprocessing
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from glow.data.manifest import (  # noqa: F401  (the layout, re-exported for callers of glow.data.shards)
    MANIFEST,
    ImageSpec,
    ShardError,
    ShardsMissing,
    check_shard_name,
    read_manifest,
    shard_name,
    split_dir,
)
from glow.data.shard_read import (
    MAX_SHARD_BYTES,
    ShardReadError,
    decode_png,
    iter_shard,
    open_shard,
)
from glow.digest import canonical_json, json_digest
from glow.errors import DataError
from glow.files import (
    LockHeld,
    UnsafeFile,
    atomic_write_json,
    hold_lock,
    new_file_mode,
    open_nofollow,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PNG_COMPRESS_LEVEL = 6
KEY_FORMAT = "%08d"
LOCK = "BUILD.lock"
# 500 samples a shard: CelebA 32x32 train (162,770) is 326 shards, enough for 256 readers
# (ranks x loader workers) to read disjoint shards; ~1.7 MB a shard at 32x32 RGB, ~4.1 MB at
# 64x64 (measured on photo crops; docs/cluster.md, "Shards and readers").
DEFAULT_SAMPLES_PER_SHARD = 500


class BuildRefused(ShardError):
    """A directory already holds shards built with other settings."""


class BuildBusy(ShardError):
    """Another build is writing the same split directory right now."""


class BadSourceImage(DataError, ValueError):
    """A source image could not be read; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read source image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def tool_version() -> str:
    """The installed glow-ood's version (package metadata), recorded in manifests and meta.json."""
    from glow import __version__

    return __version__


@dataclasses.dataclass
class Source:
    """What a builder needs from a data source (the readers of ``glow.data.sources`` make them).

    ``payloads(start, stop)`` runs in the main process and returns picklable payloads for
    items ``start..stop-1``; ``process(payload)`` runs in a worker and returns
    ``(index, image uint8 HxWxC, meta)`` (C = ``channels``, 3 or 1) where meta holds at least
    ``source`` and ``label`` (or raises :class:`BadSourceImage`). ``settings`` (resolution,
    preprocessing, source description), ``channels`` and ``items_digest`` make the
    fingerprint; ``extra`` goes to the manifest.
    """

    dataset: str
    split: str
    n: int
    payloads: Callable[[int, int], list]
    process: Callable[[Any], tuple]
    settings: dict
    items_digest: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    shard_stats: Callable[[list[dict]], dict] | None = None
    total_stats: Callable[[list[dict]], dict] | None = None
    channels: int = 3


# --------------------------------------------------------------------------- helpers
def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20, expected_bytes: int | None = None) -> str:
    """sha256 of a shard file opened without following links (:func:`glow.data.shard_read.open_shard`).
    With ``expected_bytes``, a file of another size, or over :data:`MAX_SHARD_BYTES`, is not
    hashed: ShardReadError."""
    h = hashlib.sha256()
    with open_shard(path) as f:
        size = os.fstat(f.fileno()).st_size
        if expected_bytes is not None and size != expected_bytes:
            raise ShardReadError(f"{path}: sha256/size differs from the manifest ({size} bytes on disk, the "
                                 f"manifest says {expected_bytes}): corrupt or replaced")
        if size > MAX_SHARD_BYTES:
            raise ShardReadError(f"{path}: {size} bytes, more than the {MAX_SHARD_BYTES} a shard may hold")
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 HxWx3 (RGB) or HxWx1 / HxW (grayscale) image."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected a uint8 HxWx3 or HxW image, got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img, "L" if img.ndim == 2 else "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _worker(job: tuple) -> tuple:
    """Decode/transform/encode one item in a pool worker. Errors travel back as values."""
    process, payload = job
    try:
        index, img, meta = process(payload)
        return ("ok", index, encode_png(img), meta, tuple(img.shape))
    except BadSourceImage as exn:
        return ("bad", exn.path, exn.reason)


# --------------------------------------------------------------------------- building
def fingerprint(settings: dict) -> str:
    return json_digest(settings)


def _base_manifest(src: Source, samples_per_shard: int) -> dict:
    basis = {
        "format": FORMAT_VERSION,
        "dataset": src.dataset,
        "split": src.split,
        "samples_per_shard": samples_per_shard,
        "n_items": src.n,
        "items_digest": src.items_digest,
        "channels": int(src.channels),
        **src.settings,
    }
    return {
        **basis,
        "fingerprint": fingerprint(basis),
        "tool_version": tool_version(),
        "extra": src.extra,
        "shards": [],
        "count": 0,
        "skipped": [],
        "complete": False,
    }


def _finish(man: dict, src: Source) -> dict:
    man["count"] = sum(s["count"] for s in man["shards"])
    man["skipped"] = [k for s in man["shards"] for k in s.get("skipped", [])]
    if src.total_stats is not None:
        man["stats"] = src.total_stats([s.get("stats", {}) for s in man["shards"]])
    return man


def _previous_build(root: str | os.PathLike, src: Source) -> tuple[dict | None, str | None]:
    """(the manifest of a previous build of ``src`` under ``root``, None), (None, None) when there
    is none, or (None, why it cannot be used) when the one manifest reader refuses it."""
    try:
        return read_manifest(root, src.dataset, src.split, require_complete=False), None
    except ShardsMissing:
        return None, None
    except ShardError as exn:
        return None, f"{split_dir(root, src.dataset, src.split)} holds a manifest that cannot be used ({exn})"


def _clear_dir(d: Path, dataset: str, split: str) -> None:
    for p in d.glob(f"{dataset}-{split}-*.tar*"):
        p.unlink()
    for name in (MANIFEST, MANIFEST + ".tmp"):
        (d / name).unlink(missing_ok=True)


def _reusable_shards(d: Path, old: dict, n_shards: int) -> dict[int, dict]:
    """Shards of a previous build with the same settings whose file matches its sha256
    (``old`` comes from :func:`read_manifest`: its shard names are checked)."""
    keep = {}
    for entry in old["shards"]:
        i = entry["shard"]
        if i >= n_shards:
            continue
        path = d / entry["name"]
        try:
            digest = sha256_file(path, expected_bytes=entry["bytes"])
        except FileNotFoundError:
            continue
        except ShardReadError:  # another size, a symlink, a FIFO: rebuilt (the new shard replaces the entry)
            digest = None
        if digest == entry["sha256"]:
            keep[i] = entry
        else:
            logger.warning("shard %s does not match its manifest sha256; rebuilding it", path)
    return keep


def build(
    src: Source,
    root: str | os.PathLike,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    workers: int = 0,
    overwrite: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    _after_shard: Callable[[int], None] | None = None,
) -> dict:
    """Write ``src`` as shards under ``root/<dataset>/<split>/`` and return the manifest.

    Raises :class:`BuildRefused` when the directory holds a build with other settings
    (pass ``overwrite=True`` to replace it), :class:`BuildBusy` when another build writes
    the same directory now, and :class:`BadSourceImage` on the first unreadable item unless
    ``skip_bad`` (then the item is recorded in ``skipped``).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if src.n < 1:
        raise ShardError(f"source {src.dataset}/{src.split} has no items: nothing to build")
    if not isinstance(src.settings.get("resolution"), int) or src.channels not in (1, 3):
        raise ValueError(f"source {src.dataset}/{src.split} must declare an int resolution and 1 or 3 channels "
                         f"(readers check every image against them), got {src.settings.get('resolution')!r}, "
                         f"{src.channels!r}")
    d = split_dir(root, src.dataset, src.split)
    d.mkdir(parents=True, exist_ok=True)
    try:
        with hold_lock(d / LOCK, {"build": f"{src.dataset}/{src.split}"}):
            return _build_locked(src, root, samples_per_shard, workers, overwrite, skip_bad, progress, _after_shard)
    except LockHeld as exn:
        who = ", ".join(f"{k}={v}" for k, v in exn.holder.items()) or "unknown holder"
        raise BuildBusy(f"{d} is being written by another shard build ({who}); wait for it to finish "
                        f"(a rerun of the same command then resumes or skips it), or stop it first") from None
    except UnsafeFile as exn:  # e.g. BUILD.lock planted as a symlink to someone's dotfile: left untouched
        raise ShardError(f"{exn}; remove it and rerun the build") from None


def _build_locked(src: Source, root: str | os.PathLike, samples_per_shard: int, workers: int, overwrite: bool,
                  skip_bad: bool, progress: bool, _after_shard: Callable[[int], None] | None) -> dict:
    man = _base_manifest(src, samples_per_shard)
    n_shards = -(-src.n // samples_per_shard)
    d = split_dir(root, src.dataset, src.split)
    mpath = d / MANIFEST
    old, refusal = _previous_build(root, src)
    if old is not None and old.get("fingerprint") != man["fingerprint"]:
        refusal = (f"{d} already holds shards built with other settings (fingerprint "
                   f"{old.get('fingerprint')} != {man['fingerprint']})")
    if refusal is not None:
        if not overwrite:
            raise BuildRefused(f"{refusal}; use another output directory or pass --overwrite to replace them")
        logger.info("overwriting the previous build in %s", d)
        _clear_dir(d, src.dataset, src.split)
        old = None
    for p in d.glob(f"{src.dataset}-{src.split}-*.tar*.tmp"):
        p.unlink()  # leftovers of an interrupted build (we hold the lock: no live build owns them)
    keep = _reusable_shards(d, old, n_shards) if old else {}
    if keep:
        logger.info("%s/%s: %d of %d shards already complete", src.dataset, src.split, len(keep), n_shards)
    entries: dict[int, dict] = dict(keep)
    man["shards"] = [entries[i] for i in sorted(entries)]
    atomic_write_json(mpath, man, indent=1)

    pool = multiprocessing.get_context().Pool(workers) if workers > 0 else None
    bar = tqdm(total=src.n, desc=f"{src.dataset}/{src.split}", unit="img", disable=not progress or None)
    try:
        for i in range(n_shards):
            start, stop = i * samples_per_shard, min(src.n, (i + 1) * samples_per_shard)
            if i in entries:
                bar.update(stop - start)
                continue
            entries[i] = _write_shard(src, d, i, start, stop, pool, skip_bad, bar)
            man["shards"] = [entries[j] for j in sorted(entries)]
            atomic_write_json(mpath, _finish(man, src), indent=1)
            if _after_shard is not None:
                _after_shard(i)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    man["complete"] = True
    _finish(man, src)
    if man["count"] == 0:
        raise ShardError(f"every item of {src.dataset}/{src.split} was skipped as unreadable")
    atomic_write_json(mpath, man, indent=1)
    logger.info("%s/%s: %d samples in %d shards at %s", src.dataset, src.split, man["count"], n_shards, d)
    return man


def _write_shard(src: Source, d: Path, i: int, start: int, stop: int, pool, skip_bad: bool, bar) -> dict:
    name = shard_name(src.dataset, src.split, i)
    final, tmp = d / name, d / f"{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    jobs = [(src.process, p) for p in src.payloads(start, stop)]
    results = pool.imap(_worker, jobs, chunksize=16) if pool is not None else map(_worker, jobs)
    count, skipped, metas, shape = 0, [], [], None
    with os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for res in results:
                bar.update(1)
                if res[0] == "bad":
                    if not skip_bad:
                        raise BadSourceImage(res[1], res[2] + " (pass --skip-bad to skip unreadable images)")
                    logger.warning("skipping unreadable image %s: %s", res[1], res[2])
                    skipped.append({"source": res[1], "error": res[2]})
                    continue
                _, index, png, meta, img_shape = res
                if shape is None:
                    shape = img_shape
                elif img_shape != shape:
                    raise ShardError(f"item {index} has shape {img_shape}, expected {shape}")
                channels = 1 if len(img_shape) == 2 else img_shape[2]
                if img_shape[:2] != (src.settings["resolution"],) * 2 or channels != src.channels:
                    res = src.settings["resolution"]
                    raise ShardError(f"item {index} of {src.dataset}/{src.split} has shape {img_shape}, the source "
                                     f"declares {res}x{res}x{src.channels}")
                key = KEY_FORMAT % index
                record = {"dataset": src.dataset, "split": src.split, "index": int(index), **meta}
                record.setdefault("label", None)
                record.setdefault("source", None)
                metas.append(record)
                _add_member(tar, key + ".png", png)
                _add_member(tar, key + ".json", canonical_json(record).encode())
                count += 1
        f.flush()
        os.fsync(f.fileno())
        os.fchmod(f.fileno(), new_file_mode())
        if f.tell() > MAX_SHARD_BYTES:
            raise ShardError(f"shard {final} would be {f.tell()} bytes, more than the {MAX_SHARD_BYTES} readers "
                             f"accept: rebuild with a smaller --samples-per-shard (--overwrite)")
    os.replace(tmp, final)
    entry = {  # size and sha256 of the file under its final name: what a reader will check
        "shard": i,
        "name": name,
        "count": count,
        "first_index": start,
        "last_index": stop - 1,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "skipped": skipped,
    }
    if src.shard_stats is not None:
        entry["stats"] = src.shard_stats(metas)
    return entry


# --------------------------------------------------------------------------- verification
def verify(root: str | os.PathLike, dataset: str, split: str) -> dict:
    """Check every shard of ``root/dataset/split`` against the manifest.

    Checks: the manifest passes the one reader (:func:`read_manifest`) and the build is
    complete; each shard exists as a regular file, its size and sha256 match; read through the
    bounded reader training and evaluation use (:func:`glow.data.shard_read.iter_shard`) it holds
    ``count`` samples, each with a ``.json`` and a ``.png`` that decodes at the manifest's size.
    Returns ``{"dataset", "split", "shards", "count"}``; raises :class:`ShardError` listing
    every problem found.
    """
    man = read_manifest(root, dataset, split, require_complete=False)
    d = split_dir(root, dataset, split)
    spec = ImageSpec.of(man)
    problems = []
    if man.get("complete") is not True:
        problems.append(f"{d / MANIFEST}: the build is incomplete; rerun the same build command to resume it")
    for entry in man["shards"]:
        path = d / entry["name"]
        try:
            if sha256_file(path, expected_bytes=entry["bytes"]) != entry["sha256"]:
                raise ShardReadError(f"{path}: sha256/size differs from the manifest (corrupt or replaced)")
            for sample in iter_shard(str(path), spec, expected_bytes=entry["bytes"], count=entry["count"]):
                where = f"{sample['__key__']} in {path}"
                if "json" not in sample or "png" not in sample:
                    raise ShardReadError(f"sample {where} lacks a .json or a .png member")
                decode_png(sample["png"], where, spec)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except ShardError as exn:
            problems.append(str(exn))
    total = sum(e["count"] for e in man["shards"])
    if total != man.get("count"):
        problems.append(f"{d / MANIFEST}: shard counts sum to {total}, manifest count is {man.get('count')}")
    if problems:
        raise ShardError("verification failed:\n  " + "\n  ".join(problems))
    return {"dataset": dataset, "split": split, "shards": len(man["shards"]), "count": total}
