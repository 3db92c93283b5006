"""Per-sample evaluation dumps: the one definition of their schema, location and checks.

A dump (where it lives: `glow.run.Run.dump_path`) is an ``.npz`` holding, per sample of
the split (in index order), ``key``, ``index``, ``label``, ``log_p`` (nats), ``bpd`` and
``complexity_bpd`` (PNG code length of the image the model scored), plus scalar fields that
say where the numbers came from (checkpoint, step, model hash, data set, data root, n_bits,
seed, manifest hash, the digest of the weights every rank scored with) and who wrote it
(``writer_uid``, ``writer_user``). A dump of a flow on feature vectors (``data_kind: vectors``)
holds ``log_p`` (nats, a density of real vectors) and the continuous ``bpd``, no
``complexity_bpd`` (a vector has no PNG) and no ``n_bits``; its keys are those of the images
the vectors came from, so it lines up with an image flow's dump. The evaluation jobs write dumps; the figures, OOD tables and
run comparisons read them, and (``own``, unless a shared layout is allowed) only from files of
the user's own. Dumps of different checkpoints are never merged.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glow.errors import ResultsInvalid, ResultsMissing
from glow.files import atomic_write_bytes, read_bytes

__all__ = [
    "ARRAYS",
    "IDENTITY",
    "MAX_DUMP_BYTES",
    "SCALARS",
    "Dump",
    "check_same_model",
    "dump_settings",
    "load_dump",
    "write_dump",
]

log = logging.getLogger(__name__)

# per-sample arrays and their stored dtypes
ARRAYS = {"key": str, "index": np.int64, "label": np.int64, "log_p": np.float64, "bpd": np.float64,
          "complexity_bpd": np.float64}
# scalar fields and their Python types
SCALARS = {"step": int, "model_hash": str, "checkpoint": str, "dataset": str, "split": str, "data_root": str,
           "n_bits": int, "seed": int, "manifest_hash": str, "weights_digest": str, "writer_uid": int,
           "writer_user": str, "data_kind": str}
# absent in dumps of older versions (data_kind: images)
OPTIONAL = ("complexity_bpd", "seed", "manifest_hash", "weights_digest", "writer_uid", "writer_user", "data_kind")
DATA_KINDS = ("images", "vectors")
# absent in dumps of vectors: what only an image has
IMAGE_ONLY = ("complexity_bpd", "n_bits")
# what a dump was computed with (glow.evaluation.records compares them before reusing it)
SETTINGS = ("step", "model_hash", "seed", "data_root", "manifest_hash", "writer_uid")
MAX_DUMP_BYTES = 4 << 30  # ~60 bytes a sample: far above SVHN extra (531,131 samples) or CelebA
IDENTITY = ("model_hash", "checkpoint", "step", "n_bits")  # must agree across merged dumps


@dataclass
class Dump:
    """One evaluation dump (per-sample scores of one split) and where it came from."""

    path: Path
    dataset: str
    split: str
    key: np.ndarray
    index: np.ndarray
    label: np.ndarray
    log_p: np.ndarray
    bpd: np.ndarray
    complexity_bpd: np.ndarray | None
    step: int
    model_hash: str
    checkpoint: str
    data_root: str
    n_bits: int | None  # None for vectors
    seed: int | None = None
    manifest_hash: str | None = None
    weights_digest: str | None = None
    writer_uid: int | None = None
    writer_user: str | None = None
    data_kind: str | None = None  # None (older dumps): images

    @property
    def spec(self) -> str:
        return f"{self.dataset}/{self.split}"

    @property
    def vectors(self) -> bool:
        """Whether the dump scores feature vectors (continuous bits/dim, no PNG complexity)."""
        return self.data_kind == "vectors"


def _optional(data_kind) -> tuple[str, ...]:
    """The fields a dump of this kind may lack."""
    if data_kind is not None and data_kind not in DATA_KINDS:
        raise ResultsInvalid(f"data_kind {data_kind!r} is not one of {DATA_KINDS}")
    return OPTIONAL + (IMAGE_ONLY if data_kind == "vectors" else ())


# --------------------------------------------------------------------------- write and read


def write_dump(path: str | Path, arrays: Mapping[str, np.ndarray], **scalars) -> Path:
    """Write the per-sample ``arrays`` and the ``scalars`` of :data:`SCALARS` atomically."""
    optional = _optional(scalars.get("data_kind"))
    missing = [k for k in (*ARRAYS, *SCALARS) if k not in arrays and k not in scalars and k not in optional]
    if missing:
        raise ValueError(f"dump {path}: missing fields {missing}")
    fields = {k: np.asarray(arrays[k]).astype(t) for k, t in ARRAYS.items() if k in arrays}
    fields.update({k: np.array(t(scalars[k])) for k, t in SCALARS.items() if k in scalars})
    buf = io.BytesIO()
    np.savez(buf, **fields)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _open(path: Path, own: bool):
    """The dump's npz, read without following links and with a size cap (ResultsMissing if absent);
    with ``own``, refused (ForeignFile) when another user wrote it."""
    try:
        blob = read_bytes(path, MAX_DUMP_BYTES, own=own)
    except FileNotFoundError:
        raise ResultsMissing(f"dump {path} not found; run `eval/evaluate.py --task dump` for that split") from None
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ResultsInvalid(f"dump {path} is not a readable .npz ({err}); rewrite it with "
                             "eval/evaluate.py --task dump --force") from None


def load_dump(path: str | Path, own: bool = False) -> Dump:
    """Read a dump, checking every field of the schema is there and the lengths agree; with
    ``own``, only a file of the user's own.

    Never unpickles (``allow_pickle=False``): a dump is data, wherever it came from.
    """
    path = Path(path)
    with _open(path, own) as z:
        try:
            arrays = {k: (z[k].astype(t) if k in z.files else None) for k, t in ARRAYS.items()}
            meta = {k: (t(z[k].item()) if k in z.files else None) for k, t in SCALARS.items()}
        except (ValueError, TypeError) as err:  # an object array (allow_pickle=False), a wrong shape
            raise ResultsInvalid(f"dump {path}: {err}; rewrite it with eval/evaluate.py --task dump --force") from None
        optional = _optional(meta["data_kind"])
        missing = [k for k in (*ARRAYS, *SCALARS) if k not in z.files and k not in optional]
        if missing:
            raise ResultsInvalid(f"dump {path} lacks {missing}; rewrite it with eval/evaluate.py --task dump --force")
    n = len(arrays["key"])
    bad = {k: len(v) for k, v in arrays.items() if v is not None and len(v) != n}
    if bad:
        raise ResultsInvalid(f"dump {path}: arrays of unequal length (key: {n}, {bad})")
    return Dump(path=path, **arrays, **meta)


def dump_settings(path: str | Path, own: bool = False) -> dict | None:
    """The settings a dump was computed with (its scalar fields of :data:`SETTINGS`), without
    reading its arrays; None when there is no readable dump, or (``own``) it is another user's
    file: it is then recomputed."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        with _open(path, own) as z:
            stored = {k: SCALARS[k](z[k].item()) for k in SETTINGS if k in z.files}
    except (ResultsInvalid, ResultsMissing, OSError, ValueError, TypeError) as err:
        log.warning("%s is unreadable (%s): recomputing", path, err)
        return None
    if "data_root" in stored:  # written resolved; older dumps may hold a relative root
        stored["data_root"] = str(Path(stored["data_root"]).resolve())
    return stored


def check_same_model(dumps: Sequence[Dump]) -> None:
    """Refuse dumps that come from different checkpoints / model hashes, naming the files."""
    ref = dumps[0]
    for d in dumps[1:]:
        diff = [f for f in IDENTITY if getattr(d, f) != getattr(ref, f)]
        if diff:
            desc = lambda x: ", ".join(f"{f}={getattr(x, f)!r}" for f in diff)  # noqa: E731
            raise ResultsInvalid(
                f"refusing to merge dumps from different models: {ref.path} ({desc(ref)}) vs {d.path} ({desc(d)}); "
                "re-run eval/evaluate.py --task dump --force on the same checkpoint for every split"
            )
