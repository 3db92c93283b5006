"""glow.metrics: OOD metrics vs scikit-learn, PNG complexity, typicality, Frechet distance, FID."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from glow import metrics

# --------------------------------------------------------------------------- OOD metrics


def test_ood_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    s_in = rng.normal(1.0, 1.0, 300)
    s_out = rng.normal(0.0, 1.5, 200)
    got = metrics.ood_metrics(s_in, s_out)
    y = np.r_[np.ones(300), np.zeros(200)]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert got["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert got["fpr_at_95_tpr"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    # by hand: the threshold that keeps 95% of in-dist keeps this fraction of OOD
    thr = np.sort(s_in)[::-1][int(np.ceil(0.95 * 300)) - 1]
    assert got["fpr_at_95_tpr"] == pytest.approx(np.mean(s_out >= thr), abs=1e-12)
    assert (got["n_in"], got["n_out"]) == (300, 200)


def test_ood_metrics_perfect_and_inverted_separator():
    s_in, s_out = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0])
    got = metrics.ood_metrics(s_in, s_out)
    assert got == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95_tpr": 0.0, "n_in": 3, "n_out": 2}
    inv = metrics.ood_metrics(s_out, s_in)  # OOD looks more in-distribution
    assert inv["auroc"] == 0.0 and inv["fpr_at_95_tpr"] == 1.0


def test_ood_metrics_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.ood_metrics([1.0, np.nan], [0.0])


# --------------------------------------------------------------------------- complexity, typicality


def test_png_complexity_constant_vs_noise():
    const = np.full((32, 32, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert metrics.png_complexity_bpd(const) < 0.3  # PNG headers alone are ~0.2 bits/dim at 32x32
    assert metrics.png_complexity_bpd(noise) >= 8.0
    batch = metrics.png_complexity_bpd_batch(np.stack([const, noise]))
    chw = metrics.png_complexity_bpd_batch(torch.from_numpy(np.stack([const, noise])).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(batch, chw)
    assert batch[0] == metrics.png_complexity_bpd(const)
    np.testing.assert_allclose(metrics.complexity_corrected_score([3.0, 4.0], [1.0, 5.0]), [-2.0, 1.0])


def test_typicality_batches_and_scores():
    nll = np.arange(100, dtype=np.float64)
    idx = metrics.typicality_batches(100, 25, seed=3)
    assert idx.shape == (4, 25) and sorted(idx.ravel().tolist()) == list(range(100))
    np.testing.assert_array_equal(idx, metrics.typicality_batches(100, 25, seed=3))
    stat = metrics.typicality_statistic(nll, train_mean_nll=10.0, batch_size=25, seed=3)
    np.testing.assert_allclose(stat, np.abs(nll[idx].mean(1) - 10.0))
    one = metrics.typicality_scores(nll, 10.0, batch_size=1)
    np.testing.assert_allclose(np.sort(one), np.sort(-np.abs(nll - 10.0)))
    assert metrics.typicality_batches(7, 2, 0).shape == (3, 2)
    with pytest.raises(ValueError):
        metrics.typicality_batches(3, 10, 0)


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_equals_pytorch_fid_and_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 12)), rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12)) + 0.5
    s1, s2 = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(*s1, *s2)
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...)
        try:
            theirs = fid_score.calculate_frechet_distance(*s1, *s2)
        except TypeError:
            pytest.skip("this scipy no longer takes sqrtm(disp=...)")
    assert ours == pytest.approx(theirs, rel=1e-10)
    # diagonal Gaussians: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance(*s1, *s1) == pytest.approx(0.0, abs=1e-9)


def test_statistics_cache_atomic_and_keyed(tmp_path):
    key = metrics.statistics_key("abcd1234", 32)
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng(0).normal(size=(10, 4))

    mu, sigma = metrics.cached_statistics(tmp_path, key, compute)
    mu2, sigma2 = metrics.cached_statistics(tmp_path, key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert [p.name for p in tmp_path.iterdir()] == [metrics.statistics_path(tmp_path, key).name]
    other = metrics.statistics_key("abcd1234", 64)
    assert metrics.statistics_path(tmp_path, other) != metrics.statistics_path(tmp_path, key)
    with pytest.raises(ValueError, match="holds statistics for"):
        metrics.load_statistics(metrics.statistics_path(tmp_path, key), other)


# --------------------------------------------------------------------------- FID end to end


def test_missing_inception_weights_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as e:
        metrics.load_inception("cpu")
    msg = str(e.value)
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / metrics.FID_WEIGHTS_FILE) in msg
    assert "cannot download" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        metrics.load_inception("cpu", weights_path=tmp_path / "nope.pth")


def _smooth_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        c, f = rng.uniform(40, 200, 3), rng.uniform(0.5, 2.0, 2)
        img = c + 50 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy))[..., None]
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_fid_end_to_end_with_random_weights(random_inception_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(random_inception_home))
    model = metrics.load_inception("cpu")  # pytorch-fid's own loading path, from the hub cache
    real = _smooth_images(12, seed=0)
    noise = np.random.default_rng(1).integers(0, 256, real.shape, dtype=np.uint8)
    # batches of both layouts: numpy NHWC and torch NCHW
    batches = [real[:5], torch.from_numpy(real[5:]).permute(0, 3, 1, 2)]
    f_real = metrics.inception_features(batches, "cpu", batch_size=4, model=model)
    assert f_real.shape == (12, 2048) and f_real.dtype == np.float64
    f_noise = metrics.inception_features(noise, "cpu", batch_size=12, model=model)
    st_real, st_noise = metrics.feature_statistics(f_real), metrics.feature_statistics(f_noise)
    fid_same = metrics.frechet_distance(*st_real, *st_real)
    fid_noise = metrics.frechet_distance(*st_real, *st_noise)
    assert fid_noise > 0
    assert abs(fid_same) < 1e-3 * fid_noise

    # an explicit weights file gives the same network
    explicit = metrics.load_inception(
        "cpu", weights_path=random_inception_home / "hub" / "checkpoints" / metrics.FID_WEIGHTS_FILE
    )
    a, b = model.state_dict(), explicit.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
