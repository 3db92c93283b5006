"""User errors end with one clear message and their exit code; bugs keep their traceback.

Each entry point catches glow.errors.UserError once (exit_on_user_error). These tests run
the real click commands in-process (no model is trained): a bad override, a bad config
file, shards that do not fit the model, missing shards, a missing checkpoint, missing
evaluation results; and one internal error injected into a real subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from glow.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_USAGE
from glow.model import GlowConfig
from tests.helpers.repo import REPO, cpu_env, load_script
from tests.helpers.toy import build_toy_shards


def command(script: str):
    return load_script(script).main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_toy_shards(tmp_path_factory.mktemp("errors") / "shards", n_train=20, n_test=10, n_ood=10)


def invoke(script: str, *args: str):
    result = CliRunner().invoke(command(script), list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


def train(tmp_path: Path, shards: Path, *overrides: str):
    return invoke("train/train.py", "--config", str(REPO / "train/configs/tiny.yaml"), f"run.root={tmp_path}",
                  f"data.root={shards}", "data.dataset=toy", *overrides)


def test_a_bad_override_is_named_as_an_override(tmp_path, shards):
    result = train(tmp_path, shards, "train.max_steps=abc")
    assert result.exit_code == EXIT_USAGE
    assert "override 'train.max_steps=abc'" in result.output and "tiny.yaml" not in result.output
    unknown = train(tmp_path, shards, "train.max_stepz=3")
    assert unknown.exit_code == EXIT_USAGE and "unknown key train.max_stepz" in unknown.output


def test_a_bad_config_file_is_named(tmp_path, shards):
    config = tmp_path / "bad.yaml"
    config.write_text("run: {name: x}\ntrain: {max_steps: lots}\n")
    result = invoke("train/train.py", "--config", str(config), f"data.root={shards}")
    assert result.exit_code == EXIT_USAGE and f"config file {config}: train.max_steps" in result.output


def test_shards_at_another_resolution_are_refused_at_start(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    result = train(tmp_path, shards, "model.image_size=64")
    assert result.exit_code == EXIT_DATA
    assert str(shards / "toy" / "train") in result.output
    assert "32x32 images" in result.output and "model.image_size=64" in result.output
    assert not (tmp_path / "tiny").exists()  # refused before the run directory was made


def test_missing_shards_say_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    result = train(tmp_path, tmp_path / "nowhere")
    assert result.exit_code == EXIT_DATA and "no shard manifest" in result.output and "shards/build.py" in result.output


def fake_checkpoint(run_dir: Path, data_root: Path, image_size: int) -> Path:
    """meta.json + COMPLETE only: enough for every check made before a model is loaded."""
    config = GlowConfig(image_size=image_size, hidden_channels=8)
    step = run_dir / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    meta = {"step": 10, "model_config": config.to_dict(), "model_hash": config.hash(),
            "data": {"root": str(data_root), "dataset": "toy"}}
    (step / "meta.json").write_text(json.dumps(meta))
    (step / "COMPLETE").write_text("10\n")
    return step


def test_evaluation_refuses_shards_that_do_not_fit_the_checkpoint(tmp_path, shards):
    step = fake_checkpoint(tmp_path / "run", shards, image_size=64)
    result = invoke("eval/evaluate.py", "--checkpoint", str(step), "--task", "dump", "--data", "toy/test")
    assert result.exit_code == EXIT_DATA
    assert str(shards / "toy" / "test") in result.output and "model.image_size=64" in result.output


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    result = invoke("eval/evaluate.py", "--checkpoint", str(tmp_path / "run"), "--task", "dump", "--data", "toy/test")
    assert result.exit_code == EXIT_CHECKPOINT and "no complete checkpoint" in result.output


def test_figures_without_evaluation_say_what_to_run(tmp_path):
    (tmp_path / "run").mkdir()
    result = invoke("eval/figures.py", "--run", str(tmp_path / "run"), "--in", "toy/test", "--ood", "toyood/test")
    assert result.exit_code == EXIT_DATA and "run eval/evaluate.py first" in result.output


def test_an_internal_error_keeps_its_traceback():
    inject = ("import runpy, sys, glow.evaluation.job as j\n"
              "def boom(path): raise RuntimeError('injected bug')\n"
              "j.resolve_checkpoint = boom\n"
              "sys.argv = ['eval/evaluate.py', '--checkpoint', 'x', '--task', 'samples']\n"
              "runpy.run_path('eval/evaluate.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", inject], env=cpu_env(), capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: injected bug" in result.stderr
