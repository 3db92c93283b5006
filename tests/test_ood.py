"""glow.report.scores: OOD metrics vs scikit-learn, PNG complexity, typicality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from glow.evaluation import complexity
from glow.report import scores as ood

# --------------------------------------------------------------------------- OOD metrics


def test_ood_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    s_in = rng.normal(1.0, 1.0, 300)
    s_out = rng.normal(0.0, 1.5, 200)
    got = ood.ood_metrics(s_in, s_out)
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
    got = ood.ood_metrics(s_in, s_out)
    assert got == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95_tpr": 0.0, "n_in": 3, "n_out": 2}
    inv = ood.ood_metrics(s_out, s_in)  # OOD looks more in-distribution
    assert inv["auroc"] == 0.0 and inv["fpr_at_95_tpr"] == 1.0


def brute_force_fpr_at_95(s_in, s_out) -> float:
    """Fraction of OOD accepted by the highest threshold that accepts >= 95% of in-distribution."""
    for t in np.unique(np.r_[s_in, s_out])[::-1]:
        if np.mean(s_in >= t) >= 0.95:
            return float(np.mean(s_out >= t))
    raise AssertionError("unreachable")


def test_fpr_at_95_is_exact_with_tied_scores():
    # ROC points at thresholds 2, 1, 0 are collinear, so a thinned curve drops threshold 1,
    # exactly where TPR reaches 0.95 (FPR 0.6); the thinned answer would be 1.0.
    s_in = np.array([3.0] * 10 + [2.0] * 8 + [1.0] + [0.0])
    s_out = np.array([3.0] + [2.0] * 3 + [1.0] * 8 + [0.0] * 8)
    assert brute_force_fpr_at_95(s_in, s_out) == pytest.approx(0.6)
    assert ood.ood_metrics(s_in, s_out)["fpr_at_95_tpr"] == pytest.approx(0.6)
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
        assert ood.ood_metrics(a, b)["fpr_at_95_tpr"] == pytest.approx(brute_force_fpr_at_95(a, b))


def test_ood_metrics_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        ood.ood_metrics([1.0, np.nan], [0.0])


# --------------------------------------------------------------------------- complexity, typicality


def test_png_complexity_constant_vs_noise():
    const = np.full((32, 32, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert complexity.png_complexity_bpd(const) < 0.3  # PNG headers alone are ~0.2 bits/dim at 32x32
    assert complexity.png_complexity_bpd(noise) >= 8.0
    batch = complexity.png_complexity_bpd_batch(np.stack([const, noise]))
    chw = complexity.png_complexity_bpd_batch(torch.from_numpy(np.stack([const, noise])).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(batch, chw)
    assert batch[0] == complexity.png_complexity_bpd(const)
    np.testing.assert_allclose(ood.complexity_corrected_score([3.0, 4.0], [1.0, 5.0]), [-2.0, 1.0])


def test_typicality_batches_and_scores():
    nll = np.arange(100, dtype=np.float64)
    idx = ood.typicality_batches(100, 25, seed=3)
    assert idx.shape == (4, 25) and sorted(idx.ravel().tolist()) == list(range(100))
    np.testing.assert_array_equal(idx, ood.typicality_batches(100, 25, seed=3))
    stat = ood.typicality_statistic(nll, train_mean_nll=10.0, batch_size=25, seed=3)
    np.testing.assert_allclose(stat, np.abs(nll[idx].mean(1) - 10.0))
    one = ood.typicality_scores(nll, 10.0, batch_size=1)
    np.testing.assert_allclose(np.sort(one), np.sort(-np.abs(nll - 10.0)))
    assert ood.typicality_batches(7, 2, 0).shape == (3, 2)
    with pytest.raises(ValueError):
        ood.typicality_batches(3, 10, 0)
