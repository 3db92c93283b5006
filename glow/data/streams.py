"""Streams over the WebDataset shards written by :mod:`glow.data.shards`.

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
    No resampling, no shuffle; every sample exactly once over ranks x workers, and every
    shard read once in total whatever the world size: shards are dealt out to the (rank,
    worker) readers; with fewer shards than readers, the readers are capped by the shards
    (spread over the ranks) and the rest idle. No collectives are needed: ranks may get
    unequal counts, and the caller gathers unequal lengths and compares the total with the
    manifest. A truncated, corrupt or oversized shard, or one whose sample count differs
    from the manifest, raises :class:`ShardReadError` naming the file (reads are bounded:
    :mod:`glow.data.shard_read`); so does a training shard (the counts are checked there too).

Manifests: every constructor reads the split's manifest through the one reader
(:func:`glow.data.manifest.read_manifest`), or takes the one its caller already read
(``manifest=``), so a job reads it once.

Channels: a stream yields the manifest's channels (3 = RGB, 1 = grayscale) unless the
caller asks for a count (the model's ``in_channels``): a mismatch is an error unless the
conversion is allowed (:func:`check_channels`; gray is replicated, RGB becomes luma).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from glow.data.manifest import (  # noqa: F401  (read_manifest, manifest_hash: re-exported for callers)
    BUILD_COMMANDS,
    MANIFEST,
    ImageSpec,
    ShardError,
    check_shard_name,
    manifest_hash,
    read_manifest,
    split_dir,
)
from glow.data.shard_read import (
    ShardReadError,
    convert_channels,
    decode_png,
    iter_shard,
)
from glow.data.shards import KEY_FORMAT

__all__ = ["EvalStream", "ShardReadError", "TrainStream", "check_channels", "decode_png", "eval_dataloader",
           "fan_out_warning", "load_images", "make_eval_loader", "make_train_loader", "manifest_hash", "read_manifest",
           "shard_paths", "train_dataloader"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- manifest
def shard_paths(root: str | os.PathLike, dataset: str, split: str, manifest: dict | None = None) -> list[str]:
    """Paths of the split's shards, in manifest order (``manifest``: as :func:`read_manifest` gave it)."""
    man = manifest or read_manifest(root, dataset, split)
    d = split_dir(root, dataset, split)
    return [str(d / check_shard_name(s["name"], dataset, split, d / MANIFEST)) for s in man["shards"]]


def _shard_list(root: str | os.PathLike, dataset: str, split: str, man: dict) -> list["_Shard"]:
    """The manifest's shards with what a bounded read checks (name, bytes, count)."""
    return [_Shard(url, int(e["bytes"]), int(e["count"]))
            for url, e in zip(shard_paths(root, dataset, split, man), man["shards"])]


class _Shard(NamedTuple):
    """One manifest entry: where the shard is, its size in bytes and its sample count."""

    url: str
    nbytes: int
    count: int


# --------------------------------------------------------------------------- channels and fan-out
def check_channels(manifest: dict, where: str | os.PathLike, channels: int | None, convert: bool,
                   resolution: int | None = None) -> int:
    """The channel count a stream yields: the manifest's, or ``channels`` when asked and the
    conversion is allowed. A channel mismatch without ``convert``, or a ``resolution`` other
    than the manifest's, raises ShardError naming the shards and the model key."""
    spec = ImageSpec.of(manifest)
    if resolution is not None and resolution != spec.resolution:
        raise ShardError(f"shards {where} hold {spec.resolution}x{spec.resolution} images (per their manifest) but "
                         f"the model has model.image_size={resolution}: build the shards at the model's resolution")
    if channels is None or channels == spec.channels:
        return spec.channels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not convert:
        kinds = {1: "grayscale", 3: "RGB"}
        raise ShardError(
            f"shards {where} hold {kinds[spec.channels]} images ({spec.channels} channel(s), per their manifest) but "
            f"the model has model.in_channels={channels}: use {kinds[channels]} shards, or pass --convert-channels "
            f"to the evaluation to {'replicate gray to RGB' if spec.channels == 1 else 'convert RGB to luma'}")
    return channels


