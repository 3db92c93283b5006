"""A grayscale model end to end (slow): 2-process training on padded IDX digits, refusal of
RGB shards, evaluation against a grayscale set and an RGB set converted by --convert-channels."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from glow.cli.evaluate import main as evaluate_main
from glow.cli.figures import main as figures_main
from glow.cli.train import main as train_main
from glow.data.shards import build
from glow.data.sources.cifar import cifar_sources
from glow.data.sources.mnist import idx_sources
from tests.helpers.fake_sources import make_fake_cifar, make_fake_idx
from tests.helpers.gloo import train_on_gloo
from tests.helpers.repo import REPO, invoke

TINY_GRAY = REPO / "train" / "configs" / "tiny_gray.yaml"


def evaluate(run_dir: Path, *args: str):
    return invoke(evaluate_main, "--checkpoint", run_dir / "checkpoints" / "latest", *args)


def test_grayscale_model_trains_and_scores_gray_and_converted_rgb(tmp_path):
    src = make_fake_cifar(make_fake_idx(tmp_path / "src", "MNIST", n_train=64, n_test=12), per_batch=2, n_test=10)
    shards = tmp_path / "shards"
    for s in idx_sources("mnist", src) + cifar_sources("cifar10", src, splits=["test"]):
        build(s, shards, samples_per_shard=64, progress=False)
    # A gray model refuses RGB training shards at start, naming them and the model key.
    bad = invoke(train_main, "--config", TINY_GRAY, f"run.root={tmp_path / 'runs'}", f"data.root={shards}",
                 "data.dataset=cifar10", "data.split=test", "run.name=bad")
    assert bad.returncode != 0
    assert "cifar10/test hold RGB images" in bad.stderr and "model.in_channels=1" in bad.stderr
    # 2 processes (gloo ranks), 1 shard: trains, and warns that readers outnumber shards.
    train_on_gloo(2, tmp_path / "plan", [[f"run.root={tmp_path / 'runs'}", f"data.root={shards}", "data.dataset=mnist",
                                          "train.max_steps=4", "train.checkpoint_every=4", "train.sample_every=4"]],
                  config=TINY_GRAY)
    run_dir = tmp_path / "runs" / "tiny_gray"
    log = (run_dir / "log.txt").read_text()
    assert "world size 2" in log and "2 training readers (2 ranks x 1 loader workers) share the 1 shard(s)" in log
    assert "--samples-per-shard 32 --overwrite" in log
    # Gray in-distribution set, and RGB CIFAR only with the documented conversion.
    res = evaluate(run_dir, "--task", "dump", "--data", "mnist/test", "--data", "cifar10/test", "--batch-size", "8")
    assert res.returncode != 0 and "model.in_channels=1" in res.stderr and "--convert-channels" in res.stderr
    res = evaluate(run_dir, "--task", "dump", "--task", "latents", "--data", "mnist/test", "--data", "cifar10/test",
                   "--convert-channels", "--batch-size", "8", "--latents-images", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    step_dir = next(run_dir.glob("eval/step-*"))
    for name, n in (("mnist-test", 12), ("cifar10-test", 10)):
        with np.load(step_dir / "dumps" / f"{name}.npz") as z:
            assert len(z["bpd"]) == n and np.isfinite(z["bpd"]).all()
            assert np.allclose(z["bpd"], -z["log_p"] / (1 * 32 * 32 * np.log(2)))  # D = 1 x 32 x 32
    assert (step_dir / "latents.png").stat().st_size > 0 and (run_dir / "samples").is_dir()
    # the figures of a gray run: distributions, most/least likely images (gray shown as RGB), OOD table
    res = invoke(figures_main, "--run", run_dir, "--in", "mnist", "--ood", "cifar10/test")
    assert res.returncode == 0, res.stderr[-3000:]
    assert all((run_dir / "figures" / f).is_file() for f in ("exp1.png", "exp2.png", "ood.md", "distributions.png"))


def test_fid_features_of_gray_images_are_those_of_the_gray_replicated_to_rgb():
    import torch

    from glow.evaluation.fid import inception_features

    def stub(x):  # stands in for Inception: per-channel sums, enough to see what it was given
        assert x.shape[1] == 3
        return [x.sum(dim=(2, 3), keepdim=True) * torch.arange(1.0, 4.0)[None, :, None, None]]

    gray = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    got = inception_features(gray, model=stub)
    assert got.shape == (5, 3) and np.array_equal(got, inception_features(gray.expand(-1, 3, -1, -1), model=stub))
    assert np.array_equal(inception_features(gray.permute(0, 2, 3, 1).numpy(), model=stub), got)  # NHWC too


def test_submit_passes_convert_channels_to_every_scoring_job():
    out = subprocess.run(["bash", "slurm/submit.sh", "--name", "g", "--config", "train/configs/tiny_gray.yaml",
                          "--in", "mnist/test", "--ood", "cifar10/test", "--ood", "svhn/test", "--convert-channels",
                          "--skip-preflight", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    jobs = [line for line in out.stdout.splitlines() if line.startswith("#   task ")]
    scoring = [j for j in jobs if "--task dump" in j or "--task bpd" in j]  # dump writes bpd.json too
    assert len(scoring) == 4 and all(j.endswith("--convert-channels") for j in scoring)
    assert {j.split("--data ")[1].split()[0] for j in scoring} == {"mnist/test", "cifar10/test", "svhn/test",
                                                                   "mnist/train"}
