"""Readers for the benchmark sets of the OOD literature in their distributed formats.

* CIFAR-10 / CIFAR-100: the "python version" pickle batches, as torchvision downloads them
  (``<root>/cifar-10-batches-py/data_batch_1..5, test_batch``;
  ``<root>/cifar-100-python/train, test``). Each batch is a dict with ``b"data"`` (N x 3072
  uint8: the R, G and B planes of a 32x32 image, row-major) and ``b"labels"`` (CIFAR-10) or
  ``b"fine_labels"`` (CIFAR-100). The batches are pickles: they are read by an unpickler that
  builds only plain containers and numpy arrays, so a planted file cannot run code.
* MNIST / Fashion-MNIST: the IDX files (``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``
  and the ``-labels-idx1-ubyte`` files, optionally ``.gz``) under ``<root>/MNIST/raw/`` or
  ``<root>/FashionMNIST/raw/`` as torchvision lays them out. Magic numbers (2051 images,
  2049 labels), dimensions and lengths are checked. The 28x28 digits are padded with black
  (not resized) to the output resolution (32: a 2-pixel border), single channel, as the
  papers do.

Every error names the file and what was expected. ``root`` is the folder torchvision's
``root=`` argument would take.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from glow.shards import Source
from glow.sources import SourceError, array_source

__all__ = ["CIFAR", "IDX", "cifar_sources", "idx_sources", "load_cifar_batch", "read_idx"]

CIFAR = {
    "cifar10": {"dir": "cifar-10-batches-py", "labels": b"labels", "classes": 10,
                "files": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "description": "CIFAR-10 python batches (Krizhevsky 2009)"},
    "cifar100": {"dir": "cifar-100-python", "labels": b"fine_labels", "classes": 100,
                 "files": {"train": ["train"], "test": ["test"]},
                 "description": "CIFAR-100 python batches, fine labels (Krizhevsky 2009)"},
}
IDX = {
    "mnist": {"dir": "MNIST/raw", "description": "MNIST handwritten digits (LeCun et al. 1998), IDX files"},
    "fashion-mnist": {"dir": "FashionMNIST/raw", "description": "Fashion-MNIST (Xiao et al. 2017), IDX files"},
}
IDX_FILES = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


# --------------------------------------------------------------------------- CIFAR
class _BatchUnpickler(pickle.Unpickler):
    """Builds containers, bytes, numbers and numpy arrays only; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def load_cifar_batch(path: Path, labels_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of one CIFAR python batch."""
    if not path.is_file():
        raise SourceError(f"CIFAR batch file missing: {path} (expected the torchvision 'python version' layout)")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as exn:
        raise SourceError(f"cannot read {path} as a CIFAR python batch ({type(exn).__name__}: {exn})") from None
    if not isinstance(batch, dict) or b"data" not in batch or labels_key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise SourceError(f"{path} holds {found}; expected a dict with b'data' and {labels_key!r}")
    data, labels = batch[b"data"], np.asarray(batch[labels_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise SourceError(f"{path}: b'data' is {type(data).__name__} {getattr(data, 'dtype', '')} {shape}; "
                          f"expected a uint8 array N x 3072 (R, G, B planes of 32x32)")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise SourceError(f"{path}: {labels_key!r} has shape {labels.shape} ({labels.dtype}); expected "
                          f"{data.shape[0]} integer labels")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise SourceError(f"{path}: labels range {labels.min()}..{labels.max()}; expected 0..{classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _find_dir(root: Path, sub: str, what: str) -> Path:
    if (root / sub).is_dir():
        return root / sub
    raise SourceError(f"no {what} under {root}: expected {root / sub}/ (pass the folder torchvision's root= takes)")


def cifar_sources(name: str, root: str | os.PathLike, resolution: int = 32, valid: int = 0,
                  splits: Sequence[str] | None = None) -> list[Source]:
    """CIFAR-10 or CIFAR-100 train/test (and ``valid``: the last ``valid`` train images, held out)."""
    spec, root = CIFAR[name], Path(root)
    d = _find_dir(root, spec["dir"], f"{name} batches")
    wanted = set(splits or ("train", "valid", "test"))
    loaded = {}
    for split, files in spec["files"].items():
        if split not in wanted and not (split == "train" and valid and "valid" in wanted):
            continue
        parts = [load_cifar_batch(d / f, spec["labels"], spec["classes"]) for f in files]
        loaded[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    if valid and "train" in loaded:
        x, y = loaded["train"]
        if not 0 < valid < len(x):
            raise SourceError(f"--valid {valid}: must be between 1 and {len(x) - 1} (train holds {len(x)})")
        loaded["train"], loaded["valid"] = (x[:-valid], y[:-valid]), (x[-valid:], y[-valid:])
    out = []
    for split, (x, y) in loaded.items():
        if splits is not None and split not in splits:
            continue
        settings = {
            "resolution": int(resolution),
            "preprocessing": {"crop": None, "resize": None if resolution == 32 else int(resolution),
                              "interpolation": None if resolution == 32 else "bilinear (Pillow Image.resize)",
                              "valid": {"held_out_of_train": int(valid), "which": "the last images"}},
            "source": {"kind": name, "description": spec["description"], "dir": str(d.resolve()),
                       "files": spec["files"]["test" if split == "test" else "train"]},
        }
        out.append(array_source(name, split, x, y, resolution, settings, f"{spec['dir']}/{split}"))
    return out


# --------------------------------------------------------------------------- IDX
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
            n = int(np.prod(dims))
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
    d = _find_dir(root, spec["dir"], f"{name} IDX files")
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
