"""glow.report.intervals: bootstrap intervals of the OOD metrics (exactness, coverage, determinism)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from glow.errors import ResultsInvalid
from glow.report import intervals
from glow.report.intervals import (
    INTERVAL_METRICS,
    format_interval,
    ood_intervals,
    weighted_ood_metrics,
)
from glow.report.scores import ood_metrics


def test_weighted_metrics_equal_ood_metrics_of_the_repeated_samples():
    """Row r of multiplicities is the data set with each distinct score repeated that often:
    every metric equals ood_metrics on it, ties (shared by both sets) and absent values included."""
    rng = np.random.default_rng(0)
    values = np.sort(np.round(rng.normal(size=40), 1))[::-1]  # rounded: many ties; then distinct, highest first
    values = np.unique(values)[::-1]
    for _ in range(20):
        counts_in = rng.integers(0, 4, values.size) * (rng.random(values.size) < 0.7)
        counts_out = rng.integers(0, 4, values.size) * (rng.random(values.size) < 0.7)
        counts_in[rng.integers(values.size)] += 1
        counts_out[rng.integers(values.size)] += 1
        got = weighted_ood_metrics(counts_in[None], counts_out[None])
        expected = ood_metrics(np.repeat(values, counts_in), np.repeat(values, counts_out))
        for name in INTERVAL_METRICS:
            assert got[name][0] == pytest.approx(expected[name], abs=1e-12), name


def test_point_estimates_are_ood_metrics_and_intervals_bracket_them():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(1, 1, 300), rng.normal(0, 1.5, 200)
    result = ood_intervals(s_in, s_out, n_resamples=500, seed=3)
    expected = ood_metrics(s_in, s_out)
    assert (result["n_resamples"], result["seed"], result["confidence"]) == (500, 3, 0.95)
    assert (result["n_in"], result["n_out"]) == (300, 200)
    for name in INTERVAL_METRICS:
        entry = result[name]
        assert entry["estimate"] == expected[name]
        assert entry["low"] < entry["estimate"] < entry["high"], name
        assert entry["high"] - entry["low"] < 0.2
    assert format_interval(result["auroc"]) == (f"{result['auroc']['estimate']:.3f} "
                                                 f"[{result['auroc']['low']:.3f}, {result['auroc']['high']:.3f}]")


def test_intervals_cover_the_true_auroc_and_fpr_at_the_nominal_rate():
    """Two unit Gaussians delta apart: AUROC = Phi(delta / sqrt 2), FPR@95%TPR = Phi(z_0.95 - delta).
    Over 200 independent draws of 60 + 60 scores, the 95% intervals cover the truth in [0.90, 0.99]
    of the draws (binomial sd of the rate ~0.015; measured: 0.945 for AUROC, 0.935 for FPR@95)."""
    delta = 1.0
    true_auroc, true_fpr = norm.cdf(delta / np.sqrt(2)), norm.cdf(norm.ppf(0.95) - delta)
    rng = np.random.default_rng(123)
    covered = {"auroc": 0, "fpr_at_95_tpr": 0}
    repetitions = 200
    for r in range(repetitions):
        result = ood_intervals(rng.normal(delta, 1, 60), rng.normal(0, 1, 60), seed=r)
        for name, truth in (("auroc", true_auroc), ("fpr_at_95_tpr", true_fpr)):
            covered[name] += result[name]["low"] <= truth <= result[name]["high"]
    for name, count in covered.items():
        assert 0.90 <= count / repetitions <= 0.99, (name, count / repetitions)


def test_seeded_deterministic_and_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(2)
    s_in, s_out = rng.normal(0.5, 1, 500), rng.normal(0, 1, 400)
    first = ood_intervals(s_in, s_out, n_resamples=200, seed=7)
    assert ood_intervals(s_in, s_out, n_resamples=200, seed=7) == first
    assert ood_intervals(s_in, s_out, n_resamples=200, seed=8) != first
    monkeypatch.setattr(intervals, "_CHUNK_ELEMENTS", 900 * 3)  # 3 resamples at a time instead of all
    assert ood_intervals(s_in, s_out, n_resamples=200, seed=7) == first


def test_degenerate_scores():
    tied = ood_intervals(np.full(30, 2.0), np.full(20, 2.0), n_resamples=100)
    assert tied["auroc"] == {"estimate": 0.5, "low": 0.5, "high": 0.5}
    assert tied["aupr_in"]["low"] == tied["aupr_in"]["high"] == pytest.approx(30 / 50)
    assert tied["aupr_out"]["estimate"] == pytest.approx(20 / 50)
    assert tied["fpr_at_95_tpr"] == {"estimate": 1.0, "low": 1.0, "high": 1.0}
    separated = ood_intervals([5.0, 6.0, 7.0], [1.0, 2.0], n_resamples=100)
    assert separated["auroc"] == {"estimate": 1.0, "low": 1.0, "high": 1.0}
    assert separated["fpr_at_95_tpr"]["high"] == 0.0
    single = ood_intervals([1.0], [0.0], n_resamples=10)  # one sample each: every resample is the data
    assert single["auroc"]["low"] == single["auroc"]["high"] == 1.0
    with pytest.raises(ResultsInvalid, match="non-finite"):
        ood_intervals([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="non-empty"):
        ood_intervals([], [0.0])
    with pytest.raises(ValueError, match="n_resamples"):
        ood_intervals([1.0], [0.0], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        ood_intervals([1.0], [0.0], confidence=95)
