"""MNIST / Fashion-MNIST: the IDX files as torchvision lays them out.

``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte`` and the ``-labels-idx1-ubyte`` files,
optionally ``.gz``, under ``<root>/MNIST/raw/`` or ``<root>/FashionMNIST/raw/``. Magic numbers
(2051 images, 2049 labels), dimensions and lengths are checked; the size the dimensions declare
is at most :data:`MAX_IDX_BYTES` and is checked before anything is read (or inflated), and no
more than that is ever read. The 28x28 images are padded with
black (not resized) to the output resolution (32: a 2-pixel border), single channel, as the
papers do. Every error names the file and what was expected.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from glow.data.shards import Source
from glow.data.sources.cifar import find_dir
from glow.data.sources.images import SourceError

__all__ = ["IDX", "idx_sources", "pad_center", "read_idx"]


IDX = {
    "mnist": {"dir": "MNIST/raw", "description": "MNIST handwritten digits (LeCun et al. 1998), IDX files"},
    "fashion-mnist": {"dir": "FashionMNIST/raw", "description": "Fashion-MNIST (Xiao et al. 2017), IDX files"},
}


IDX_FILES = {"train": "train", "test": "t10k"}


IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# The largest file, train-images-idx3-ubyte, holds 60,000 x 28 x 28 = 47,040,000 bytes.
MAX_IDX_BYTES = 64 << 20


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (images: magic 2051, N x rows x cols; labels: 2049, N)."""
    ndim = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}[magic]
    try:
        with _open_idx(path) as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 or int.from_bytes(head[:4], "big") != magic:
                got = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
                raise SourceError(f"{path}: magic number {got}, expected {magic} "
                                  f"({'images' if magic == IMAGES_MAGIC else 'labels'} IDX file)")
            if len(head) < 4 + 4 * ndim:
                raise SourceError(f"{path}: truncated header")
            dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
            n = math.prod(dims)
            if n > MAX_IDX_BYTES:
                raise SourceError(f"{path}: header dimensions {dims} declare {n} bytes, more than the {MAX_IDX_BYTES} "
                                  f"of any MNIST-style file; the file is corrupt or not an IDX file")
            data = f.read(n + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exn:
        raise SourceError(f"cannot read {path} ({type(exn).__name__}: {exn})") from None
    if len(data) != n:
        what = "truncated" if len(data) < n else "longer than its header says"
        raise SourceError(f"{path}: {what}: header {dims} needs {n} bytes, found {min(len(data), n)}"
                          f"{'' if len(data) < n else '+'}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _find_idx(d: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (d / name).is_file():
            return d / name
    raise SourceError(f"IDX file missing: expected {d / stem} (or {stem}.gz)")


def pad_center(img: np.ndarray, resolution: int) -> np.ndarray:
    """HxW uint8 centred on a black ``resolution`` x ``resolution`` canvas, as H x W x 1."""
    h, w = img.shape
    top, left = (resolution - h) // 2, (resolution - w) // 2
    out = np.zeros((resolution, resolution, 1), np.uint8)
    out[top:top + h, left:left + w, 0] = img
    return out


def _process_gray(payload: tuple, *, resolution: int) -> tuple:
    index, arr, source, label = payload
    return index, pad_center(arr, resolution), {"source": source, "label": label}


def idx_sources(name: str, root: str | os.PathLike, resolution: int = 32,
                splits: Sequence[str] | None = None) -> list[Source]:
    """MNIST or Fashion-MNIST train/test, padded to ``resolution``, one channel."""
    spec, root = IDX[name], Path(root)
    d = find_dir(root, spec["dir"], f"{name} IDX files")
    out = []
    for split, prefix in IDX_FILES.items():
        if splits is not None and split not in splits:
            continue
        ipath, lpath = _find_idx(d, f"{prefix}-images-idx3-ubyte"), _find_idx(d, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(ipath, IMAGES_MAGIC), read_idx(lpath, LABELS_MAGIC)
        if len(images) != len(labels):
            raise SourceError(f"{ipath} holds {len(images)} images but {lpath} {len(labels)} labels")
        if images.shape[1] > resolution or images.shape[2] > resolution:
            raise SourceError(f"{ipath}: images are {images.shape[1]}x{images.shape[2]}, larger than the output "
                              f"resolution {resolution}; images are padded, never resized")
        if labels.size and labels.max() > 9:
            raise SourceError(f"{lpath}: labels up to {labels.max()}; expected 0..9")
        settings = {
            "resolution": int(resolution),
            "preprocessing": {"pad": f"centred on a black {resolution}x{resolution} canvas (no resize)",
                              "crop": None, "resize": None, "interpolation": None},
            "source": {"kind": name, "description": spec["description"],
                       "files": [str(ipath.resolve()), str(lpath.resolve())]},
        }
        h = hashlib.sha256(images.tobytes())
        h.update(labels.tobytes())
        src = Source(name, split, len(images), _GrayPayloads(images, labels, ipath.name),
                     functools.partial(_process_gray, resolution=int(resolution)), settings,
                     h.hexdigest()[:16], channels=1)
        out.append(src)
    return out


class _GrayPayloads:
    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str):
        self.images, self.labels, self.source = images, labels, source

    def __call__(self, start: int, stop: int) -> list:
        return [(i, self.images[i], f"{self.source}[{i}]", int(self.labels[i])) for i in range(start, stop)]
