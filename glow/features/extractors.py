"""Frozen pretrained image networks that turn an image into a feature vector.

Kirichenko et al. (2020, section 8) train a flow on the embeddings of an ImageNet classifier
(1,792-d: EfficientNet-B4's pooled features, inferred from the dimension; their extraction
script is not published). Two extractors:

``inception``
    pytorch-fid's Inception-v3, pool3 (2,048-d): the network FID uses (`glow.evaluation.fid`),
    with its preprocessing: pixels / 255, bilinear resize to 299x299, scaled to [-1, 1].
``efficientnet_b4``
    torchvision's EfficientNet-B4 (IMAGENET1K_V1), global-average-pooled output of its last
    stage (1,792-d, before dropout and the classifier), with the preprocessing its weights
    declare: bicubic resize of the short side to 384 (antialiased), centre crop 380, pixels /
    255, ImageNet mean and standard deviation.

Grayscale images are replicated to three channels. Weights are never downloaded (compute nodes
are offline): they come from a file, read once with a size cap, without following links; its
sha256 must match the expected one (the published prefix, from the file name as torch hub
names it, unless the caller states another, e.g. for a randomly initialised network in a demo);
the bytes that were checked are then loaded with ``torch.load(weights_only=True)``, so a file
holding anything but tensors (a pickle payload) is refused, never run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glow.errors import BadArgument, CheckpointMismatch, CheckpointMissing
from glow.evaluation.fid import FID_WEIGHTS_FILE, inception_features
from glow.evaluation.inception import FID_WEIGHTS_URL, Pool3, fid_inception_v3
from glow.files import atomic_write_bytes, read_bytes

__all__ = ["EXTRACTORS", "ExtractorSpec", "FeatureExtractor", "WeightsMismatch", "load_extractor", "weights_path",
           "write_random_weights"]

log = logging.getLogger(__name__)
MAX_WEIGHTS_BYTES = 1 << 30  # the real files are ~92 MB (Inception) and ~75 MB (EfficientNet-B4)


class WeightsMismatch(CheckpointMismatch):
    """A weights file whose sha256 is not the expected one (exit code 5)."""


@dataclass(frozen=True)
class ExtractorSpec:
    """What identifies an extractor: its name, output dimension, the weights it expects and
    how it prepares images (recorded in every vector manifest)."""

    name: str
    dim: int
    weights_file: str  # the file name torch hub / pytorch-fid give the published weights
    weights_url: str  # where to fetch them on a machine with internet access
    preprocessing: str
    build: Callable[[dict], nn.Module]
    features: Callable[[nn.Module, torch.Tensor, torch.device], torch.Tensor]
    fresh: Callable[[], nn.Module] | None = None  # the network randomly initialised (`write_random_weights`)

    @property
    def published_sha256(self) -> str:
        """The sha256 prefix in the published file name (torch hub's convention)."""
        return re.search(r"-([0-9a-f]{8,64})\.pth$", self.weights_file).group(1)


# --------------------------------------------------------------------------- the two networks
def _build_inception(state_dict: dict) -> nn.Module:
    net = fid_inception_v3()  # the network FID uses (glow.evaluation.inception)
    net.load_state_dict(state_dict)
    return Pool3(net)


def _fresh_efficientnet_b4() -> nn.Module:
    from torchvision.models import efficientnet_b4

    return efficientnet_b4(weights=None)


def _inception_features(net: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    feats = inception_features(images, device, batch_size=images.shape[0], model=net)
    return torch.from_numpy(feats.astype(np.float32))  # float32 values in float64: exact


def _build_efficientnet_b4(state_dict: dict) -> nn.Module:
    net = _fresh_efficientnet_b4()
    net.load_state_dict(state_dict)
    return net


def _efficientnet_features(net: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from torchvision.models import EfficientNet_B4_Weights

    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = EfficientNet_B4_Weights.IMAGENET1K_V1.transforms()(images.to(device))
    return torch.flatten(net.avgpool(net.features(x)), 1).float().cpu()


EXTRACTORS = {
    "inception": ExtractorSpec(
        name="inception", dim=2048, weights_file=FID_WEIGHTS_FILE, weights_url=FID_WEIGHTS_URL,
        preprocessing="pytorch-fid Inception-v3 pool3: x/255, bilinear resize to 299x299 (align_corners=False), "
                      "2x-1; grayscale replicated to RGB",
        build=_build_inception, features=_inception_features, fresh=fid_inception_v3),
    "efficientnet_b4": ExtractorSpec(
        name="efficientnet_b4", dim=1792, weights_file="efficientnet_b4_rwightman-23ab8bcd.pth",
        weights_url="https://download.pytorch.org/models/efficientnet_b4_rwightman-23ab8bcd.pth",
        preprocessing="torchvision EfficientNet_B4_Weights.IMAGENET1K_V1 transforms: resize short side to 384 "
                      "(bicubic, antialias) on uint8, centre crop 380, x/255, ImageNet mean/std; features: "
                      "global average pool of the last stage (before dropout and classifier); grayscale "
                      "replicated to RGB",
        build=_build_efficientnet_b4, features=_efficientnet_features, fresh=_fresh_efficientnet_b4),
}


# --------------------------------------------------------------------------- weights
def weights_path(spec: ExtractorSpec, given: str | os.PathLike | None = None) -> Path:
    """``given``, or the torch hub cache file under its published name; CheckpointMissing (saying
    where to put the file) when it is not there: nothing is downloaded."""
    if given is not None:
        path, where = Path(given), f"the path given ({given})"
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
        where = f"the torch hub cache ({path}; set by $TORCH_HOME)"
    if not path.is_file():
        raise CheckpointMissing(f"{spec.name} weights not found at {where}; this machine does not download them: "
                                f"fetch {spec.weights_url} elsewhere and copy it to {path}, or pass its path")
    return path


def write_random_weights(name: str, path: str | os.PathLike, seed: int) -> str:
    """Write the extractor ``name`` randomly initialised (torch seed ``seed``) as a weights file
    at ``path`` (atomically) and return its sha256, to pass as the expected one. For demos and
    tests where the published weights are not at hand: the features of a random network are
    not the paper's, and every vector manifest built from it says so (not ``official``). The
    same seed gives the same bytes, so a rerun resumes; an existing file with other bytes is
    refused (BadArgument), never replaced."""
    spec = EXTRACTORS[name]
    if spec.fresh is None:
        raise ValueError(f"extractor {name!r} has no random initialisation")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = spec.fresh().state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if os.path.lexists(path):
        if read_bytes(path, MAX_WEIGHTS_BYTES) != data:
            raise BadArgument(f"{path} exists and is not the random initialisation of {name} with seed {seed}: "
                              "name another file for the random weights")
    else:
        atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_sha256(path: Path, data: bytes, expected: str) -> str:
    actual = hashlib.sha256(data).hexdigest()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise WeightsMismatch(f"expected sha256 {expected!r} is not 8 to 64 lowercase hex digits")
    if not actual.startswith(expected):
        raise WeightsMismatch(f"{path} has sha256 {actual}, expected {expected}...: not the weights asked for; "
                              "replace the file, or state the sha256 of the weights you mean to use")
    return actual


def _brief(err: Exception) -> str:
    """An exception's text on one line, at most 200 characters (messages stay one line)."""
    return (" ".join(str(err).split()) or type(err).__name__)[:200]


class FeatureExtractor:
    """A loaded extractor: ``extractor(images)`` -> float32 (B, dim) on the CPU, for uint8
    images (B, C, H, W), C = 1 or 3. ``weights_sha256`` is the full sha256 of the file used."""

    def __init__(self, spec: ExtractorSpec, net: nn.Module, weights_sha256: str, expected_sha256: str,
                 device: torch.device):
        self.spec, self.net = spec, net.eval().to(device)
        self.weights_sha256, self.expected_sha256, self.device = weights_sha256, expected_sha256, device
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def official(self) -> bool:
        """Whether the file is the published one (its sha256 starts with the published prefix)."""
        return self.weights_sha256.startswith(self.spec.published_sha256)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        with torch.inference_mode():
            feats = self.spec.features(self.net, images, self.device)
        if feats.shape != (images.shape[0], self.spec.dim) or feats.dtype != torch.float32:
            raise RuntimeError(f"{self.spec.name} gave {feats.dtype} {tuple(feats.shape)}, "
                               f"expected float32 ({images.shape[0]}, {self.spec.dim})")
        return feats


def load_extractor(name: str, weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                   expected_sha256: str | None = None) -> FeatureExtractor:
    """The extractor ``name`` (see `EXTRACTORS`) with its weights from ``weights`` (default: the
    torch hub cache file). ``expected_sha256`` (full or a prefix of at least 8 hex digits)
    defaults to the published prefix. Refused, with one line naming the file: a missing file
    (CheckpointMissing), another sha256 (WeightsMismatch), a file that is not plain tensors or
    does not fit the network (CheckpointMismatch); all exit code 5."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; known: {sorted(EXTRACTORS)}")
    spec = EXTRACTORS[name]
    path = weights_path(spec, weights)
    data = read_bytes(path, MAX_WEIGHTS_BYTES)  # no link followed; what is hashed is what is loaded
    expected = (expected_sha256 or spec.published_sha256).lower()
    actual = _check_sha256(path, data, expected)
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling refusal or a corrupt file
        raise CheckpointMismatch(f"cannot load {path} as plain tensors ({_brief(err)}): refused") from None
    try:
        net = spec.build(state_dict)
    except (RuntimeError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointMismatch(f"{path} does not hold {spec.name} weights ({_brief(err)})") from None
    log.info("%s weights %s (sha256 %s%s)", name, path, actual[:16],
             "" if actual.startswith(spec.published_sha256) else ", not the published file")
    return FeatureExtractor(spec, net, actual, expected, torch.device(device))
