"""Pictures and a cheap extractor for the feature-extraction tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from glow.data.shards import build
from glow.data.sources.images import array_source
from glow.features import extractors
from tests.helpers.models import smooth_images


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_pictures(root: Path, n: int, per_shard: int) -> np.ndarray:
    """`pics/test`: n smooth colour images in shards of ``per_shard``, labels 0..2; returns the images."""
    images = smooth_images(n, seed=0)
    settings = {"kind": "pics", "resolution": 32, "channels": 3}
    build(array_source("pics", "test", images, np.arange(n) % 3, 32, settings, "pics"), root,
          samples_per_shard=per_shard, progress=False)
    return images


def _linear_build(state_dict: dict) -> torch.nn.Module:
    net = torch.nn.Linear(3, 4)
    net.load_state_dict(state_dict)
    return net


def _linear_features(net, images, device):
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    return net(x.float().mean((2, 3)) / 255).float()


LINEAR = extractors.ExtractorSpec(name="pixel_linear", dim=4, weights_file="pixel_linear-0badc0de.pth",
                                  weights_url="(made by the test)", preprocessing="mean pixel / 255, then linear",
                                  build=_linear_build, features=_linear_features)
