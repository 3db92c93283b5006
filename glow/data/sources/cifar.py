"""CIFAR-10 / CIFAR-100: the "python version" pickle batches, as torchvision downloads them.

``<root>/cifar-10-batches-py/data_batch_1..5, test_batch``; ``<root>/cifar-100-python/train, test``.
Each batch is a dict with ``b"data"`` (N x 3072 uint8: the R, G and B planes of a 32x32 image,
row-major) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The batches are
pickles: they are read by an unpickler that builds only plain containers and numpy arrays, so a
planted file cannot run code. Every error names the file and what was expected; ``root`` is the
folder torchvision's ``root=`` argument would take.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from glow.data.shards import Source
from glow.data.sources.images import SourceError, array_source

__all__ = ["CIFAR", "cifar_sources", "find_dir", "load_cifar_batch"]


CIFAR = {
    "cifar10": {"dir": "cifar-10-batches-py", "labels": b"labels", "classes": 10,
                "files": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "description": "CIFAR-10 python batches (Krizhevsky 2009)"},
    "cifar100": {"dir": "cifar-100-python", "labels": b"fine_labels", "classes": 100,
                 "files": {"train": ["train"], "test": ["test"]},
                 "description": "CIFAR-100 python batches, fine labels (Krizhevsky 2009)"},
}


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


def find_dir(root: Path, sub: str, what: str) -> Path:
    if (root / sub).is_dir():
        return root / sub
    raise SourceError(f"no {what} under {root}: expected {root / sub}/ (pass the folder torchvision's root= takes)")


def cifar_sources(name: str, root: str | os.PathLike, resolution: int = 32, valid: int = 0,
                  splits: Sequence[str] | None = None) -> list[Source]:
    """CIFAR-10 or CIFAR-100 train/test (and ``valid``: the last ``valid`` train images, held out)."""
    spec, root = CIFAR[name], Path(root)
    d = find_dir(root, spec["dir"], f"{name} batches")
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
