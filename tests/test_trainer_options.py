"""Training options that change every reported number, run in-process on a tiny model for a few
steps (fast): EMA export, keep_checkpoints, --no-resume, run.init_from, grad_accum, hflip,
data.perturb_prob. Observed from outside (checkpoints, metrics.jsonl, the loader's output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from glow.config import load_config
from glow.run import Run
from glow.training.trainer import Trainer
from tests.helpers.repo import REPO
from tests.helpers.toy import build_toy_shards

SMALL = ("model.steps_per_level=1", "model.hidden_channels=4", "train.global_batch_size=4", "train.log_every=1",
         "train.sample_every=1000", "data.num_workers=0", "data.batches_per_epoch=50", "optim.warmup_steps=1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_toy_shards(tmp_path_factory.mktemp("shards"), n_train=120, n_test=10, n_ood=10)


def train(root: Path, shards: Path, *overrides: str, name: str = "tiny", resume: bool = True) -> Path:
    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml",
                      [f"run.root={root}", f"run.name={name}", f"data.root={shards}", "data.dataset=toy",
                       *SMALL, *overrides])
    code = Trainer(cfg, Accelerator(cpu=True), resume=resume).fit()
    assert code == 0
    return root / name


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Run(run_dir).checkpoint(step).path / "model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ema_weights_are_exported_and_keep_checkpoints_keeps_that_many(shards, tmp_path):
    """model.safetensors holds the EMA of the raw trajectory: ema_1 = p_1, ema_t = d ema_{t-1} + (1-d) p_t,
    with p_t the weights a run without EMA (otherwise identical) exports at step t."""
    steps, decay = 4, 0.6
    raw = train(tmp_path / "raw", shards, f"train.max_steps={steps}", "train.checkpoint_every=1",
                "train.keep_checkpoints=10")
    assert [c.step for c in Run(raw).complete_checkpoints()] == list(range(1, steps + 1))
    ema = train(tmp_path / "ema", shards, f"train.max_steps={steps}", "train.checkpoint_every=1",
                "train.keep_checkpoints=2", f"optim.ema_decay={decay}")
    assert [c.step for c in Run(ema).complete_checkpoints()] == [steps - 1, steps]  # exactly keep_checkpoints
    assert len(list((ema / "checkpoints").glob("step-*"))) == 2
    expected = weights(raw, 1)
    for t in range(2, steps + 1):
        p = weights(raw, t)
        expected = {k: decay * expected[k] + (1 - decay) * p[k] if p[k].is_floating_point() else p[k] for k in p}
    got = weights(ema, steps)
    moved = [k for k in got if got[k].is_floating_point() and not torch.equal(weights(raw, steps)[k], expected[k])]
    assert moved  # the EMA differs from the raw weights: the check below can fail
    for k in got:
        assert torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6), k
    assert json.loads((Run(ema).checkpoint(steps).path / "meta.json").read_text())["ema"] is True


def test_no_resume_refuses_an_existing_run(shards, tmp_path):
    run = train(tmp_path, shards, "train.max_steps=1")
    cfg = load_config(REPO / "train" / "configs" / "tiny.yaml",
                      [f"run.root={tmp_path}", f"data.root={shards}", "data.dataset=toy", *SMALL, "train.max_steps=2"])
    with pytest.raises(Exception, match="--no-resume"):
        Trainer(cfg, Accelerator(cpu=True), resume=False).fit()
    assert [c.step for c in Run(run).complete_checkpoints()] == [1]  # untouched


def test_init_from_and_grad_accum(shards, tmp_path):
    """run.init_from starts from the checkpoint's weights (ActNorm included, not re-initialized);
    from there, 2 micro-batches of B accumulated give the loss and gradient norm of one batch of 2B."""
    base = train(tmp_path / "base", shards, "train.max_steps=2")
    init = str(Run(base).checkpoint(2).path)
    # one step at lr ~ 0: the exported weights are the initial ones
    start = train(tmp_path / "start", shards, f"run.init_from={init}", "train.max_steps=1", "optim.lr=1e-30")
    for k, v in weights(base, 2).items():
        assert torch.allclose(weights(start, 1)[k], v, rtol=0, atol=1e-12), k
    accum = train(tmp_path / "accum", shards, f"run.init_from={init}", "train.max_steps=2",
                  "train.global_batch_size=8", "train.micro_batch_size=4")
    big = train(tmp_path / "big", shards, f"run.init_from={init}", "train.max_steps=2", "train.global_batch_size=8")
    rows_a, rows_b = metrics(accum), metrics(big)
    assert [r["step"] for r in rows_a] == [1, 2] and [r["images_seen"] for r in rows_a] == [8, 16]
    for a, b in zip(rows_a, rows_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for k, v in weights(big, 2).items():
        assert torch.allclose(weights(accum, 2)[k], v, rtol=1e-4, atol=1e-6), k


def test_perturb_prob_replaces_training_pixels_with_noise(shards, tmp_path):
    """data.perturb_prob (Ren et al. 2019's background model) trains on inputs with about that
    fraction of values replaced by uniform noise: the loss on the blocky toy data jumps."""
    base = train(tmp_path / "base", shards, "train.max_steps=1")
    init = str(Run(base).checkpoint(1).path)
    clean = metrics(train(tmp_path / "clean", shards, f"run.init_from={init}", "train.max_steps=1"))[0]["loss"]
    noisy = metrics(train(tmp_path / "noisy", shards, f"run.init_from={init}", "train.max_steps=1",
                          "data.perturb_prob=0.5"))[0]["loss"]
    assert noisy > clean + 0.5
    from glow.model.likelihood import perturb_pixels

    x = torch.full((20, 3, 32, 32), 7, dtype=torch.uint8)
    changed = (perturb_pixels(x, 0.3, torch.Generator().manual_seed(0)) != x).float().mean().item()
    assert changed == pytest.approx(0.3 * 255 / 256, abs=0.02)


def test_hflip_mirrors_about_half_of_the_training_images(shards):
    from glow.data.streams import make_train_loader

    def batches(hflip: bool) -> np.ndarray:
        loader = make_train_loader(shards, "toy", "train", batch_size=8, seed=0, epoch=0, rank=0, world_size=1,
                                   batches_per_epoch=10, hflip=hflip, shuffle_buffer=16)
        return torch.cat(list(loader)).numpy()

    plain, flipped = batches(False), batches(True)
    assert plain.shape == flipped.shape == (80, 3, 32, 32)
    same = np.all(plain == flipped, axis=(1, 2, 3))
    mirrored = np.all(plain[..., ::-1] == flipped, axis=(1, 2, 3))
    symmetric = np.all(plain == plain[..., ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)  # the same images, some mirrored left-right
    frac = np.mean(mirrored & ~symmetric)
    assert 0.25 < frac < 0.75
