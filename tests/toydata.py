"""Tiny 32x32 shard sets and launch helpers for the training, evaluation and Slurm tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from glow.data.shards import build
from glow.data.sources.images import array_source

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "train.py"
TINY = REPO / "train" / "configs" / "tiny.yaml"


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


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               PYTHONPATH=str(REPO), **extra)
    return env


def train_command(run_root: Path, data_root: Path, *overrides: str, nproc: int = 1,
                  config: Path = TINY, launcher_args: tuple[str, ...] = ()) -> list[str]:
    """`python train/train.py` for one process, `accelerate launch` (gloo) for several."""
    args = ["--config", str(config), f"run.root={run_root}", f"data.root={data_root}",
            "data.dataset=toy", *overrides]
    if nproc == 1 and not launcher_args:
        return [sys.executable, str(TRAIN), *args]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = launcher_args or ("--config_file", str(REPO / "train" / "accelerate" / "cpu_2proc.yaml"))
    return [accelerate, "launch", *launch, "--num_processes", str(nproc), str(TRAIN), *args]


def run(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def spawn_gloo(worker, nprocs: int, out: Path, join: bool = True):
    """Run ``worker(rank, nprocs, port, out)`` in ``nprocs`` spawned processes (gloo on a free port);
    with ``join=False`` returns at once with the processes' context (its ``join()`` waits)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return mp.spawn(worker, args=(nprocs, port, str(out)), nprocs=nprocs, join=join)


def join_process_group(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    """In a spawned worker: the environment a launcher gives a rank, and its gloo process group with
    a short collective timeout (a mismatched collective fails the test instead of hanging it), which
    an Accelerator built afterwards takes over."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def leave_process_group() -> None:
    """Every rank leaves together (a rank tearing gloo down while a peer is busy can abort)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _trainings_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of ``world``: the trainings of <out>/plan.json, one after the other, in this process."""
    import json

    from accelerate import Accelerator

    from glow.config import load_config
    from glow.training.trainer import Trainer

    plan = json.loads(Path(out, "plan.json").read_text())
    os.environ.update(plan["env"])
    join_process_group(rank, world, port)
    for overrides in plan["runs"]:
        code = Trainer(load_config(plan["config"], overrides), Accelerator(cpu=True)).fit()
        if code != 0:
            raise RuntimeError(f"rank {rank}: training {overrides} ended with {code}")
    leave_process_group()


def train_on_gloo(world: int, out: Path, runs: list[list[str]], config: Path = TINY, join: bool = True,
                  **env: str):
    """Trainers (`glow.training.trainer.Trainer`, in-process) on ``world`` spawned gloo ranks: each
    entry of ``runs`` is one training's overrides of ``config``, run in order. ``env``: variables
    set in the ranks (e.g. GLOW_TEST_STEP_SECONDS). ``join=False``: see `spawn_gloo`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps({"config": str(config), "runs": runs, "env": env}))
    return spawn_gloo(_trainings_worker, world, out, join=join)