def fan_out_warning(root: str | os.PathLike, dataset: str, split: str, world_size: int,
                    num_workers: int, manifest: dict | None = None) -> str | None:
    """A warning when training readers (ranks x loader workers) outnumber the shards of a split,
    since readers then draw the same shards instead of disjoint ones; None when each reader
    gets its own shards. The message gives the rebuild command (a build command name only:
    never text copied from the manifest)."""
    man = manifest or read_manifest(root, dataset, split)
    readers, n_shards = world_size * max(1, num_workers), len(man["shards"])
    if readers <= n_shards:
        return None
    kind = (man.get("source") or {}).get("kind") if isinstance(man.get("source"), dict) else None
    kind = kind if kind in BUILD_COMMANDS or kind == "folder" else {"digits": "demo"}.get(kind, "COMMAND")
    per_shard = max(1, int(man["count"]) // readers)
    return (f"{readers} training readers ({world_size} ranks x {max(1, num_workers)} loader workers) share the "
            f"{n_shards} shard(s) of {split_dir(root, dataset, split)}: readers draw the same shards instead of "
            f"disjoint ones. Rebuild with at least {readers} shards: `python shards/build.py {kind} ... "
            f"--out {root} --samples-per-shard {per_shard} --overwrite` (see docs/cluster.md)")


# --------------------------------------------------------------------------- decoding
def _worker_split() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _samples_of(shard: "_Shard", spec: ImageSpec) -> Iterator[dict]:
    """Samples of one shard read with bounded memory (glow.data.shard_read), size and count as
    the manifest says; errors name the shard."""
    return iter_shard(shard.url, spec, expected_bytes=shard.nbytes, count=shard.count)


def _decode(s: dict, spec: ImageSpec, channels: int) -> np.ndarray:
    where = f"{s['__key__']} in {s['__url__']}"
    if "png" not in s:
        raise ShardReadError(f"sample {where} lacks a .png member; rebuild the shard")
    return convert_channels(decode_png(s["png"], where, spec), channels)


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# --------------------------------------------------------------------------- training
class _ResampledShards:
    """Infinite stream of ``{"shard": ...}`` drawn with replacement by a given rng."""

    def __init__(self, shards: Sequence[_Shard], rng: random.Random):
        self.shards, self.rng = list(shards), rng

    def __call__(self) -> Iterator[dict]:
        while True:
            yield {"shard": self.shards[self.rng.randrange(len(self.shards))]}


def _expand(src: Iterable[dict], spec: ImageSpec) -> Iterator[dict]:
    for item in src:
        yield from _samples_of(item["shard"], spec)


def _train_decode(src: Iterable[dict], rng: random.Random, hflip: bool, spec: ImageSpec,
                  channels: int) -> Iterator[np.ndarray]:
    for s in src:
        arr = _decode(s, spec, channels)
        if hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        yield arr


def _collate_images(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2)))


def _share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


