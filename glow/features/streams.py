"""Streams over vector shards (`glow.features.vector_shards`), for the flow on features.

The same streams as for images (`glow.data.streams`), with vector shards in place of tar
shards: the training stream draws shards with replacement per (rank, worker), shuffles
records in a buffer and batches them, every choice seeded by (seed, epoch, rank, worker),
so the same arguments give the same batches (`make_vector_train_loader`, the signature of
`glow.data.streams.make_train_loader` without the image options); the evaluation stream
gives every record exactly once over all ranks and workers, each shard read whole by one
reader (`make_vector_eval_loader`). Vectors are float32 ``(B, dim)``; no dequantization, no
flip. Every shard is read through `read_vector_shard` (no link followed, size capped, sha256
checked against the manifest before it is parsed). A sample's key is the key of the image
its vector was computed from, so the dumps of an image flow and of a features flow line up.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from glow.data.shards import KEY_FORMAT, MANIFEST, split_dir
from glow.data.streams import EvalStream, TrainStream, eval_dataloader, train_dataloader
from glow.features.vector_shards import (
    VectorShardError,
    read_vector_manifest,
    read_vector_shard,
)

__all__ = ["make_vector_eval_loader", "make_vector_train_loader", "vector_manifest"]


class _VectorShard(NamedTuple):
    """One manifest entry of a vector split: the file, its entry (size, sha256, count) and the dimension."""

    path: str
    entry: dict
    dim: int


def vector_manifest(root: str | os.PathLike, dataset: str, split: str, dim: int | None = None) -> dict:
    """The split's complete vector manifest; with ``dim`` (the model's ``model.dim``), refused
    (VectorShardError, exit 4) when its vectors have another dimension."""
    man = read_vector_manifest(root, dataset, split)
    if dim is not None and man["dim"] != dim:
        raise VectorShardError(f"vectors {split_dir(root, dataset, split)} have dimension {man['dim']} (extractor "
                               f"{man.get('extractor')}) but the model has model.dim={dim}: set model.dim={man['dim']} "
                               "or use the features of the extractor the model was made for")
    return man


def _shards(root, dataset: str, split: str, man: dict) -> list[_VectorShard]:
    d = split_dir(root, dataset, split)
    return [_VectorShard(str(d / e["name"]), e, int(man["dim"])) for e in man["shards"]]


def _records(shard: _VectorShard) -> np.ndarray:
    return read_vector_shard(shard.path, shard.entry, shard.dim)


class VectorTrainStream(TrainStream):
    """`glow.data.streams.TrainStream` over vector shards: records instead of images."""

    def expand(self, src: Iterable[dict]) -> Iterator[np.ndarray]:
        for item in src:
            yield from _records(item["shard"])["vector"]

    def decode(self, src: Iterable[np.ndarray], rng: random.Random) -> Iterable[np.ndarray]:
        return src

    def collate(self, batch: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(batch))


class VectorEvalStream(EvalStream):
    """`glow.data.streams.EvalStream` over vector shards: batches hold ``"vector"`` (B, dim)."""

    def items(self, shard: _VectorShard) -> Iterator[dict]:
        for record in _records(shard):
            index = int(record["index"])
            yield {"key": KEY_FORMAT % index, "index": index, "label": int(record["label"]),
                   "vector": record["vector"]}

    def collate(self, batch: list[dict]) -> dict:
        return {"key": [b["key"] for b in batch],
                "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
                "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
                "vector": torch.from_numpy(np.stack([b["vector"] for b in batch]))}


def make_vector_train_loader(root: str | os.PathLike, dataset: str, split: str, *, batch_size: int, seed: int,
                             epoch: int, rank: int, world_size: int, num_workers: int = 0, batches_per_epoch: int,
                             shuffle_buffer: int = 1000, skip_batches: int = 0, dim: int | None = None,
                             manifest: dict | None = None) -> Iterable[torch.Tensor]:
    """Exactly ``batches_per_epoch - skip_batches`` float32 batches (B, dim) for this rank, a
    deterministic function of all arguments (as `glow.data.streams.make_train_loader`).
    ``dim``: the model's, checked against the manifest; ``manifest``: already read."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if batch_size < 1 or batches_per_epoch < 0:
        raise ValueError(f"batch_size must be >= 1 and batches_per_epoch >= 0, got {batch_size}, {batches_per_epoch}")
    man = manifest or vector_manifest(root, dataset, split, dim)
    shards = [s for s in _shards(root, dataset, split, man) if s.entry["count"] > 0]
    if not shards:
        raise VectorShardError(f"{split_dir(root, dataset, split) / MANIFEST}: no shard holds a vector; rebuild them")
    ds = VectorTrainStream(shards, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                           batches_per_epoch=batches_per_epoch, shuffle_buffer=shuffle_buffer)
    return train_dataloader(ds, num_workers=num_workers, skip_batches=skip_batches)


def make_vector_eval_loader(root: str | os.PathLike, dataset: str, split: str, *, batch_size: int, rank: int,
                            world_size: int, num_workers: int = 0, dim: int | None = None,
                            manifest: dict | None = None) -> Iterable[dict]:
    """Batches ``{"key", "index", "label" (-1 = none), "vector" float32 (B, dim)}`` of this rank's
    share; over all ranks every record comes exactly once (the last batch may be short)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    man = manifest or vector_manifest(root, dataset, split, dim)
    ds = VectorEvalStream(_shards(root, dataset, split, man), batch_size=batch_size, rank=rank,
                          world_size=world_size)
    return eval_dataloader(ds, num_workers=num_workers)
