"""SVHN cropped digits (format 2): the ``*_32x32.mat`` files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from glow.data.shards import Source
from glow.data.sources.images import SourceError, array_source

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def load_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images N x 32 x 32 x 3 uint8, labels N int64 with 10 -> 0)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exn:
        raise SourceError(f"cannot read {path} as a MATLAB file ({exn}); expected SVHN's {path.name}") from None
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise SourceError(f"{path} has keys {found}; expected 'X' (32x32x3xN uint8) and 'y' (Nx1, 1..10)")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise SourceError(f"{path}: X has shape {x.shape} and y {mat['y'].shape}; expected (32,32,3,N) and (N,1)")
    if x.dtype != np.uint8:
        raise SourceError(f"{path}: X has dtype {x.dtype}; expected uint8")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise SourceError(f"{path}: labels range {y.min()}..{y.max()}; expected 1..10 (10 = digit 0)")
    y[y == 10] = 0
    return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2))), y


def svhn_sources(root: str | os.PathLike, resolution: int = 32,
                 splits: Sequence[str] | None = None) -> list[Source]:
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"SVHN directory {root} does not exist; expected it to hold {', '.join(SVHN_FILES.values())}")
    found = {s: root / f for s, f in SVHN_FILES.items() if (root / f).is_file()}
    if "train" not in found and "test" not in found:
        raise SourceError(f"no SVHN files in {root}: expected train_32x32.mat and/or test_32x32.mat "
                          f"(optional extra_32x32.mat) from http://ufldl.stanford.edu/housenumbers/")
    out = []
    for split, path in found.items():
        if splits is not None and split not in splits:
            continue
        images, labels = load_svhn_mat(path)
        settings = {
            "resolution": int(resolution),
            "preprocessing": {
                "crop": None,
                "resize": None if resolution == 32 else int(resolution),
                "interpolation": None if resolution == 32 else "bilinear (Pillow Image.resize)",
            },
            "source": {"kind": "svhn", "description": "SVHN cropped digits (format 2); label 10 -> 0",
                       "file": str(path.resolve())},
        }
        out.append(array_source("svhn", split, images, labels, resolution, settings, path.name))
    return out