class TrainStream(IterableDataset):
    """See the module docstring; built by :func:`make_train_loader`. What a shard holds and how a
    batch is made are the methods `expand`, `decode` and `collate` (`glow.features.streams`
    overrides them for vector shards); which shards a reader draws and every seed are fixed here."""

    def __init__(self, shards: Sequence, *, batch_size: int, seed: int, epoch: int, rank: int,
                 world_size: int, batches_per_epoch: int, shuffle_buffer: int, hflip: bool = False,
                 spec: ImageSpec | None = None, channels: int = 3):
        super().__init__()
        self.shards, self.spec, self.channels = list(shards), spec, channels
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch, self.hflip, self.shuffle_buffer = batches_per_epoch, hflip, shuffle_buffer

    def expand(self, src: Iterable[dict]) -> Iterator:
        """Drawn shards (``{"shard": ...}``) -> their samples."""
        return _expand(src, self.spec)

    def decode(self, src: Iterable, rng: random.Random) -> Iterator:
        """Shuffled samples -> the items of a batch (``rng``: this reader's flip stream)."""
        return _train_decode(src, rng, self.hflip, self.spec, self.channels)

    def collate(self, batch: list) -> torch.Tensor:
        return _collate_images(batch)

    def pipeline(self, worker: int, num_workers: int) -> wds.DataPipeline:
        n_splits = self.world_size * num_workers
        split = self.rank * num_workers + worker
        shards = self.shards[split::n_splits] if len(self.shards) >= n_splits else self.shards
        seed = int.from_bytes(hashlib.sha256(
            f"train:{self.seed}:{self.epoch}:{self.rank}:{worker}".encode()).digest()[:8], "big")
        shard_rng, shuffle_rng, flip_rng = (random.Random(seed + k) for k in range(3))
        n_batches = _share(self.batches_per_epoch, num_workers, worker)
        return wds.DataPipeline(
            _ResampledShards(shards, shard_rng),
            self.expand,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng),
            lambda src: self.decode(src, flip_rng),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=False),
        ).with_epoch(nbatches=n_batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, num_workers = _worker_split()
        if _share(self.batches_per_epoch, num_workers, worker) == 0:
            return iter(())
        return iter(self.pipeline(worker, num_workers))


def train_dataloader(ds: TrainStream, *, num_workers: int, skip_batches: int = 0) -> Iterable[torch.Tensor]:
    """The DataLoader of a training stream (it only interleaves the workers), without the
    ``skip_batches`` first batches. Its generator is explicit: creating the loader must not draw
    from the global torch RNG, or a resumed run (which creates one more loader) would get other
    training noise."""
    generator = torch.Generator().manual_seed(ds.seed * 1_000_003 + ds.epoch * 1009 + ds.rank)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                        generator=generator)
    if skip_batches:
        return _Skipped(loader, skip_batches, ds.batches_per_epoch)
    return loader


def make_train_loader(root: str | os.PathLike, dataset: str, split: str, *, batch_size: int, seed: int,
                      epoch: int, rank: int, world_size: int, num_workers: int = 0,
                      batches_per_epoch: int, hflip: bool = False, shuffle_buffer: int = 1000,
                      skip_batches: int = 0, channels: int | None = None, convert_channels: bool = False,
                      resolution: int | None = None, manifest: dict | None = None) -> Iterable[torch.Tensor]:
    """Exactly ``batches_per_epoch - skip_batches`` uint8 batches (B,C,H,W) for this rank,
    a deterministic function of all arguments (see the module docstring). C is the
    manifest's channels; ``channels`` asks for a given count (see :func:`check_channels`).
    ``manifest``: the split's manifest as :func:`read_manifest` gave it (read here if None).
    Shards whose manifest entry holds no sample (every item skipped at build time) are left
    out: resampling them would yield nothing."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size < 1 or batches_per_epoch < 0:
        raise ValueError(f"batch_size must be >= 1 and batches_per_epoch >= 0, got {batch_size}, {batches_per_epoch}")
    man = manifest or read_manifest(root, dataset, split)
    channels = check_channels(man, split_dir(root, dataset, split), channels, convert_channels, resolution)
    shards = [s for s in _shard_list(root, dataset, split, man) if s.count > 0]
    if not shards:
        raise ShardError(f"{split_dir(root, dataset, split) / MANIFEST}: no shard holds a sample; rebuild the shards")
    ds = TrainStream(shards, batch_size=batch_size, seed=seed, epoch=epoch,
                     rank=rank, world_size=world_size, batches_per_epoch=batches_per_epoch, hflip=hflip,
                     shuffle_buffer=shuffle_buffer, spec=ImageSpec.of(man), channels=channels)
    return train_dataloader(ds, num_workers=num_workers, skip_batches=skip_batches)


class _Skipped:
    def __init__(self, loader: DataLoader, skip: int, total: int):
        self.loader, self.skip, self.total = loader, skip, total

    def __len__(self) -> int:
        return max(0, self.total - self.skip)

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.skip, None)


# --------------------------------------------------------------------------- evaluation
class EvalStream(IterableDataset):
    """See the module docstring; built by :func:`make_eval_loader`. What a shard holds is the
    methods `items` and `collate` (`glow.features.streams` overrides them for vector shards);
    which reader reads which shard is fixed here."""

    def __init__(self, shards: Sequence, *, batch_size: int, rank: int, world_size: int,
                 spec: ImageSpec | None = None, channels: int = 3):
        super().__init__()
        self.shards, self.spec, self.channels = list(shards), spec, channels
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def my_shards(self, worker: int, num_workers: int) -> list:
        """This (rank, worker)'s shards: each shard goes to exactly one reader. With fewer
        shards than readers, shard j goes to reader ``j * readers // shards`` (spread over the
        ranks) and the other readers idle: every shard is read once whatever the world size."""
        n_splits = self.world_size * num_workers
        split = self.rank * num_workers + worker
        n = len(self.shards)
        if n >= n_splits:
            return self.shards[split::n_splits]
        return [s for j, s in enumerate(self.shards) if j * n_splits // n == split]

    def items(self, shard: _Shard) -> Iterator[dict]:
        """The samples of one shard as ``{"key", "index", "label" (-1 = none), "image"}``."""
        for s in _samples_of(shard, self.spec):
            index, label = _index_and_label(s)
            yield {"key": s["__key__"], "index": index, "label": -1 if label is None else label,
                   "image": _decode(s, self.spec, self.channels)}

    def collate(self, batch: list[dict]) -> dict:
        return _collate_eval(batch)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_split()
        batch: list[dict] = []
        for shard in self.my_shards(worker, num_workers):
            for item in self.items(shard):
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
        if batch:
            yield self.collate(batch)


def eval_dataloader(ds: EvalStream, *, num_workers: int) -> Iterable[dict]:
    """The DataLoader of an evaluation stream (in order; it only interleaves the workers)."""
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      generator=torch.Generator().manual_seed(ds.rank))


def _index_and_label(s: dict) -> tuple[int, int | None]:
    """A sample's index (its key as a number) and label (an integer or None) from its .json."""
    try:
        meta = json.loads(s["json"])
    except (KeyError, ValueError):
        meta = None
    label = meta.get("label") if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or type(meta.get("index")) is not int or meta["index"] != int(s["__key__"])
            or not (label is None or type(label) is int)):
        raise ShardReadError(f"sample {s['__key__']} in {s['__url__']} lacks a .json member with its index and an "
                             f"integer (or null) label; rebuild the shard")
    return meta["index"], label


