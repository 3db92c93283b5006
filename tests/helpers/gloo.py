"""Ranks on a real gloo process group, each in a spawned process (a fresh interpreter, as a launcher
starts them), for the tests whose subject is what ranks do together."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.repo import TINY


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

