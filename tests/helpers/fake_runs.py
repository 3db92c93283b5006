"""Run directories of synthetic results for the figures and report tests: dumps written by glow's own
writer (`glow.evaluation.dumps.write_dump`), so they follow the schema the evaluation job writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from glow.evaluation import dumps
from glow.run import Run

STEP = 100
D = 32 * 32 * 3


def write_dump(step_dir: Path, dataset: str, split: str, bpd: np.ndarray, *, model_hash: str = "m0",
               step: int = STEP, complexity: bool = True, data_root: str = "/nonexistent",
               checkpoint: str | None = None) -> Path:
    """An image flow's dump of ``bpd`` (one value a sample) at ``step_dir/dumps/<dataset>-<split>.npz``,
    with a PNG complexity near ``bpd - 1`` unless ``complexity`` is false."""
    n = bpd.size
    arrays = {"key": np.array([f"{i:08d}" for i in range(n)]), "index": np.arange(n), "label": np.full(n, -1),
              "bpd": bpd, "log_p": -bpd * D * np.log(2.0)}
    if complexity:
        arrays["complexity_bpd"] = bpd - 1.0 + 0.1 * np.random.default_rng(n).normal(size=n)
    return dumps.write_dump(step_dir / "dumps" / f"{dataset}-{split}.npz", arrays, step=step, model_hash=model_hash,
                            checkpoint=checkpoint or f"runs/r/checkpoints/step-{step:08d}", dataset=dataset,
                            split=split, data_root=data_root, n_bits=8)


def fake_loader(calls: list | None = None):
    def load(root, dataset, split, keys):
        if calls is not None:
            calls.append((root, dataset, split, list(keys)))
        return {k: np.full((32, 32, 3), (int(k) * 37) % 256, np.uint8) for k in keys}
    return load


def make_run(tmp_path: Path, *, train: bool = True, samples: bool = True) -> Path:
    rng = np.random.default_rng(0)
    run = tmp_path / "runs" / "r"
    step_dir = run / "eval" / f"step-{STEP:08d}"
    if train:
        write_dump(step_dir, "celeba", "train", rng.normal(3.5, 0.2, 120))
    write_dump(step_dir, "celeba", "test", rng.normal(3.5, 0.2, 60))
    write_dump(step_dir, "svhn", "test", rng.normal(3.0, 0.3, 55))
    if samples:
        Image.new("RGB", (20, 10), (200, 10, 10)).save(step_dir / "samples.png")
    return run


def point(entry: dict) -> dict:
    """An OOD-table entry without its bootstrap intervals: what ood_metrics gives."""
    return {k: v for k, v in entry.items() if k != "intervals"}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()


def write_vector_dump(step_dir: Path, dataset: str, split: str, bpd: np.ndarray, *, dim: int = 16,
                      model_hash: str = "t0", checkpoint: str | None = None) -> Path:
    """A features flow's dump: continuous bits/dim (negative here), no complexity_bpd, no n_bits."""
    n = bpd.size
    path = step_dir / "dumps" / f"{dataset}-{split}.npz"
    return dumps.write_dump(path, {"key": np.array([f"{i:08d}" for i in range(n)]), "index": np.arange(n),
                            "label": np.full(n, -1), "log_p": -bpd * dim * np.log(2.0), "bpd": bpd},
                     step=STEP, model_hash=model_hash, checkpoint=checkpoint or f"runs/f/checkpoints/step-{STEP:08d}",
                     dataset=dataset, split=split, data_root="/features", data_kind="vectors")


def fake_checkpoints(run: Run, complete=(5, 10), partial=(15,)) -> None:
    """Step folders of ``run``: meta.json in each, COMPLETE in those of ``complete`` (no weights)."""
    for step in (*complete, *partial):
        c = run.checkpoint(step)
        c.path.mkdir(parents=True)
        (c.path / "meta.json").write_text(f'{{"step": {step}, "model_hash": "m"}}')
        if step in complete:
            c.complete_marker.write_text(f"{step}\n")
