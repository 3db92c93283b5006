"""The recipe's batch layout (glow.training.shape) and what a launch may not change silently: retired
batch keys, a world size that cannot split the global batch, the launcher's mixed precision and
DeepSpeed's batch settings. In-process and fast; the multi-rank runs are in test_recipe.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from click.testing import CliRunner

from glow.config import ConfigError, load_config
from glow.errors import EXIT_USAGE
from glow.training.deepspeed import configure_deepspeed
from glow.training.shape import (
    BatchShape,
    batch_shape,
    layout_changes,
    saved_layout,
    working_process_counts,
)
from tests.helpers.repo import TINY


@pytest.mark.parametrize("global_batch, world, cap, micro, accum", [
    (16, 1, 0, 16, 1), (16, 2, 0, 8, 1), (16, 4, 0, 4, 1),   # the cap unset: one micro-batch per process
    (16, 2, 4, 4, 2), (16, 2, 8, 8, 1), (16, 2, 100, 8, 1),  # accumulation grows to fit under the cap
    (64, 1, 32, 32, 2), (64, 2, 32, 32, 1),                  # demo.yaml on one and on two processes
    (32, 1, 12, 8, 4), (12, 1, 5, 4, 3), (7, 1, 2, 1, 7),    # equal micro-batches: the largest under the cap
])
def test_the_global_batch_is_laid_out_over_the_processes(global_batch, world, cap, micro, accum):
    shape = batch_shape(global_batch, world, cap)
    assert (shape.micro_batch, shape.accumulation) == (micro, accum)
    assert shape.global_batch == global_batch and shape.world_size == world
    assert cap == 0 or shape.micro_batch <= cap


def test_a_world_size_that_cannot_split_the_global_batch_is_refused_naming_those_that_can():
    assert working_process_counts(16) == [1, 2, 4, 8, 16]
    with pytest.raises(ConfigError) as err:
        batch_shape(16, 3)
    assert err.value.exit_code == EXIT_USAGE
    assert "train.global_batch_size=16" in str(err.value) and "3 processes" in str(err.value)
    assert "1, 2, 4, 8 or 16 processes" in str(err.value) and "15 or 18" in str(err.value)


def test_resuming_on_another_layout_says_what_changes():
    now = batch_shape(16, 4)
    assert layout_changes(batch_shape(16, 4).as_meta(), now) == []
    assert layout_changes({"world_size": 4}, now) == []  # a checkpoint of an earlier version: what it recorded
    [note] = layout_changes(saved_layout({**batch_shape(16, 1).as_meta(), "step": 3}), now)
    assert "world_size 1 -> 4" in note and "micro_batch_size 16 -> 4" in note and "data order" in note
    notes = layout_changes(BatchShape(4, 2, 1).as_meta(), now)
    assert len(notes) == 2 and "train.global_batch_size changed from 8 to 16" in notes[0]


@pytest.mark.parametrize("key, value, says", [
    ("train.batch_size", "32", "train.global_batch_size"), ("optim.grad_accum", "2", "train.micro_batch_size"),
])
def test_the_retired_batch_keys_say_what_to_write_instead(tmp_path, key, value, says):
    with pytest.raises(ConfigError, match=rf"override '{key}={value}': {key} .*no longer read.*{says}"):
        load_config(TINY, [f"{key}={value}"])
    section, name = key.split(".")
    old = tmp_path / "old.yaml"
    old.write_text(f"run: {{name: old}}\n{section}: {{{name}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"config file {old}: {key} .*no longer read.*{says}"):
        load_config(old)


def test_every_shipped_config_states_its_global_batch():
    import yaml

    from tests.helpers.repo import REPO

    configs = sorted((REPO / "train" / "configs").glob("*.yaml"))
    assert len(configs) >= 18
    for path in configs:
        assert isinstance(yaml.safe_load(path.read_text())["train"]["global_batch_size"], int), path
        load_config(path)
    assert load_config(REPO / "train" / "configs" / "celeba32.yaml").train.global_batch_size == 32  # the paper's
    demo = load_config(REPO / "train" / "configs" / "demo.yaml").train
    assert batch_shape(demo.global_batch_size, 2, demo.micro_batch_size) == BatchShape(2, 32, 1)  # as measured


def _refusal(monkeypatch, tmp_path, world_size: int, *overrides: str, env: dict | None = None):
    """`glow-train` in-process on a stand-in accelerator of ``world_size`` processes (nothing runs
    further than the start-up checks)."""
    import glow.distributed
    from glow.cli.train import main

    stand_in = SimpleNamespace(num_processes=world_size, process_index=0, is_main_process=True,
                               distributed_type=DistributedType.MULTI_CPU, gradient_accumulation_steps=1)
    monkeypatch.setattr(glow.distributed, "make_accelerator", lambda *a, **k: stand_in)
    args = ["--config", str(TINY), f"run.root={tmp_path}", *overrides]
    return CliRunner().invoke(main, args, env=env or {})


def test_world_size_3_is_refused_at_start_with_exit_2(monkeypatch, tmp_path):
    result = _refusal(monkeypatch, tmp_path, 3, "train.global_batch_size=16")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "error: train.global_batch_size=16 cannot be split evenly over 3 processes" in result.stderr
    assert "1, 2, 4, 8 or 16 processes" in result.stderr
    assert not (tmp_path / "tiny").exists()  # refused before anything is written


def test_a_launcher_precision_the_config_does_not_ask_for_is_refused(monkeypatch, tmp_path):
    """accelerate launch --mixed_precision bf16 (or a default accelerate config saying bf16) sets
    ACCELERATE_MIXED_PRECISION; with train.precision=fp32 that is refused in one line, never ignored."""
    bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    result = _refusal(monkeypatch, tmp_path, 3, "train.global_batch_size=15", "train.precision=fp32", env=bf16)
    assert result.exit_code == EXIT_USAGE, result.output
    [line] = result.stderr.splitlines()
    assert "mixed precision 'bf16'" in line and "train.precision=fp32" in line and "train.precision=bf16" in line
    fp16 = _refusal(monkeypatch, tmp_path, 3, "train.global_batch_size=15", env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert fp16.exit_code == EXIT_USAGE and "'fp16'" in fp16.stderr and "--mixed_precision no" in fp16.stderr

    from glow.distributed import check_launcher_precision

    for asked, precision in (("bf16", "bf16"), ("no", "bf16"), ("no", "fp32")):  # agreement, or nothing asked
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", asked)
        check_launcher_precision(precision)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    check_launcher_precision("fp32")


def test_deepspeed_takes_the_same_layout_and_refuses_its_own():
    shape = batch_shape(16, 2, 4)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": "auto",
          "bf16": {"enabled": False}}
    configure_deepspeed(ds, shape, grad_clip=50.0)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert ds["gradient_clipping"] == 50.0
    configure_deepspeed(dict(ds), shape, grad_clip=50.0)  # its own values, stated again: agreed
    for key, theirs in (("gradient_accumulation_steps", 4), ("train_micro_batch_size_per_gpu", 8),
                        ("train_batch_size", 32)):
        with pytest.raises(ConfigError, match=rf"DeepSpeed config sets {key}={theirs}.*gives"):
            configure_deepspeed({**ds, key: theirs}, shape, grad_clip=50.0)
    with pytest.raises(ConfigError, match="enables bf16"):
        configure_deepspeed({**ds, "bf16": {"enabled": True}}, shape, grad_clip=50.0)


def test_deepspeed_resumes_only_on_the_world_size_that_saved(tmp_path):
    """Its optimizer state is partitioned over the saving ranks; without DeepSpeed any world size resumes."""
    import json

    from glow.errors import CheckpointMismatch
    from glow.run import Run
    from glow.training.resume import choose_resume

    cfg = load_config(TINY, [f"run.root={tmp_path}"])
    run = Run.at(cfg.run.root, cfg.run.name)
    checkpoint = run.checkpoint(6)
    checkpoint.path.mkdir(parents=True)
    meta = {"step": 6, "model_config": cfg.model.to_dict(), "model_hash": cfg.model.hash(), "config_hash": "old",
            **batch_shape(8, 2).as_meta()}
    checkpoint.meta_path.write_text(json.dumps(meta))
    checkpoint.complete_marker.write_text("6\n")
    point = choose_resume(run, cfg, resume=True, deepspeed=False, world_size=1)
    assert (point.step, point.layout["world_size"], point.config_changed) == (6, 2, True)
    assert choose_resume(run, cfg, resume=True, deepspeed=True, world_size=2).step == 6
    with pytest.raises(CheckpointMismatch, match="saved by 2 processes.*resume with 2 processes"):
        choose_resume(run, cfg, resume=True, deepspeed=True, world_size=1)
