"""A flow on feature vectors through the same trainer, checkpoints, evaluation and report
(`model.kind: tabular`, glow.training.batches), in-process on a tiny model: features of the
demo's images from a randomly initialised extractor (`glow-shards features --random-init`),
a flow trained on them, resumed bit for bit, dumped, and the OOD table and histogram written;
and the refusals of a model whose kind does not match its data or config.

Self-contained: the extractor is a cheap one made here (per-channel mean and spread of the
pixels through a random linear layer, 4-d), registered for the test only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from glow.checkpoint import load_model
from glow.cli.shards import cli as shards_cli
from glow.config import ConfigError, load_config
from glow.errors import EXIT_DATA, EXIT_USAGE
from glow.features import extractors
from glow.features.extractors import EXTRACTORS
from glow.model.tabular import TabularFlow
from glow.report.figures import make_figures
from glow.run import Run
from glow.training.batches import DataKindMismatch
from glow.training.trainer import Trainer

DIM = 4
SPLITS = ("demo/train", "demo/test", "digits/test")


def _moments_build(state_dict: dict) -> torch.nn.Module:
    net = torch.nn.Linear(6, DIM)
    net.load_state_dict(state_dict)
    return net


def _moments_features(net, images, device):
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    x = x.float() / 255
    return net(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)).float()


MOMENTS = extractors.ExtractorSpec(
    name="pixel_moments", dim=DIM, weights_file="pixel_moments-0badc0de.pth", weights_url="(made by the test)",
    preprocessing="per-channel mean and std of pixels / 255, then linear", build=_moments_build,
    features=_moments_features, fresh=lambda: torch.nn.Linear(6, DIM))


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """The demo's images (tiny) and their vectors from the randomly initialised extractor, built by the CLI."""
    root = tmp_path_factory.mktemp("features")
    runner = CliRunner()
    built = runner.invoke(shards_cli, ["demo", "--out", str(root / "images"), "--n-train", "96", "--n-test", "48",
                                       "--samples-per-shard", "32"])
    assert built.exit_code == 0, built.output
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(EXTRACTORS, MOMENTS.name, MOMENTS)
        split_args = [a for s in SPLITS for a in ("--split", s)]
        made = runner.invoke(shards_cli, ["features", "--from", str(root / "images"), *split_args,
                                          "--extractor", MOMENTS.name, "--random-init", "0",
                                          "--weights", str(root / "random.pth"), "--out", str(root / "vectors"),
                                          "--batch-size", "64"])
    assert made.exit_code == 0, made.output
    assert "NOT the published weights" in made.output  # labelled as a random extractor
    return root


def config(run_root: Path, data_root: Path, *overrides: str):
    return load_config("demo_features", [f"run.root={run_root}", f"data.root={data_root}", f"model.dim={DIM}",
                                         "model.n_couplings=2", "model.hidden_width=8", "model.hidden_layers=1",
                                         "train.global_batch_size=16", "data.batches_per_epoch=5",
                                         "optim.warmup_steps=1", "train.log_every=1", "train.progress=false",
                                         *overrides])


def train(cfg) -> Path:
    assert Trainer(cfg, Accelerator(cpu=True)).fit() == 0
    return Path(cfg.run.root) / cfg.run.name


def test_features_flow_end_to_end(features, tmp_path):
    """Trained (ActNorm initialised from data, continuous bits/dim), checkpointed, dumped, reported."""
    run = train(config(tmp_path, features / "vectors", "train.max_steps=6", "train.checkpoint_every=3",
                       "train.sample_every=2"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["bpd"]) for r in records) and records[-1]["skipped_steps"] == 0
    assert not (run / "samples").exists()  # no sample grid for vectors, said once in the log
    assert (run / "log.txt").read_text().count("no sample grids") == 1
    model, meta = load_model(run)
    assert isinstance(model, TabularFlow) and meta["model_config"]["kind"] == "tabular" and meta["step"] == 6
    assert bool(model.input_norm.initialized)  # the data-dependent init ran (and was saved)

    from glow.evaluation import job
    from glow.evaluation.tasks import EvalOptions

    job.evaluate(str(run), EvalOptions(tasks=["dump"], specs=[tuple(s.split("/")) for s in SPLITS],
                                       data_root=str(features / "vectors"), batch_size=32))
    dump = np.load(next((run / "eval").glob("step-*/dumps/digits-test.npz")))
    assert str(dump["data_kind"]) == "vectors" and "complexity_bpd" not in dump.files
    assert np.isfinite(dump["bpd"]).all() and len(dump["bpd"]) == 1797  # every digit, whatever --n-test

    make_figures(run, "demo", ["digits/test"])
    table = json.loads((run / "figures" / "ood.json").read_text())
    row = table["ood"]["digits/test"]["log_likelihood"]
    assert 0.0 <= row["auroc"] <= 1.0
    low, high = row["intervals"]["auroc"]
    assert low <= row["auroc"] <= high
    md = (run / "figures" / "ood.md").read_text()
    assert "| digits/test | log_likelihood |" in md and "continuous bits/dim" in md
    assert "png_complexity" not in md  # a vector has no PNG: no rows, no note about them
    with Image.open(run / "figures" / "distributions.png") as png:
        png.verify()


