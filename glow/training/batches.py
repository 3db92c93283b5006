"""What the trainer does differently for images (a Glow) and for feature vectors (a flow on
vectors, ``model.kind: tabular``): which shards it reads and checks, how a batch becomes the
model's input, and how per-sample log-densities become the bits/dim it minimises.

`training_data(cfg)` picks one of two objects with the same methods, so the training loop has no
branch on the kind:

`ImageBatches`
    Image shards (`glow.data.streams.make_train_loader`); uint8 pixels are quantized to
    ``n_bits`` and dequantized with uniform noise from the torch RNG (accelerate saves it per
    rank, so resuming is exact), optionally perturbed first (``data.perturb_prob``); the loss is
    discrete bits/dim, a code length. Sample grids are drawn.
`VectorBatches`
    Vector shards (`glow.features.streams.make_vector_train_loader`): float32 vectors go to the
    model as they are (no quantization, no noise); the loss is continuous bits/dim
    (`glow.model.tabular_config.continuous_bits_per_dim`: a differential entropy rate, which
    may be negative). There is nothing to draw a sample grid of.

Before anything is written, `check` holds the model against its data and refuses (DataKindMismatch,
exit 4) a model whose kind does not match what the manifest says the split holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from glow.config import Config
from glow.data.manifest import MAX_MANIFEST_BYTES, manifest_path, split_dir
from glow.data.streams import (
    check_channels,
    fan_out_warning,
    make_train_loader,
    read_manifest,
)
from glow.errors import DataError
from glow.features.streams import make_vector_train_loader, vector_manifest
from glow.features.vector_shards import KIND as VECTORS
from glow.files import read_json
from glow.model.likelihood import bits_per_dim, perturb_pixels, preprocess
from glow.model.tabular_config import TabularFlowConfig, continuous_bits_per_dim

__all__ = ["DataKindMismatch", "ImageBatches", "TrainingData", "VectorBatches", "training_data"]

Noise = Callable[[torch.Size], torch.Tensor]  # shape -> uniform [0, 1) noise on the model's device


class DataKindMismatch(DataError, ValueError):
    """The training split holds images and the model is a flow on vectors, or the reverse (exit 4)."""


def _holds_vectors(root: str | os.PathLike, dataset: str, split: str) -> bool | None:
    """Whether the split's manifest declares vectors (None: no readable manifest; the kind's own
    reader then says what is wrong)."""
    try:
        man = read_json(manifest_path(root, dataset, split), MAX_MANIFEST_BYTES)
    except (OSError, ValueError):
        return None
    return isinstance(man, dict) and man.get("kind") == VECTORS


class TrainingData:
    """What both kinds share: the config they read (subclasses add the methods the trainer calls)."""

    samples = True  # whether the trainer draws sample grids

    def __init__(self, cfg: Config):
        self.cfg = cfg


class ImageBatches(TrainingData):
    """Image shards for a Glow (see the module docstring)."""

    def check(self) -> None:
        """The image shards exist, are complete and fit the model (exit 4 otherwise)."""
        c, m = self.cfg.data, self.cfg.model
        where = split_dir(c.root, c.dataset, c.split)
        if _holds_vectors(c.root, c.dataset, c.split):
            raise DataKindMismatch(f"{where} holds feature vectors but model.kind is glow: train a flow on them with "
                                   "model.kind=tabular (e.g. --config demo_features), or point data.root at image "
                                   "shards")
        check_channels(read_manifest(c.root, c.dataset, c.split), where, m.in_channels, False, m.image_size)

    def loader(self, *, batch_size: int, epoch: int, skip: int, rank: int, world_size: int) -> Iterable[torch.Tensor]:
        c, m = self.cfg.data, self.cfg.model
        return make_train_loader(
            c.root, c.dataset, c.split, batch_size=batch_size, seed=self.cfg.train.seed, epoch=epoch, rank=rank,
            world_size=world_size, num_workers=c.num_workers, batches_per_epoch=c.batches_per_epoch, hflip=c.hflip,
            shuffle_buffer=c.shuffle_buffer, skip_batches=skip, channels=m.in_channels, resolution=m.image_size)

    def init_input(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        """The model input of ActNorm's data-dependent init pass: dequantized, never perturbed."""
        return preprocess(x, self.cfg.model.n_bits, noise(x.shape))

    def train_input(self, x: torch.Tensor) -> torch.Tensor:
        """The model input of a training batch (on the device): perturbed if asked, dequantized."""
        if self.cfg.data.perturb_prob > 0:
            x = perturb_pixels(x, self.cfg.data.perturb_prob)
        return preprocess(x, self.cfg.model.n_bits, torch.rand(x.shape, device=x.device))

    def bits_per_dim(self, log_p_y: torch.Tensor) -> torch.Tensor:
        m = self.cfg.model
        return bits_per_dim(log_p_y, m.n_dims, m.n_bits)

    def example(self, n: int, device: torch.device) -> torch.Tensor:
        """Zeros of the shape of ``n`` model inputs."""
        m = self.cfg.model
        return torch.zeros(n, m.in_channels, m.image_size, m.image_size, device=device)

    def fan_out_warning(self, world_size: int) -> str | None:
        c = self.cfg.data
        return fan_out_warning(c.root, c.dataset, c.split, world_size, c.num_workers)


