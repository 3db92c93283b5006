"""One recipe at any cluster shape, on real gloo process groups (trainers in spawned processes):
world sizes 1 and 2 take the same optimizer steps (global batch and learning rate per step in
metrics.jsonl, the layout in meta.json; world size 4 under Slurm: tests/test_slurm.py (a), whose
run logs the same recipe); a memory cap turns one micro-batch into two with the
same gradient; a checkpoint resumes on another world size with the recipe kept and the change
logged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from glow.config import load_config
from glow.run import Run
from glow.training.optim import lr_factor
from glow.training.trainer import Trainer
from tests.helpers.gloo import train_on_gloo
from tests.helpers.repo import TINY
from tests.helpers.toy import build_toy_shards

pytestmark = pytest.mark.slow  # 2 spawned ranks; tests/test_shape.py is the fast guard
GLOBAL = 16
RECIPE = ("model.steps_per_level=1", "model.hidden_channels=4", f"train.global_batch_size={GLOBAL}",
          "train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=2", "train.keep_checkpoints=10",
          "data.num_workers=0", "data.batches_per_epoch=50", "optim.warmup_steps=3", "data.dataset=toy")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_toy_shards(tmp_path_factory.mktemp("shards"), n_train=160, n_test=10, n_ood=10)


def recipe(root: Path, shards: Path, *overrides: str) -> list[str]:
    return [f"run.root={root}", f"data.root={shards}", *RECIPE, *overrides]


def train(root: Path, shards: Path, *overrides: str) -> int:
    """One trainer in this process (world size 1)."""
    return Trainer(load_config(TINY, recipe(root, shards, *overrides)), Accelerator(cpu=True)).fit()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def meta(run_dir: Path, step: int) -> dict:
    return json.loads((Run(run_dir).checkpoint(step).path / "meta.json").read_text())


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Run(run_dir).checkpoint(step).path / "model.safetensors"))


def test_the_same_recipe_on_1_and_2_processes(shards, tmp_path):
    # World size 1 (in-process): 2 steps, a copy of its step-2 checkpoint for the resume below, 2 more.
    assert train(tmp_path / "w1", shards, "train.max_steps=2") == 0
    shutil.copytree(tmp_path / "w1", tmp_path / "moved")
    assert train(tmp_path / "w1", shards, "train.max_steps=4") == 0
    # World size 2: a fresh run; the world-size-1 checkpoint resumed; the memory cap (see below).
    init = str(Run(tmp_path / "w1" / "tiny").checkpoint(2).path)
    train_on_gloo(2, tmp_path / "spawn2", [
        recipe(tmp_path / "w2", shards, "train.max_steps=4"),
        recipe(tmp_path / "moved", shards, "train.max_steps=4"),
        recipe(tmp_path / "capped", shards, f"run.init_from={init}", "train.max_steps=2", "train.micro_batch_size=4"),
        recipe(tmp_path / "whole", shards, f"run.init_from={init}", "train.max_steps=2"),
    ])

    runs = {name: tmp_path / name / "tiny" for name in ("w1", "w2", "moved")}
    schedule = [(r["step"], r["images_seen"], r["lr"]) for r in rows(runs["w1"])]
    # (metrics.jsonl's lr is the one the next step takes: warm-up over 3 steps, then constant)
    assert schedule == [(s, GLOBAL * s, pytest.approx(1e-3 * lr_factor(s, 3, 4, "constant"))) for s in (1, 2, 3, 4)]
    for name, run_dir in runs.items():  # the same global batch and learning rate at every step
        assert [(r["step"], r["images_seen"], r["lr"]) for r in rows(run_dir)] == schedule, name
    layouts = {name: {k: meta(d, 4)[k] for k in ("world_size", "micro_batch_size", "accumulation_steps",
                                                 "global_batch_size", "precision")} for name, d in runs.items()}
    assert layouts == {
        "w1": {"world_size": 1, "micro_batch_size": 16, "accumulation_steps": 1, "global_batch_size": 16,
               "precision": "fp32"},
        "w2": {"world_size": 2, "micro_batch_size": 8, "accumulation_steps": 1, "global_batch_size": 16,
               "precision": "fp32"},
        "moved": {"world_size": 2, "micro_batch_size": 8, "accumulation_steps": 1, "global_batch_size": 16,
                  "precision": "fp32"},
    }
    for name, line in (("w1", "global batch 16 = 1 process(es) x 1 micro-batch(es) of 16"),
                       ("w2", "global batch 16 = 2 process(es) x 1 micro-batch(es) of 8")):
        assert f"recipe: {line} (train.global_batch_size=16, train.micro_batch_size=0), precision fp32" in \
            (runs[name] / "log.txt").read_text()
    moved_log = (runs["moved"] / "log.txt").read_text()
    assert "resumed at step 2" in moved_log
    assert "resuming on another layout (world_size 1 -> 2, micro_batch_size 16 -> 8)" in moved_log
    assert "data order" in moved_log

    # train.micro_batch_size=4 at world size 2: accumulation 2, the gradient of one micro-batch of 8.
    capped, whole = tmp_path / "capped" / "tiny", tmp_path / "whole" / "tiny"
    assert meta(capped, 2)["accumulation_steps"] == 2 and meta(capped, 2)["micro_batch_size"] == 4
    assert meta(whole, 2)["accumulation_steps"] == 1 and meta(whole, 2)["micro_batch_size"] == 8
    for a, b in zip(rows(capped), rows(whole), strict=True):
        assert a["images_seen"] == b["images_seen"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for key, value in weights(whole, 2).items():
        assert torch.allclose(weights(capped, 2)[key], value, rtol=1e-5, atol=1e-6), key