def _collate_eval(batch: list[dict]) -> dict:
    return {
        "key": [b["key"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
        "image": _collate_images([b["image"] for b in batch]),
    }


def make_eval_loader(root: str | os.PathLike, dataset: str, split: str, *, batch_size: int, rank: int,
                     world_size: int, num_workers: int = 0, channels: int | None = None,
                     convert_channels: bool = False, resolution: int | None = None,
                     manifest: dict | None = None) -> Iterable[dict]:
    """Batches ``{"key", "index", "label" (-1 = none), "image" uint8 (B,C,H,W)}`` of this
    rank's share; over all ranks every sample comes exactly once (last batch may be short).
    C is the manifest's channels; ``channels`` asks for a given count (:func:`check_channels`).
    ``manifest``: the split's manifest as :func:`read_manifest` gave it (read here if None)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    man = manifest or read_manifest(root, dataset, split)
    channels = check_channels(man, split_dir(root, dataset, split), channels, convert_channels, resolution)
    ds = EvalStream(_shard_list(root, dataset, split, man), batch_size=batch_size, rank=rank,
                    world_size=world_size, spec=ImageSpec.of(man), channels=channels)
    return eval_dataloader(ds, num_workers=num_workers)


# --------------------------------------------------------------------------- random access
def load_images(root: str | os.PathLike, dataset: str, split: str, keys: Sequence[str],
                manifest: dict | None = None) -> dict[str, np.ndarray]:
    """Images (HxWx3 uint8, grayscale replicated, for display) for the given sample keys;
    reads only the shards that hold them (``manifest``: as :func:`read_manifest` gave it)."""
    man = manifest or read_manifest(root, dataset, split)
    spec = ImageSpec.of(man)
    shards = {Path(sh.url).name: sh for sh in _shard_list(root, dataset, split, man)}
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
        for s in _samples_of(shards[name], spec):
            if s["__key__"] in ks:
                out[wanted[s["__key__"]]] = _decode(s, spec, 3)
    missing = set(wanted.values()) - set(out)
    if missing:
        raise KeyError(f"keys not found in {d}: {sorted(missing)[:10]} (skipped as unreadable at build time?)")
    return out
