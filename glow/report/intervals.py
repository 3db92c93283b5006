"""Bootstrap confidence intervals for the OOD metrics of `glow.report.metrics.ood_metrics`.

An AUROC measured on one finite test set is an estimate; two variants whose AUROCs differ by
less than the width of their intervals are not told apart by that test set. `ood_intervals`
gives, for AUROC, AUPR-in, AUPR-out and FPR at 95% TPR, a percentile bootstrap interval: the
in-distribution and the OOD scores are resampled independently, each with replacement at its
own size (the two sets are independent samples), the metrics are recomputed on every resample,
and the interval is the (alpha/2, 1 - alpha/2) quantiles of the resampled values. Seeded: the
same scores, seed and count give the same interval on every machine. The point estimate is
`ood_metrics` on the data as is.

The interval covers sampling noise of the *test sets* only: it says nothing about the noise of
training (another seed gives another model: `glow.report.seeds` groups seeds).

Reports (ood.json, compare, matrix) take their settings from a `Bootstrap` and each entry of
scores from `metrics_with_intervals`: the metrics with ``"intervals": {metric: [low, high]}``.
Every pair of a report is drawn with the same seed, so the in-distribution resamples are the
same for every score of a table (a paired bootstrap across scores of one OOD set).

Speed: a resample is a vector of multiplicities over the distinct score values, so every
metric is a few cumulative sums over the sorted values (no sort per resample, no
scikit-learn call per resample). 1,000 resamples of 26,032 x 19,962 scores take a few seconds
(bench/bootstrap_intervals.py); memory is bounded by `_CHUNK_ELEMENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glow.report.metrics import ood_metrics
from glow.report.tables import Interval, cell

__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_CONFIDENCE", "DEFAULT_RESAMPLES", "INTERVAL_METRICS", "Bootstrap", "format_interval",
           "metrics_with_intervals", "ood_intervals", "weighted_ood_metrics"]

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
INTERVAL_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")
METHOD = ("percentile bootstrap: in-distribution and OOD scores resampled independently, with replacement, "
          "each at its own size")
_CHUNK_ELEMENTS = 1 << 21  # resamples x distinct values held at once (~16 MB per float64 array)
_TPR_LEVEL = 0.95


def weighted_ood_metrics(counts_in: np.ndarray, counts_out: np.ndarray) -> dict[str, np.ndarray]:
    """`ood_metrics` of data sets given as multiplicities over distinct score values, one row per data set.

    ``counts_in[r, k]`` / ``counts_out[r, k]``: how many in-distribution / OOD samples of row r
    have the k-th distinct score, the distinct scores sorted from HIGHEST to lowest (higher = more
    in-distribution). Row r is then the same data set as the samples repeated that many times,
    and the results equal ``ood_metrics`` on it (ties included: AUROC counts a tie as one half,
    average precision and FPR@95 threshold at every distinct score, as scikit-learn does).
    Returns one array per metric of `INTERVAL_METRICS`, one value per row.
    """
    pos = np.asarray(counts_in, dtype=np.float64)
    neg = np.asarray(counts_out, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 2:
        raise ValueError(f"counts must be two arrays of the same shape (rows, values), got {pos.shape} and {neg.shape}")
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    if (n_pos == 0).any() or (n_neg == 0).any():
        raise ValueError("every row needs at least one in-distribution and one OOD sample")
    tp, fp = np.cumsum(pos, 1), np.cumsum(neg, 1)  # accepted at a threshold at each distinct score
    auroc = (pos * (n_neg[:, None] - fp + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    aupr_in = _average_precision(pos, tp, fp, n_pos)
    # OOD as the positive class with the score negated: thresholds from the lowest score up
    pos_r, neg_r = pos[:, ::-1], neg[:, ::-1]
    aupr_out = _average_precision(neg_r, np.cumsum(neg_r, 1), np.cumsum(pos_r, 1), n_neg)
    tpr = tp / n_pos[:, None]
    first = np.argmax(tpr >= _TPR_LEVEL, axis=1)  # tpr ends at 1, so some threshold reaches 95%
    fpr95 = fp[np.arange(fp.shape[0]), first] / n_neg
    return {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr_at_95_tpr": fpr95}


def _average_precision(pos: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """sum over thresholds of (recall step) x precision; a threshold without positives adds 0."""
    accepted = tp + fp
    precision = np.divide(tp, accepted, out=np.zeros_like(tp), where=accepted > 0)
    return (pos * precision).sum(1) / n_pos


def ood_intervals(scores_in, scores_out, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """Point estimates and percentile-bootstrap intervals of AUROC, AUPR-in, AUPR-out and FPR@95%TPR.

    Scores are oriented higher = more in-distribution (in-distribution is the positive class),
    as in `ood_metrics`, which validates them (non-empty, finite). Returns
    ``{"method", "confidence", "n_resamples", "seed", "n_in", "n_out",
    <metric>: {"estimate", "low", "high"}}``. All scores tied gives AUROC 0.5 and intervals of
    zero width.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    point = ood_metrics(scores_in, scores_out)
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    values, group = np.unique(np.concatenate([s_in, s_out]), return_inverse=True)
    n_values = values.size
    group = n_values - 1 - group.ravel()  # index into the distinct scores sorted from highest to lowest
    g_in, g_out = group[: s_in.size], group[s_in.size :]
    # One stream per set: the draws do not depend on how resamples are chunked.
    rng_in, rng_out = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    resampled = {m: np.empty(n_resamples) for m in INTERVAL_METRICS}
    rows = max(1, _CHUNK_ELEMENTS // max(n_values, s_in.size, s_out.size))
    for start in range(0, n_resamples, rows):
        b = min(rows, n_resamples - start)
        counts_in = _resampled_counts(rng_in, g_in, b, n_values)
        counts_out = _resampled_counts(rng_out, g_out, b, n_values)
        for name, value in weighted_ood_metrics(counts_in, counts_out).items():
            resampled[name][start : start + b] = value
    tail = (1.0 - confidence) / 2
    out: dict = {"method": METHOD, "confidence": float(confidence), "n_resamples": int(n_resamples),
                 "seed": int(seed), "n_in": point["n_in"], "n_out": point["n_out"]}
    for name in INTERVAL_METRICS:
        low, high = np.quantile(resampled[name], [tail, 1.0 - tail])
        out[name] = {"estimate": point[name], "low": float(low), "high": float(high)}
    return out


def _resampled_counts(rng: np.random.Generator, groups: np.ndarray, rows: int, n_values: int) -> np.ndarray:
    """(rows, n_values): per resample, how many draws (with replacement, as many as there are
    samples) fell on each distinct score."""
    n = groups.size
    draws = groups[rng.integers(0, n, (rows, n))]
    draws += np.arange(rows)[:, None] * n_values
    return np.bincount(draws.ravel(), minlength=rows * n_values).reshape(rows, n_values)


def format_interval(entry: dict, digits: int = 3) -> str:
    """``0.912 [0.905, 0.918]`` from one metric of `ood_intervals`."""
    return cell(Interval(entry["estimate"], entry["low"], entry["high"]), digits)


@dataclass(frozen=True)
class Bootstrap:
    """How a report draws its intervals: resamples per (OOD set, score) pair (0: no intervals,
    for speed), the seed and the confidence level."""

    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self):
        if self.n_resamples < 0:
            raise ValueError(f"bootstrap resamples must be >= 0 (0: no intervals), got {self.n_resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    def describe(self) -> dict:
        """The settings as a report's JSON holds them (``"intervals"`` at its top level)."""
        if not self.n_resamples:
            return {"n_resamples": 0, "method": "none: intervals skipped (resample count 0)"}
        return {"method": METHOD, "confidence": self.confidence, "n_resamples": self.n_resamples, "seed": self.seed}

    def note(self) -> str:
        """One sentence for a report's notes: what the brackets are, and what they do not cover."""
        if not self.n_resamples:
            return "No intervals: the bootstrap was skipped (resample count 0)."
        return (f"[low, high]: {self.confidence:.0%} percentile-bootstrap interval ({self.n_resamples} resamples, "
                f"seed {self.seed}; in-distribution and OOD scores resampled independently, each at its own "
                "size). It covers the sampling noise of the finite test sets, not the noise of training "
                "(another seed gives another model: group seeds for that).")


DEFAULT_BOOTSTRAP = Bootstrap()  # 1,000 resamples, seed 0, 95%


def metrics_with_intervals(scores_in, scores_out, bootstrap: Bootstrap) -> dict:
    """`ood_metrics` of one pair of score sets and, unless ``bootstrap.n_resamples`` is 0,
    ``"intervals": {metric: [low, high]}`` for every metric of `INTERVAL_METRICS` (the point values
    are the same numbers either way)."""
    if not bootstrap.n_resamples:
        return ood_metrics(scores_in, scores_out)
    drawn = ood_intervals(scores_in, scores_out, n_resamples=bootstrap.n_resamples, seed=bootstrap.seed,
                          confidence=bootstrap.confidence)
    entry: dict = {name: drawn[name]["estimate"] for name in INTERVAL_METRICS}
    entry.update(n_in=drawn["n_in"], n_out=drawn["n_out"],
                 intervals={name: [drawn[name]["low"], drawn[name]["high"]] for name in INTERVAL_METRICS})
    return entry
