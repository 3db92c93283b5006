"""Streams over the WebDataset shards written by :mod:`glow.shards`.

Training (:func:`make_train_loader`)
    Each (rank, worker) draws shards with replacement from its own shard list, shuffles
    samples in a buffer, optionally flips them, and batches inside the dataset; the
    DataLoader only interleaves workers (``batch_size=None``, in order). Every random
    choice comes from ``random.Random`` seeded by ``(seed, epoch, rank, worker)`` and the
    shard lists follow from ``(rank, world_size, num_workers)``, so **the same arguments
    give the same batches in the same order**. Each worker yields a fixed share of
    ``batches_per_epoch`` (``with_epoch`` in batches); the shares add up to exactly
    ``batches_per_epoch`` per rank.

    Resuming mid-epoch: rebuild the loader with the same (seed, epoch, rank, world_size,
    num_workers, batch_size) and drop the batches already consumed, e.g.
    ``itertools.islice(loader, consumed, None)`` (``skip_batches=`` does that for you).
    Changing ``num_workers`` or ``world_size`` changes the stream (deterministically).

    Shard lists: with at least ``world_size * num_workers`` shards each (rank, worker) gets
    a disjoint slice (``shards[split::n_splits]``); with fewer, every worker samples from
    all shards (its seed still differs), since a resampled stream needs no exclusivity.

Evaluation (:func:`make_eval_loader`)
    No resampling, no shuffle; every sample exactly once over ranks x workers. With at least
    as many shards as (rank, worker) splits, shards are dealt out; with fewer, every split
    reads all shards and keeps the samples whose position ``% n_splits`` is its own, so all
    splits stay busy. No collectives are needed: ranks may get unequal counts, and the
    caller gathers unequal lengths and compares the total with the manifest. A truncated or
    corrupt shard, or one whose sample count differs from the manifest, raises
    :class:`ShardReadError` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from glow.shards import KEY_FORMAT, MANIFEST, ShardError, canonical_json, split_dir

logger = logging.getLogger(__name__)


class ShardReadError(ShardError):
    """A shard could not be read, or disagrees with its manifest; the message names it."""


# --------------------------------------------------------------------------- manifest
def read_manifest(root: str | os.PathLike, dataset: str, split: str) -> dict:
    """The manifest of ``root/dataset/split``; FileNotFoundError names the expected path."""
    path = split_dir(root, dataset, split) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard manifest at {path}; build the shards first, e.g. "
            f"`python shards/build.py {dataset if dataset in ('demo', 'gaussian', 'svhn', 'celeba') else 'folder'}"
            f" --out {root}`"
        )
    man = json.loads(path.read_text())
    if not man.get("complete"):
        raise ShardError(f"{path}: the shard build is incomplete; rerun the build command to finish it")
    return man


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, first 16 hex characters."""
    return hashlib.sha256(canonical_json(manifest).encode()).hexdigest()[:16]


def shard_paths(root: str | os.PathLike, dataset: str, split: str, manifest: dict | None = None) -> list[str]:
    man = manifest or read_manifest(root, dataset, split)
    d = split_dir(root, dataset, split)
    return [str(d / s["name"]) for s in man["shards"]]


# --------------------------------------------------------------------------- decoding
def _worker_split() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except Exception as exn:
        raise ShardReadError(f"cannot decode the image {where}: {exn}; run `python shards/build.py verify` "
                             f"and rebuild the shard") from None
    return arr


def _samples_of(url: str, expected: int | None) -> Iterator[dict]:
    """Samples of one shard, with read errors and count mismatches naming the shard."""
    n = 0
    try:
        with open(url, "rb") as stream:  # closed even when the consumer stops mid-shard
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}],
                                                       handler=wds.reraise_exception)
            for sample in wds.tariterators.group_by_keys(files, handler=wds.reraise_exception):
                n += 1
                yield sample
    except ShardReadError:
        raise
    except Exception as exn:
        raise ShardReadError(f"shard {url} is missing, truncated or corrupt ({type(exn).__name__}: "
                             f"{exn.args[0] if exn.args else exn}); check it with "
                             f"`python shards/build.py verify` and rebuild it") from None
    if expected is not None and n != expected:
        raise ShardReadError(f"shard {url} holds {n} samples but its manifest says {expected}; "
                             f"it is truncated or was replaced: rebuild it")


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- training
class _ResampledShards:
    """Infinite stream of ``{"url": ...}`` drawn with replacement by a given rng."""

    def __init__(self, urls: Sequence[str], rng: random.Random):
        self.urls, self.rng = list(urls), rng

    def __call__(self) -> Iterator[dict]:
        while True:
            yield {"url": self.urls[self.rng.randrange(len(self.urls))]}


def _expand(src: Iterable[dict]) -> Iterator[dict]:
    for item in src:
        yield from _samples_of(item["url"], None)


def _train_decode(src: Iterable[dict], rng: random.Random, hflip: bool) -> Iterator[np.ndarray]:
    for s in src:
        arr = decode_png(s["png"], f"{s['__key__']} in {s['__url__']}")
        if hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        yield arr


def _collate_images(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2)))


def _share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


