"""CIFAR-10 / CIFAR-100: the "python version" pickle batches, as torchvision downloads them.

``<root>/cifar-10-batches-py/data_batch_1..5, test_batch``; ``<root>/cifar-100-python/train, test``.
Each batch is a dict with ``b"data"`` (N x 3072 uint8: the R, G and B planes of a 32x32 image,
row-major) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The batches are
pickles: they are read by an unpickler that builds only plain containers and numpy arrays, so a
planted file cannot run code, and whose memory is bounded by the file (itself at most
:data:`MAX_BATCH_BYTES`): an array is made only from the bytes its pickle holds (never
``numpy``'s ``_reconstruct``, which allocates whatever shape the file declares and leaves the
memory uninitialised when no data follows). Every error names the file and what was expected;
``root`` is the folder torchvision's ``root=`` argument would take.
"""
from __future__ import annotations

import math
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


# CIFAR-100's train batch, the largest, is ~160 MB (50,000 x 3,072 bytes of pixels plus names).
MAX_BATCH_BYTES = 256 << 20
_NUMERIC_KINDS = "biuf"


def _checked_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"array of dtype {dtype!r}: only plain numbers are allowed in a CIFAR batch")
    return dtype


def _array_from(data: object, dtype: object, shape: object, fortran: bool = False) -> np.ndarray:
    """An array made from ``data``'s bytes only, which must fill ``shape`` x ``dtype`` exactly."""
    dtype = _checked_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)) or not isinstance(shape, tuple) or \
            not all(type(d) is int and d >= 0 for d in shape):
        raise pickle.UnpicklingError(f"array of shape {shape!r:.80} without its bytes")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(f"array of shape {shape} x {dtype} holds {len(data)} bytes, not "
                                     f"{math.prod(shape) * dtype.itemsize}")
    return np.frombuffer(bytes(data), dtype).reshape(shape, order="F" if fortran else "C")


class _PendingArray:
    """Stands for ``numpy``'s ``_reconstruct(ndarray, ...)`` in a batch: the array is made only
    when its state (shape, dtype, bytes) arrives, from those bytes (:func:`_array_from`)."""

    def __init__(self, subtype: object, *_ignored):
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed in a CIFAR batch")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("array state is not (version, shape, dtype, fortran, bytes)")
        shape, dtype, fortran, data = state[-4:]
        self.array = _array_from(data, dtype, shape, bool(fortran))


def _frombuffer(buf: object, dtype: object, shape: object, order: str) -> np.ndarray:
    """``numpy``'s protocol-5 array constructor, from the buffer's bytes only."""
    return _array_from(buf, dtype, shape, order == "F")


def _scalar(dtype: object, data: object = None) -> object:
    """``numpy``'s scalar constructor for plain numbers whose bytes are all there."""
    dtype = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"scalar of dtype {dtype} without its {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype)[0]


def _latin1(text: object, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode(str, "latin1")``: how protocol-2 pickles carry bytes; no other codec."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed in a CIFAR batch")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """Builds containers, bytes, numbers and numpy arrays (from their bytes only); any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _PendingArray,
        ("numpy._core.multiarray", "_reconstruct"): _PendingArray,
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _scalar, ("numpy._core.multiarray", "scalar"): _scalar,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): _latin1,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return self.ALLOWED[module, name]


def _resolved(value: object) -> object:
    """An array in place of a :class:`_PendingArray`; one whose bytes never came is refused."""
    if isinstance(value, _PendingArray):
        if value.array is None:
            raise pickle.UnpicklingError("an array without its data")
        return value.array
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    return value


def load_cifar_batch(path: Path, labels_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N int64) of one CIFAR python batch."""
    if not path.is_file():
        raise SourceError(f"CIFAR batch file missing: {path} (expected the torchvision 'python version' layout)")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BATCH_BYTES:
                raise pickle.UnpicklingError(f"{size} bytes, more than the {MAX_BATCH_BYTES} of any CIFAR batch")
            batch = _BatchUnpickler(f, encoding="bytes").load()
        if isinstance(batch, dict):
            batch = {k: _resolved(v) for k, v in batch.items()}
    except Exception as exn:
        raise SourceError(f"cannot read {path} as a CIFAR python batch ({type(exn).__name__}: {exn})") from None
    if not isinstance(batch, dict) or b"data" not in batch or labels_key not in batch:
        found = sorted(batch, key=repr) if isinstance(batch, dict) else type(batch).__name__
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
