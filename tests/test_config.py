"""glow.config: shipped configs by name or path, library defaults without a file, interpolation
between keys (resolved before anything is written), resolvers refused, trackers checked."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from glow.config import (
    ConfigError,
    config_path,
    launch_config_path,
    launch_configs,
    load_config,
    shipped_configs,
    to_yaml,
)
from tests.helpers.repo import REPO, TINY


def test_shipped_configs_by_name_and_the_checkout_paths_name_the_same_files():
    shipped = shipped_configs()
    assert {"tiny", "demo", "celeba32", "fashion_mnist32"} <= set(shipped)
    for name in ("celeba32", "celeba32.yaml", str(REPO / "train" / "configs" / "celeba32.yaml")):
        assert config_path(name).resolve() == shipped["celeba32"].resolve()
    assert set(launch_configs()) == {"cpu_2proc", "multi_gpu", "deepspeed_zero2"}
    assert launch_config_path("cpu_2proc").resolve() == (REPO / "train/accelerate/cpu_2proc.yaml").resolve()
    assert shipped["tiny"].parent.name == "configs" and shipped["tiny"].parent.parent.name == "glow"
    assert load_config("tiny") == load_config(TINY)
    with pytest.raises(ConfigError, match="neither a file nor a shipped name; shipped: celeba32"):
        config_path("celeba99")
    with pytest.raises(ConfigError, match="cpu_2proc"):
        launch_config_path("some/dir/cpu_2proc")  # a path that does not exist is not taken as a name


def test_without_a_file_the_library_defaults_apply():
    cfg = load_config(None, ["run.name=x"])
    assert cfg.run.logger == "none" and cfg.run.wandb_mode == "offline" and cfg.train.max_steps == 1000
    with pytest.raises(ConfigError, match="run.name is not set"):
        load_config(None, [])


def test_interpolation_between_keys_is_resolved_before_it_is_written(tmp_path):
    path = tmp_path / "named.yaml"
    path.write_text("run: {name: '${data.dataset}_L${model.n_levels}_K${model.steps_per_level}'}\n"
                    "model: {n_levels: 2, steps_per_level: 4}\ndata: {dataset: faces}\n"
                    "train: {checkpoint_every: '${train.sample_every}', sample_every: 50}\n")
    cfg = load_config(path, ["model.n_levels=3"])
    assert cfg.run.name == "faces_L3_K4" and cfg.train.checkpoint_every == 50
    written = OmegaConf.create(to_yaml(cfg))
    assert written.run.name == "faces_L3_K4" and "${" not in to_yaml(cfg)
    with pytest.raises(ConfigError, match="nope"):
        load_config(TINY, ["run.name=${nope.key}"])
    with pytest.raises(ConfigError, match="run.name"):  # an interpolation that resolves to a bad name
        load_config(TINY, ["data.dataset=../x", "run.name=${data.dataset}"])


@pytest.mark.parametrize("value", ["${oc.env:GLOW_TEST_SECRET}", "${oc.env:GLOW_TEST_SECRET,fallback}",
                                   "x_${data.${oc.env:GLOW_TEST_SECRET}}", "${oc.decode:'1'}", "${my_resolver:}"])
def test_resolvers_are_refused_without_showing_what_they_resolve_to(value, monkeypatch):
    monkeypatch.setenv("GLOW_TEST_SECRET", "s3cr3t-value")
    with pytest.raises(ConfigError, match=r"run.wandb_project: resolver interpolations") as err:
        load_config(TINY, ["run.name=x", f"run.wandb_project={value}"])
    assert "s3cr3t" not in str(err.value)


def test_a_spaced_resolver_in_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOW_TEST_SECRET", "s3cr3t-value")
    path = tmp_path / "spaced.yaml"
    path.write_text('run: {name: x, wandb_project: "${ oc.env :GLOW_TEST_SECRET}"}\n')
    with pytest.raises(ConfigError, match="resolver interpolations") as err:
        load_config(path)
    assert "s3cr3t" not in str(err.value)


def test_a_tracker_that_is_not_installed_is_refused_naming_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    missing = r"run.logger=mlflow needs the mlflow package.*glow-ood\[mlflow\].*or run.logger=none"
    with pytest.raises(ConfigError, match=missing):
        load_config(TINY, ["run.logger=mlflow"])
    with pytest.raises(ConfigError, match="run.logger must be one of"):
        load_config(TINY, ["run.logger=comet"])
    with pytest.raises(ConfigError, match="run.wandb_mode must be one of"):
        load_config(TINY, ["run.wandb_mode=shared"])