class TrainStream(IterableDataset):
    """See the module docstring; built by :func:`make_train_loader`."""

    def __init__(self, urls: Sequence[str], *, batch_size: int, seed: int, epoch: int, rank: int,
                 world_size: int, batches_per_epoch: int, hflip: bool, shuffle_buffer: int):
        super().__init__()
        self.urls = list(urls)
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch, self.hflip, self.shuffle_buffer = batches_per_epoch, hflip, shuffle_buffer

    def pipeline(self, worker: int, num_workers: int) -> wds.DataPipeline:
        n_splits = self.world_size * num_workers
        split = self.rank * num_workers + worker
        urls = self.urls[split::n_splits] if len(self.urls) >= n_splits else self.urls
        seed = int.from_bytes(hashlib.sha256(
            f"train:{self.seed}:{self.epoch}:{self.rank}:{worker}".encode()).digest()[:8], "big")
        shard_rng, shuffle_rng, flip_rng = (random.Random(seed + k) for k in range(3))
        n_batches = _share(self.batches_per_epoch, num_workers, worker)
        return wds.DataPipeline(
            _ResampledShards(urls, shard_rng),
            _expand,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng),
            lambda src: _train_decode(src, flip_rng, self.hflip),
            wds.batched(self.batch_size, collation_fn=_collate_images, partial=False),
        ).with_epoch(nbatches=n_batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, num_workers = _worker_split()
        if _share(self.batches_per_epoch, num_workers, worker) == 0:
            return iter(())
        return iter(self.pipeline(worker, num_workers))


def make_train_loader(root: str | os.PathLike, dataset: str, split: str, *, batch_size: int, seed: int,
                      epoch: int, rank: int, world_size: int, num_workers: int = 0,
                      batches_per_epoch: int, hflip: bool = False, shuffle_buffer: int = 1000,
                      skip_batches: int = 0) -> Iterable[torch.Tensor]:
    """Exactly ``batches_per_epoch - skip_batches`` uint8 batches (B,3,H,W) for this rank,
    a deterministic function of all arguments (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size < 1 or batches_per_epoch < 0:
        raise ValueError(f"batch_size must be >= 1 and batches_per_epoch >= 0, got {batch_size}, {batches_per_epoch}")
    urls = shard_paths(root, dataset, split)
    ds = TrainStream(urls, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                     batches_per_epoch=batches_per_epoch, hflip=hflip, shuffle_buffer=shuffle_buffer)
    # An explicit generator: creating the loader must not draw from the global torch RNG,
    # or a resumed run (which creates one more loader) would get other training noise.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                        generator=generator)
    if skip_batches:
        return _Skipped(loader, skip_batches, batches_per_epoch)
    return loader


class _Skipped:
    def __init__(self, loader: DataLoader, skip: int, total: int):
        self.loader, self.skip, self.total = loader, skip, total

    def __len__(self) -> int:
        return max(0, self.total - self.skip)

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.skip, None)


# --------------------------------------------------------------------------- evaluation
class EvalStream(IterableDataset):
    """See the module docstring; built by :func:`make_eval_loader`."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], *, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.urls, self.counts = list(urls), list(counts)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        n_splits = self.world_size * num_workers
        split = self.rank * num_workers + worker
        if len(self.urls) >= n_splits:
            for url, count in list(zip(self.urls, self.counts))[split::n_splits]:
                yield from _samples_of(url, count)
        else:
            pos = 0
            for url, count in zip(self.urls, self.counts):
                for s in _samples_of(url, count):
                    if pos % n_splits == split:
                        yield s
                    pos += 1

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_split()
        batch: list[dict] = []
        for s in self.samples(worker, num_workers):
            where = f"{s['__key__']} in {s['__url__']}"
            if "png" not in s or "json" not in s:
                raise ShardReadError(f"sample {where} lacks a .png or .json member; rebuild the shard")
            meta = json.loads(s["json"])
            label = meta.get("label")
            batch.append({"key": s["__key__"], "index": int(meta["index"]),
                          "label": -1 if label is None else int(label), "image": decode_png(s["png"], where)})
            if len(batch) == self.batch_size:
                yield _collate_eval(batch)
                batch = []
        if batch:
            yield _collate_eval(batch)


def _collate_eval(batch: list[dict]) -> dict:
    return {
        "key": [b["key"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "image": _collate_images([b["image"] for b in batch]),
    }


def make_eval_loader(root: str | os.PathLike, dataset: str, split: str, *, batch_size: int, rank: int,
                     world_size: int, num_workers: int = 0) -> Iterable[dict]:
    """Batches ``{"key", "index", "label" (-1 = none), "image" uint8 (B,3,H,W)}`` of this
    rank's share; over all ranks every sample comes exactly once (last batch may be short)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    man = read_manifest(root, dataset, split)
    ds = EvalStream(shard_paths(root, dataset, split, man), [s["count"] for s in man["shards"]],
                    batch_size=batch_size, rank=rank, world_size=world_size)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      generator=torch.Generator().manual_seed(rank))


# --------------------------------------------------------------------------- random access
def load_images(root: str | os.PathLike, dataset: str, split: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Images (HxWx3 uint8) for the given sample keys; reads only the shards that hold them."""
    man = read_manifest(root, dataset, split)
    d = split_dir(root, dataset, split)
    wanted: dict[str, str] = {}  # stored key -> caller's key
    by_shard: dict[str, set[str]] = {}
    for k in keys:
        try:
            idx = int(k)
        except ValueError:
            raise KeyError(f"{k!r} is not a sample key of {d} (keys are zero-padded indices)") from None
        entry = next((s for s in man["shards"] if s["first_index"] <= idx <= s["last_index"]), None)
        if entry is None:
            raise KeyError(f"no shard of {d} holds key {k!r}")
        wanted[KEY_FORMAT % idx] = str(k)
        by_shard.setdefault(entry["name"], set()).add(KEY_FORMAT % idx)
    out: dict[str, np.ndarray] = {}
    for name, ks in by_shard.items():
        url = str(Path(d) / name)
        for s in _samples_of(url, None):
            if s["__key__"] in ks:
                out[wanted[s["__key__"]]] = decode_png(s["png"], f"{s['__key__']} in {url}")
    missing = set(wanted.values()) - set(out)
    if missing:
        raise KeyError(f"keys not found in {d}: {sorted(missing)[:10]} (skipped as unreadable at build time?)")
    return out
