"""The numbers in a dump, recomputed independently: absolute log p(x) with the (seed, key)
noise, the PNG complexity of the image the model scored (5-bit too), and 5-bit FID references."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from glow.data.streams import load_images
from glow.evaluation import tasks as evaluation
from glow.evaluation.dumps import load_dump
from glow.evaluation.tasks import EvalContext, EvalOptions, run_bpd
from glow.model import Glow, GlowConfig
from glow.model.likelihood import eval_noise
from glow.run import Run
from tests.helpers.fake_sources import build_small_shards
from tests.helpers.models import randomize

N = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    build_small_shards(root, n=N, samples_per_shard=5, dataset="gaussian", split="test")
    return root


def tiny_model(n_bits: int) -> Glow:
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_size=32, n_levels=2, steps_per_level=1, hidden_channels=4, n_bits=n_bits))
    model.log_prob(torch.rand(8, 3, 32, 32) - 0.5)  # ActNorm init
    randomize(model, scale=0.02)
    return model.eval()


def context(model: Glow, run_dir, shards, seed: int = 5, **options) -> EvalContext:
    """Step 1 of a run at ``run_dir`` (no checkpoint files needed: the model is given)."""
    meta = {"step": 1, "model_hash": model.config.hash(), "model_config": model.config.to_dict(),
            "data": {"root": str(shards)}}
    return EvalContext(checkpoint=Run(run_dir).checkpoint(1), meta=meta, model=model,
                       options=EvalOptions(batch_size=5, seed=seed, force=True, **options))


def dump_of(run_dir) -> object:
    return load_dump(Run(run_dir).dump_path(1, "gaussian/test"))


def png_bits_per_dim(image: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=9, optimize=True)
    return 8.0 * buf.tell() / image.size


@pytest.mark.parametrize("n_bits", [8, 5])
def test_dump_log_p_and_complexity_recomputed_independently(shards, tmp_path, n_bits):
    model = tiny_model(n_bits)
    run_bpd(context(model, tmp_path, shards), "gaussian", "test", dump=True)
    dump = dump_of(tmp_path)
    assert dump.n_bits == n_bits and dump.key.size == N
    images = load_images(shards, "gaussian", "test", list(dump.key))
    x = torch.from_numpy(np.stack([images[k] for k in dump.key])).permute(0, 3, 1, 2)  # uint8 NCHW
    # y = (x_b + u) / B - 0.5 with u from (seed, key) alone; log p(x) = log p_y - D n_bits ln 2
    u = eval_noise(5, list(dump.key), (3, 32, 32)).double()
    y = ((x.long() >> (8 - n_bits)).double() + u) / 2**n_bits - 0.5
    with torch.no_grad():
        log_p_y = model.double().log_prob(y).numpy()
    d = 3 * 32 * 32
    expected = log_p_y - d * n_bits * math.log(2)
    np.testing.assert_allclose(dump.log_p, expected, rtol=2e-6, atol=0)
    np.testing.assert_allclose(dump.bpd, -expected / (d * math.log(2)), rtol=2e-6, atol=0)
    # L(x) is the PNG code length of the image the model scored: the n_bits bins
    bins = (np.stack([images[k] for k in dump.key]) >> (8 - n_bits)).astype(np.uint8)
    np.testing.assert_array_equal(dump.complexity_bpd, [png_bits_per_dim(b) for b in bins])
    if n_bits < 8:  # ... which is not the 8-bit original's
        originals = [png_bits_per_dim(images[k]) for k in dump.key]
        assert np.all(np.abs(dump.complexity_bpd - originals) > 0.5)


def test_dump_noise_depends_on_the_seed(shards, tmp_path):
    model = tiny_model(8)
    run_bpd(context(model, tmp_path / "a", shards, seed=5), "gaussian", "test", dump=True)
    run_bpd(context(model, tmp_path / "b", shards, seed=6), "gaussian", "test", dump=True)
    a = dump_of(tmp_path / "a")
    b = dump_of(tmp_path / "b")
    assert not np.array_equal(a.log_p, b.log_p)


def test_five_bit_fid_references_are_quantized_like_the_samples(shards, tmp_path, monkeypatch):
    """FID at n_bits < 8: the reference images go through the same quantization and rendering as
    the samples (only 2**n_bits distinct values), and n_bits keys the cached statistics."""
    from glow.evaluation import fid

    fed: list[np.ndarray] = []

    def features(images, device, model=None, **kwargs):
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        fed.append(arr)
        flat = arr.reshape(arr.shape[0], -1).astype(np.float64)
        return np.stack([flat.mean(1), flat.std(1), flat[:, :10].mean(1)], 1)

    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: None)
    monkeypatch.setattr(fid, "inception_features", features)
    monkeypatch.setattr(fid, "FID_DIM", 3)  # the stand-in features above have 3 dimensions
    cache = tmp_path / "cache"
    model = tiny_model(5)
    ctx = context(model, tmp_path, shards, fid_temperatures=[1.0], fid_samples=4, fid_cache=str(cache))
    evaluation.run_fid(ctx, "gaussian", "test")
    images = load_images(shards, "gaussian", "test", [f"{i:08d}" for i in range(N)])
    raw = np.stack([images[f"{i:08d}"] for i in range(N)]).transpose(0, 3, 1, 2)
    expected = np.round((raw >> 3).astype(np.float64) * 255.0 / 31.0).astype(np.uint8)
    ref = np.concatenate(fed[: len(fed) - 1])  # the last call holds the 4 samples
    assert ref.shape == raw.shape
    np.testing.assert_array_equal(ref, expected)
    levels = set(np.round(np.arange(32) * 255.0 / 31.0).astype(int).tolist())
    assert set(np.unique(fed[-1]).tolist()) <= levels  # samples use the same values
    assert set(np.unique(ref).tolist()) <= levels
    [cached] = cache.iterdir()
    assert "5bit" in cached.name
    assert fid.statistics_path(cache, fid.statistics_key("d", "s", 32, 8, N, "h")) != \
        fid.statistics_path(cache, fid.statistics_key("d", "s", 32, 5, N, "h"))


def test_every_result_is_reused_only_under_its_own_settings(shards, tmp_path):
    """The one skip rule: latents.png (once reused whatever --data or --seed) and samples.png are
    recomputed when anything they depend on changes, and reused otherwise."""
    from glow.evaluation.tasks import (
        latents_result,
        requested_results,
        run_latents,
        run_samples,
        samples_result,
    )

    model = tiny_model(8)
    build_small_shards(shards, n=6, samples_per_shard=3, dataset="other", split="test")
    ctx = context(model, tmp_path, shards, tasks=["latents", "samples"], specs=[("gaussian", "test")],
                  latents_images=2, samples_per_temperature=2, temperatures=[0.0, 1.0])
    assert {r.what: r.done() for r in requested_results(ctx)} == {"latents": False, "samples": False}
    run_latents(ctx)
    run_samples(ctx)
    assert latents_result(ctx).done() and samples_result(ctx).done()
    for change in ({"specs": [("other", "test")]}, {"seed": 6}, {"latents_images": 3}):
        other = context(model, tmp_path, shards, **{**dict(tasks=["latents"], specs=[("gaussian", "test")],
                                                           latents_images=2), **change})
        assert not latents_result(other).done(), change
    assert not samples_result(context(model, tmp_path, shards, samples_per_temperature=3,
                                      temperatures=[0.0, 1.0])).done()