def test_features_flow_resumes_bit_for_bit(features, tmp_path):
    straight = train(config(tmp_path / "a", features / "vectors", "train.max_steps=4", "train.checkpoint_every=2",
                            "model.dropout=0.3", "optim.schedule=constant"))
    cfg = config(tmp_path / "b", features / "vectors", "train.max_steps=2", "train.checkpoint_every=2",
                 "model.dropout=0.3", "optim.schedule=constant")
    train(cfg)
    resumed = train(config(tmp_path / "b", features / "vectors", "train.max_steps=4", "train.checkpoint_every=2",
                           "model.dropout=0.3", "optim.schedule=constant"))
    a, b = (load_file(str(Run(r).checkpoint(4).model_path)) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(Run(straight).checkpoint(2).model_path))
    assert any(not torch.equal(first[k], a[k]) for k in a)  # it trained between the two: the check can fail


def test_a_model_of_the_other_kind_or_dimension_is_refused(features, tmp_path):
    with pytest.raises(DataKindMismatch, match="holds images but model.kind is tabular") as err:
        Trainer(config(tmp_path, features / "images"), Accelerator(cpu=True)).fit()
    assert err.value.exit_code == EXIT_DATA and "\n" not in str(err.value)
    glow = load_config("tiny", [f"run.root={tmp_path}", f"data.root={features / 'vectors'}"])
    with pytest.raises(DataKindMismatch, match="holds feature vectors but model.kind is glow") as err:
        Trainer(glow, Accelerator(cpu=True)).fit()
    assert err.value.exit_code == EXIT_DATA
    with pytest.raises(Exception, match="model.dim=8") as err:
        Trainer(config(tmp_path, features / "vectors", "model.dim=8"), Accelerator(cpu=True)).fit()
    assert err.value.exit_code == EXIT_DATA
    assert not (tmp_path / "demo_features").exists()  # refused before anything was written


@pytest.mark.parametrize("override, message", [
    ("model.n_levels=2", "unknown key model.n_levels"),
    ("data.hflip=true", "data.hflip acts on images"),
    ("data.perturb_prob=0.1", "data.perturb_prob acts on images"),
    ("train.checkpointing=true", "train.checkpointing acts on images"),
    ("model.kind=vae", "model.kind must be one of"),
])
def test_image_options_under_a_tabular_model_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("demo_features", [override])
    assert err.value.exit_code == EXIT_USAGE


def test_model_kind_on_the_command_line_picks_the_schema():
    cfg = load_config(None, ["model.dim=6", "run.name=x", "model.kind=tabular"])  # in any order
    assert cfg.model.kind == "tabular" and cfg.model.dim == 6
    with pytest.raises(ConfigError, match="unknown key model.dim"):
        load_config(None, ["run.name=x", "model.dim=6"])


def test_submit_preflight_checks_a_features_run_as_the_trainer_does(features, tmp_path, capsys):
    """glow.preflight (submit.sh's checks before the queue) on a flow on vectors: its vector splits
    pass, image shards are refused with the trainer's message and exit code."""
    from glow import preflight

    def check(data_root: Path) -> int:
        return preflight.main(["--run-dir", str(tmp_path / "runs" / "f"), "--stages", "train,eval", "--in",
                               "demo/test", "--ood", "digits/test", "--config", "demo_features",
                               "--data-root", str(data_root), "--split", "demo/test", "--split", "digits/test",
                               "--", f"data.root={data_root}", f"model.dim={DIM}"])

    assert check(features / "vectors") == 0
    assert "evaluation vectors digits/test" in "".join(capsys.readouterr())
    assert check(features / "images") == EXIT_DATA
    assert "holds images but model.kind is tabular" in capsys.readouterr().err
