"""Feature vectors as a data set: shards of records in NumPy's ``.npy`` format, with a manifest.

Layout, as image shards (`glow.data.shards`) but for vectors::

    <root>/<dataset>/<split>/<dataset>-<split>-%06d.npy   one per source image shard, same number
    <root>/<dataset>/<split>/manifest.json

A shard is one ``.npy`` array of records ``(index int64, label int64, vector float32[dim])``,
little-endian, sorted by index: ``np.load(path)["vector"]`` is its (n, dim) matrix. The sample
key of a record is ``KEY_FORMAT % index``, the key of the image it was computed from. No
pickle anywhere: a reader refuses any other dtype (``allow_pickle=False``; object arrays
cannot load).

The manifest (``kind: "vectors"``) holds the dimension, the record dtype, the extractor (name,
preprocessing, the sha256 of the weights file used, whether it is the published file), the
source image split (manifest hash, count, resolution, channels), the build settings and their
fingerprint, and per shard: name, count, first/last index, bytes and sha256. Every read is
capped (`MAX_MANIFEST_BYTES`, the shard's own byte count from the manifest, at most
`MAX_SHARD_BYTES`), does not follow links, and checks the sha256 before parsing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glow.data.shards import KEY_FORMAT, MANIFEST, split_dir
from glow.errors import DataError
from glow.files import atomic_write_bytes, read_bytes, read_json

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "MAX_MANIFEST_BYTES",
    "MAX_SHARD_BYTES",
    "VectorShardError",
    "Vectors",
    "VectorsMissing",
    "encode_vector_shard",
    "load_vectors",
    "read_vector_manifest",
    "read_vector_shard",
    "record_dtype",
    "record_format",
    "vector_shard_name",
    "write_vector_shard",
]

FORMAT_VERSION = 1
KIND = "vectors"
MAX_MANIFEST_BYTES = 64 << 20  # ~200,000 shards: far beyond any split
MAX_SHARD_BYTES = 1 << 30  # 500 vectors of 2,048 float32 are 4 MB
MAX_DIM = 1 << 16
SHARD_NAME_RE = r"{dataset}-{split}-(\d{{6}})\.npy"


class VectorShardError(DataError, ValueError):
    """Vector shards missing, incomplete, corrupt or not matching their manifest (exit code 4)."""


class VectorsMissing(VectorShardError, FileNotFoundError):
    """No vector manifest where one was expected; the message says how to build it."""


def record_dtype(dim: int) -> np.dtype:
    """The record of one sample: its index and label (-1: none) and its float32 vector."""
    return np.dtype([("index", "<i8"), ("label", "<i8"), ("vector", "<f4", (int(dim),))])


def record_format(dim: int) -> str:
    """`record_dtype` in words, as the manifest records it (independent of NumPy's dtype repr)."""
    return f"index <i8, label <i8, vector <f4 x {int(dim)}"


def vector_shard_name(dataset: str, split: str, i: int) -> str:
    return f"{dataset}-{split}-{i:06d}.npy"


def encode_vector_shard(index, label, vectors) -> bytes:
    """The ``.npy`` bytes of one shard (records sorted by index; the same input gives the same bytes)."""
    index, label = np.asarray(index, dtype=np.int64), np.asarray(label, dtype=np.int64)
    vectors = np.asarray(vectors)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or not (index.shape == label.shape == vectors.shape[:1]):
        raise ValueError(f"expected index, label (n,) and float32 vectors (n, dim), got {index.shape}, "
                         f"{label.shape}, {vectors.dtype} {vectors.shape}")
    order = np.argsort(index, kind="stable")
    records = np.empty(index.size, dtype=record_dtype(vectors.shape[1]))
    records["index"], records["label"], records["vector"] = index[order], label[order], vectors[order]
    buf = io.BytesIO()
    np.lib.format.write_array(buf, records, allow_pickle=False)
    return buf.getvalue()


def write_vector_shard(directory: str | os.PathLike, name: str, index, label, vectors) -> dict:
    """Write one shard atomically; returns its manifest entry (name, count, first/last index,
    bytes, sha256)."""
    data = encode_vector_shard(index, label, vectors)
    atomic_write_bytes(Path(directory) / name, data)
    idx = np.asarray(index, dtype=np.int64)
    return {"name": name, "count": int(idx.size), "first_index": int(idx.min()), "last_index": int(idx.max()),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_entry(entry: dict, dataset: str, split: str, where: Path) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    pattern = SHARD_NAME_RE.format(dataset=re.escape(dataset), split=re.escape(split))
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise VectorShardError(f"{where}: shard name {name!r} does not match {dataset}-{split}-NNNNNN.npy; the "
                               "manifest is corrupt or hostile: rebuild the vectors")
    for key in ("count", "bytes", "first_index", "last_index"):
        if not isinstance(entry.get(key), int) or entry[key] < 0:
            raise VectorShardError(f"{where}: shard {name} has no valid {key}; rebuild the vectors")
    if entry["bytes"] > MAX_SHARD_BYTES or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
        raise VectorShardError(f"{where}: shard {name} declares {entry['bytes']} bytes (cap {MAX_SHARD_BYTES}) "
                               "or no valid sha256; rebuild the vectors")
    return name


def read_vector_manifest(root: str | os.PathLike, dataset: str, split: str, *, require_complete: bool = True) -> dict:
    """The vector manifest of ``root/dataset/split``, checked (kind, dimension, shard names, sizes)."""
    path = split_dir(root, dataset, split) / MANIFEST
    if not path.is_file():
        raise VectorsMissing(f"no vector manifest at {path}; extract the features first "
                             f"(glow.features.extract.extract_features ... out_root={root})")
    try:
        man = read_json(path, MAX_MANIFEST_BYTES)
    except ValueError as err:
        raise VectorShardError(f"{err}; rebuild the vectors") from None
    if not isinstance(man, dict) or man.get("kind") != KIND or man.get("format") != FORMAT_VERSION:
        kind = man.get("kind", "images") if isinstance(man, dict) else type(man).__name__
        raise VectorShardError(f"{path} is not a vector manifest of format {FORMAT_VERSION} (kind {kind!r}); "
                               "point at a features root, or rebuild the vectors")
    dim = man.get("dim")
    if not isinstance(dim, int) or not 1 <= dim <= MAX_DIM or man.get("record_format") != record_format(dim):
        raise VectorShardError(f"{path}: dimension {dim!r} or record format {man.get('record_format')!r} is not valid")
    if require_complete and not man.get("complete"):
        raise VectorShardError(f"{path}: the feature extraction is incomplete; rerun it to finish")
    for entry in man.get("shards", []):
        _check_entry(entry, dataset, split, path)
    return man


def read_vector_shard(path: str | os.PathLike, entry: dict, dim: int) -> np.ndarray:
    """The records of one shard, after checking them against its manifest ``entry``: size and
    sha256 before parsing, then dtype, count and indices (sorted, inside the entry's range)."""
    path = Path(path)
    data = read_bytes(path, min(int(entry["bytes"]), MAX_SHARD_BYTES))
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise VectorShardError(f"{path}: size or sha256 differs from the manifest (corrupt or replaced); "
                               "rebuild the vectors")
    try:
        records = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise VectorShardError(f"{path} is not a readable .npy of records ({err})") from None
    if records.dtype != record_dtype(dim) or records.shape != (entry["count"],):
        raise VectorShardError(f"{path} holds {records.dtype} {records.shape}, the manifest says "
                               f"{entry['count']} records of {record_dtype(dim)}")
    index = records["index"]
    if index.size and (np.any(np.diff(index) <= 0) or index[0] < entry["first_index"]
                       or index[-1] > entry["last_index"]):
        raise VectorShardError(f"{path}: indices are not sorted inside {entry['first_index']}..{entry['last_index']}")
    return records


@dataclass
class Vectors:
    """Every vector of a split, sorted by index; ``keys`` are the images' sample keys."""

    keys: np.ndarray  # str
    index: np.ndarray  # int64
    label: np.ndarray  # int64, -1: none
    vectors: np.ndarray  # float32 (n, dim)
    manifest: dict


def load_vectors(root: str | os.PathLike, dataset: str, split: str) -> Vectors:
    """All vectors of ``root/dataset/split`` in one array (a split of 162,770 x 2,048 is 1.3 GB:
    stream shards with `read_vector_shard` where that matters); the count must equal the manifest's."""
    man = read_vector_manifest(root, dataset, split)
    d = split_dir(root, dataset, split)
    parts = [read_vector_shard(d / e["name"], e, man["dim"]) for e in man["shards"]]
    records = np.concatenate(parts) if parts else np.empty(0, dtype=record_dtype(man["dim"]))
    if records.size != man.get("count"):
        raise VectorShardError(f"{d / MANIFEST}: shards hold {records.size} vectors, the manifest says {man.get('count')}")
    if np.any(np.diff(records["index"]) <= 0):
        raise VectorShardError(f"{d / MANIFEST}: shards overlap or are out of order; rebuild the vectors")
    keys = np.array([KEY_FORMAT % i for i in records["index"]], dtype=str)
    return Vectors(keys=keys, index=records["index"].copy(), label=records["label"].copy(),
                   vectors=np.ascontiguousarray(records["vector"]), manifest=man)
