"""Per-sample evaluation dumps: the one definition of their schema, location and checks.

A dump is ``runs/<name>/eval/step-N/dumps/<dataset>-<split>.npz`` holding, per sample of
the split (in index order), ``key``, ``index``, ``label``, ``log_p`` (nats), ``bpd`` and
``complexity_bpd`` (PNG code length of the image the model scored), plus scalar fields that
say where the numbers came from (checkpoint, step, model hash, data set, data root, n_bits,
seed, manifest hash). The evaluation jobs write dumps; the figures, OOD tables and run
comparisons read them. Dumps of different checkpoints are never merged.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glow.errors import ResultsInvalid, ResultsMissing
from glow.files import atomic_write_bytes
from glow.names import newest_step_dir, parse_spec, step_dir_name

__all__ = [
    "ARRAYS",
    "IDENTITY",
    "SCALARS",
    "Dump",
    "check_same_model",
    "dump_path",
    "eval_dir",
    "eval_step_dir",
    "load_dump",
    "load_dumps",
    "write_dump",
]

# per-sample arrays and their stored dtypes
ARRAYS = {"key": str, "index": np.int64, "label": np.int64, "log_p": np.float64, "bpd": np.float64,
          "complexity_bpd": np.float64}
# scalar fields and their Python types
SCALARS = {"step": int, "model_hash": str, "checkpoint": str, "dataset": str, "split": str, "data_root": str,
           "n_bits": int, "seed": int, "manifest_hash": str}
OPTIONAL = ("complexity_bpd", "seed", "manifest_hash")  # absent in dumps of older versions
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
    n_bits: int
    seed: int | None = None
    manifest_hash: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.dataset}/{self.split}"


# --------------------------------------------------------------------------- where dumps live


def eval_dir(checkpoint_dir: str | Path, step: int) -> Path:
    """``runs/<name>/checkpoints/step-N`` -> ``runs/<name>/eval/step-N``."""
    return Path(checkpoint_dir).parent.parent / "eval" / step_dir_name(step)


def eval_step_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """``runs/<name>/eval/step-N``; the newest evaluated step when ``step`` is None."""
    base = Path(run_dir) / "eval"
    if step is not None:
        path = base / step_dir_name(step)
        if not path.is_dir():
            raise ResultsMissing(f"no evaluation for step {step}: {path} does not exist; run eval/evaluate.py first")
        return path
    newest = newest_step_dir(base)
    if newest is None:
        raise ResultsMissing(f"no evaluation under {base} (expected step-NNNNNNNN folders); run eval/evaluate.py first")
    return newest


def dump_path(step_dir: str | Path, dataset: str, split: str | None = None) -> Path:
    """Where the dump of a split lives; ``dataset`` may be a ``DATASET/SPLIT`` spec."""
    if split is None:
        dataset, split = parse_spec(dataset)
    return Path(step_dir) / "dumps" / f"{dataset}-{split}.npz"


# --------------------------------------------------------------------------- write and read


def write_dump(path: str | Path, arrays: Mapping[str, np.ndarray], **scalars) -> Path:
    """Write the per-sample ``arrays`` and the ``scalars`` of :data:`SCALARS` atomically."""
    missing = [k for k in (*ARRAYS, *SCALARS) if k not in arrays and k not in scalars]
    if missing:
        raise ValueError(f"dump {path}: missing fields {missing}")
    fields = {k: np.asarray(arrays[k]).astype(t) for k, t in ARRAYS.items()}
    fields.update({k: np.array(t(scalars[k])) for k, t in SCALARS.items()})
    buf = io.BytesIO()
    np.savez(buf, **fields)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_dump(path: str | Path) -> Dump:
    """Read a dump, checking every field of the schema is there and the lengths agree.

    Never unpickles (``allow_pickle=False``): a dump is data, wherever it came from.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsMissing(f"dump {path} not found; run `eval/evaluate.py --task dump` for that split")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in (*ARRAYS, *SCALARS) if k not in z.files and k not in OPTIONAL]
        if missing:
            raise ResultsInvalid(f"dump {path} lacks {missing}; rewrite it with eval/evaluate.py --task dump --force")
        arrays = {k: (z[k].astype(t) if k in z.files else None) for k, t in ARRAYS.items()}
        meta = {k: (t(z[k].item()) if k in z.files else None) for k, t in SCALARS.items()}
    n = len(arrays["key"])
    bad = {k: len(v) for k, v in arrays.items() if v is not None and len(v) != n}
    if bad:
        raise ResultsInvalid(f"dump {path}: arrays of unequal length (key: {n}, {bad})")
    return Dump(path=path, **arrays, **meta)


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


def load_dumps(paths: Sequence[str | Path]) -> list[Dump]:
    """:func:`load_dump` for each path, then :func:`check_same_model`."""
    dumps = [load_dump(p) for p in paths]
    check_same_model(dumps)
    return dumps