class VectorBatches(TrainingData):
    """Vector shards for a flow on features (see the module docstring)."""

    samples = False

    def check(self) -> None:
        """The vector shards exist, are complete and have the model's dimension (exit 4 otherwise)."""
        c = self.cfg.data
        where = split_dir(c.root, c.dataset, c.split)
        if _holds_vectors(c.root, c.dataset, c.split) is False:
            raise DataKindMismatch(
                f"{where} holds images but model.kind is tabular (a flow on feature vectors): extract features first "
                f"(glow-shards features --from {c.root} --split {c.dataset}/{c.split} --extractor ... --out FEATURES) "
                "and set data.root=FEATURES")
        vector_manifest(c.root, c.dataset, c.split, self.cfg.model.dim)

    def loader(self, *, batch_size: int, epoch: int, skip: int, rank: int, world_size: int) -> Iterable[torch.Tensor]:
        c = self.cfg.data
        return make_vector_train_loader(
            c.root, c.dataset, c.split, batch_size=batch_size, seed=self.cfg.train.seed, epoch=epoch, rank=rank,
            world_size=world_size, num_workers=c.num_workers, batches_per_epoch=c.batches_per_epoch,
            shuffle_buffer=c.shuffle_buffer, skip_batches=skip, dim=self.cfg.model.dim)

    def init_input(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        return x

    def train_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def bits_per_dim(self, log_p_y: torch.Tensor) -> torch.Tensor:
        return continuous_bits_per_dim(log_p_y, self.cfg.model.dim)

    def example(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n, self.cfg.model.dim, device=device)

    def fan_out_warning(self, world_size: int) -> str | None:
        c = self.cfg.data
        man = vector_manifest(c.root, c.dataset, c.split)
        readers, n_shards = world_size * max(1, c.num_workers), len(man["shards"])
        if readers <= n_shards:
            return None
        return (f"{readers} training readers ({world_size} ranks x {max(1, c.num_workers)} loader workers) share the "
                f"{n_shards} vector shard(s) of {Path(split_dir(c.root, c.dataset, c.split))}: readers draw the same "
                f"shards instead of disjoint ones. A features split has one shard per image shard: rebuild the image "
                f"shards with at least {readers} shards, then extract the features again")


def training_data(cfg: Config) -> ImageBatches | VectorBatches:
    """The training data of ``cfg``'s model kind: `VectorBatches` for a flow on vectors, else `ImageBatches`."""
    return VectorBatches(cfg) if isinstance(cfg.model, TabularFlowConfig) else ImageBatches(cfg)
