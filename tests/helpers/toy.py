"""Tiny 32x32 toy shard sets; a tiny training as a command line or in this process."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from glow.data.shards import build
from glow.data.sources.images import array_source
from tests.helpers.repo import CPU_2PROC, TINY, TRAIN


def toy_images(n: int, seed: int, block: int = 8) -> np.ndarray:
    """Blocky random colour images: easy to learn, so a few steps visibly lower the loss."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 32 // block, 32 // block, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, block, 1), block, 2)


def build_toy_shards(root: Path, n_train: int = 240, n_test: int = 50, n_ood: int = 30) -> Path:
    """`toy/train`, `toy/test` (3 shards) and `toyood/test` (noisier, smaller blocks) under root."""
    settings = {"kind": "toy", "resolution": 32, "channels": 3}  # recorded like every real source
    build(array_source("toy", "train", toy_images(n_train, 0), None, 32, settings, "toy"),
          root, samples_per_shard=100, progress=False)
    build(array_source("toy", "test", toy_images(n_test, 1), np.arange(n_test) % 3, 32, settings, "toy"),
          root, samples_per_shard=20, progress=False)
    build(array_source("toyood", "test", toy_images(n_ood, 2, block=2), None, 32, settings, "toyood"),
          root, samples_per_shard=100, progress=False)
    return root


def train_command(run_root: Path, data_root: Path, *overrides: str, nproc: int = 1,
                  config: Path = TINY, launcher_args: tuple[str, ...] = ()) -> list[str]:
    """`python train/train.py` for one process, `accelerate launch` (gloo) for several."""
    args = ["--config", str(config), f"run.root={run_root}", f"data.root={data_root}",
            "data.dataset=toy", *overrides]
    if nproc == 1 and not launcher_args:
        return [sys.executable, str(TRAIN), *args]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = launcher_args or ("--config_file", str(CPU_2PROC))
    return [accelerate, "launch", *launch, "--num_processes", str(nproc), str(TRAIN), *args]


def train_in_process(run_root: Path, data_root: Path, *overrides: str, config: Path = TINY,
                     resume: bool = True) -> int:
    """One training (`Trainer(...).fit()`) in this process on the CPU: its exit status. The run is
    ``<run_root>/<run.name>`` (tiny.yaml: ``tiny``)."""
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.training.trainer import Trainer

    cfg = load_config(config, [f"run.root={run_root}", f"data.root={data_root}", "data.dataset=toy", *overrides])
    return Trainer(cfg, Accelerator(cpu=True), resume=resume).fit()
