"""Out-of-distribution scores and their evaluation: pure functions on dumps and arrays.

Conventions
-----------
* An OOD *score* is oriented so that HIGHER means "more in-distribution" (log-likelihood is
  the canonical example). In-distribution samples are the positive class. An AUROC below 0.5
  therefore means the OOD set looks *more* in-distribution than held-out in-distribution data
  (the failure Kirichenko et al. 2020 and Nalisnick et al. 2019 report for flows).
* Input complexity L(x) (Serra et al. 2020) is the size of the PNG encoding at maximum
  compression in bits per dimension, of the image the model scores: at n_bits < 8 the
  quantized bins x >> (8 - n_bits), so that bpd(x) and L(x) describe the same image.
  Their score S(x) = bpd(x) - L(x) is large for OOD data, so the in-distribution score is
  -S(x). -L(x) alone is the model-free baseline (a "likelihood" under the PNG code).
* The typicality test (Nalisnick et al. 2019) scores a batch of M inputs by
  |mean NLL of the batch - mean NLL of the training set|; lower is more typical, so the
  in-distribution score is minus that statistic. Besides this threshold-free AUROC over
  batches, `typicality_test` applies the published decision rule: a batch is declared OOD
  when its statistic exceeds epsilon, the alpha quantile (default 0.99) of the statistic
  over bootstrap batches of held-out in-distribution data (`typicality_epsilon`).
* The likelihood ratio (Ren et al. 2019) is log p(x) - log p_bg(x) under a background model.

`score_pairs` lists the scores of a pair of sets (the one list every table uses);
`glow.report.intervals.metrics_with_intervals` turns each into an entry (the metrics of
`glow.report.metrics` with their bootstrap intervals, the one place both are computed); `ood_table` / `ood_markdown` make the OOD table of one run
(figures/ood.json and ood.md). An entry is ``{"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr",
"n_in", "n_out"}`` with ``"intervals": {metric: [low, high]}`` unless the bootstrap was skipped;
an entry of a seed group (`glow.report.seeds.seed_entry`) holds each metric's mean and
``"seeds"``; `metric_cell` shows any of them in a table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from glow.errors import ResultsInvalid
from glow.evaluation.dumps import Dump
from glow.report.intervals import DEFAULT_BOOTSTRAP, Bootstrap, metrics_with_intervals
from glow.report.metrics import ood_metrics  # noqa: F401  (the public name glow.report.scores.ood_metrics)
from glow.report.tables import Interval, Spread, markdown_table

log = logging.getLogger(__name__)

TYPICALITY_BATCH_SIZES = (1, 2, 10, 25)
# the metrics of every OOD table: (key in ood_metrics, column header)
METRIC_COLUMNS = (("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"),
                  ("fpr_at_95_tpr", "FPR@95%TPR"), ("n_in", "n in"), ("n_out", "n OOD"))
TYPICALITY_ALPHA = 0.99
TYPICALITY_BOOTSTRAP = 2000
VECTORS_NOTE = ("A flow on feature vectors: its bits/dim are continuous (-log p(x) / (D ln 2) of real vectors, a "
                "differential entropy rate: they may be negative and compare only between models of the same "
                "features); no PNG complexity rows (a vector has no image code length).")


# --------------------------------------------------------------------------- input complexity


def complexity_corrected_score(bpd, complexity_bpd) -> np.ndarray:
    """In-distribution score -S(x) = L(x) - bpd(x) of Serra et al. 2020 (higher = more in-dist)."""
    return np.asarray(complexity_bpd, dtype=np.float64) - np.asarray(bpd, dtype=np.float64)


# --------------------------------------------------------------------------- typicality


def typicality_batches(n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices (n_batches, batch_size) of disjoint batches from a seeded permutation of range(n).

    The remainder (n mod batch_size) is dropped; batch_size 1 keeps every sample.
    """
    if batch_size < 1:
        raise ValueError(f"typicality batch size must be >= 1, got {batch_size}")
    n_batches = n // batch_size
    if n_batches == 0:
        raise ValueError(f"a set of {n} samples has no batch of size {batch_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n_batches * batch_size].reshape(n_batches, batch_size)


def typicality_statistic(nll, train_mean_nll: float, batch_size: int, seed: int = 0) -> np.ndarray:
    """Per-batch |mean NLL of the batch - training-set mean NLL| (lower = more typical)."""
    nll = np.asarray(nll, dtype=np.float64)
    idx = typicality_batches(nll.size, batch_size, seed)
    return np.abs(nll[idx].mean(axis=1) - float(train_mean_nll))


def typicality_scores(nll, train_mean_nll: float, batch_size: int, seed: int = 0) -> np.ndarray:
    """In-distribution score for the typicality test: minus `typicality_statistic`."""
    return -typicality_statistic(nll, train_mean_nll, batch_size, seed)


def typicality_epsilon(heldout_nll, train_mean_nll: float, batch_size: int, alpha: float = TYPICALITY_ALPHA,
                       n_bootstrap: int = TYPICALITY_BOOTSTRAP, seed: int = 0) -> float:
    """The alpha quantile of the typicality statistic over bootstrap batches (drawn with
    replacement) of held-out in-distribution NLLs: batches above it are declared OOD, so about
    1 - alpha of in-distribution batches are rejected (Nalisnick et al. 2019, Alg. 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"typicality alpha must be in (0, 1), got {alpha}")
    nll = np.asarray(heldout_nll, dtype=np.float64)
    if nll.size == 0:
        raise ValueError("typicality_epsilon needs held-out samples, got none")
    idx = np.random.default_rng(seed).integers(0, nll.size, (n_bootstrap, batch_size))
    return float(np.quantile(np.abs(nll[idx].mean(axis=1) - float(train_mean_nll)), alpha))


def heldout_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) indices: a seeded half/half split of the in-distribution test
    set, so that epsilon is calibrated on data neither the model nor the evaluation saw."""
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def typicality_test(in_nll, ood_nll, heldout_nll, train_mean_nll: float, batch_size: int, *,
                    alpha: float = TYPICALITY_ALPHA, n_bootstrap: int = TYPICALITY_BOOTSTRAP, seed: int = 0) -> dict:
    """The decision rule at one batch size M: epsilon from `heldout_nll`, then the fraction of
    disjoint batches of M declared OOD: ``tpr`` on OOD batches (detections), ``fpr`` on
    in-distribution test batches (false alarms; ~1 - alpha when held-out and test agree)."""
    eps = typicality_epsilon(heldout_nll, train_mean_nll, batch_size, alpha, n_bootstrap, seed)
    stat_in = typicality_statistic(in_nll, train_mean_nll, batch_size, seed)
    stat_out = typicality_statistic(ood_nll, train_mean_nll, batch_size, seed)
    return {"epsilon": eps, "tpr": float(np.mean(stat_out > eps)), "fpr": float(np.mean(stat_in > eps)),
            "n_in": int(stat_in.size), "n_out": int(stat_out.size)}


def likelihood_ratio(fg: Dump, bg: Dump) -> np.ndarray:
    """log p_fg(x) - log p_bg(x) per sample, in `fg`'s order, matched key by key.

    Refuses (ResultsInvalid, a ValueError, naming both files) dumps of different splits, bit depths or key sets.
    """
    if (fg.dataset, fg.split) != (bg.dataset, bg.split):
        raise ResultsInvalid(f"likelihood ratio of different splits: {fg.path} ({fg.spec}) vs {bg.path} ({bg.spec})")
    if fg.n_bits != bg.n_bits:
        raise ResultsInvalid(f"likelihood ratio of different bit depths: {fg.path} ({fg.n_bits}-bit) vs "
                         f"{bg.path} ({bg.n_bits}-bit); evaluate both models at the same n_bits")
    for d in (fg, bg):
        if len(np.unique(d.key)) != d.key.size:
            raise ResultsInvalid(f"dump {d.path} has duplicate keys; rewrite it with eval/evaluate.py --task dump --force")
    if not np.array_equal(fg.key, bg.key):
        only_fg, only_bg = np.setdiff1d(fg.key, bg.key), np.setdiff1d(bg.key, fg.key)
        if only_fg.size or only_bg.size:
            raise ResultsInvalid(
                f"refusing the likelihood ratio of dumps whose keys differ: {fg.path} ({fg.key.size} keys, "
                f"{only_fg.size} not in the other, e.g. {only_fg[:3].tolist()}) vs {bg.path} ({bg.key.size} keys, "
                f"{only_bg.size} not in the other, e.g. {only_bg[:3].tolist()}); dump the same split with both models"
            )
    position = {k: i for i, k in enumerate(bg.key.tolist())}
    order = np.fromiter((position[k] for k in fg.key.tolist()), dtype=np.int64, count=fg.key.size)
    return fg.log_p - bg.log_p[order]


# --------------------------------------------------------------------------- the OOD table of one run


def score_pairs(in_test: Dump, ood: Dump, *, train_nll: float | None = None,
                background: tuple[Dump, Dump] | None = None, model_free: bool = True,
                typicality_sizes: Sequence[int] = TYPICALITY_BATCH_SIZES, seed: int = 0) -> dict:
    """Every score of one (in-distribution test, OOD set) pair: ``{name: (in scores, OOD scores)}``,
    higher = more in-distribution. The one list of scores that the OOD table of a run, the
    comparison of runs and the benchmark matrix all use.

    log_likelihood; complexity_corrected L(x) - bpd(x) and, when ``model_free``, png_complexity
    -L(x) (when the dumps carry L(x)); likelihood_ratio against ``background`` (its dumps of the
    same two splits); typicality_mM for each batch size M with ``train_nll`` (the training set's
    mean NLL), whose set sizes count batches, not images.
    """
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {"log_likelihood": (in_test.log_p, ood.log_p)}
    if in_test.complexity_bpd is not None and ood.complexity_bpd is not None:
        pairs["complexity_corrected"] = (complexity_corrected_score(in_test.bpd, in_test.complexity_bpd),
                                         complexity_corrected_score(ood.bpd, ood.complexity_bpd))
        if model_free:
            pairs["png_complexity"] = (-in_test.complexity_bpd, -ood.complexity_bpd)
    if background is not None:
        pairs["likelihood_ratio"] = (likelihood_ratio(in_test, background[0]), likelihood_ratio(ood, background[1]))
    if train_nll is not None:
        for m in typicality_sizes:
            if min(in_test.log_p.size, ood.log_p.size) >= m:
                pairs[f"typicality_m{m}"] = (typicality_scores(-in_test.log_p, train_nll, m, seed),
                                             typicality_scores(-ood.log_p, train_nll, m, seed))
    return pairs


def metric_cell(entry: dict, metric: str) -> float | Interval | Spread:
    """One metric of an entry as a table cell (`glow.report.tables`): ``mean ± sd (N)`` for a group
    of several seeds, ``value [low, high]`` with an interval, else the value."""
    summary = (entry.get("seeds") or {}).get(metric)
    if summary is not None and summary["n"] > 1:
        return Spread(summary["mean"], summary["std"], summary["n"])
    interval = (entry.get("intervals") or {}).get(metric)
    if interval is not None:
        return Interval(entry[metric], *interval)
    return entry[metric]


def test_bpd_cell(row: dict) -> float | Spread | None:
    """A compare/matrix row's in-distribution test bits/dim as a table cell: ``mean ± sd (N)``
    for a row of several seeds (``test_bpd_seeds``), else the value."""
    summary = row.get("test_bpd_seeds")
    if summary is not None and summary["n"] > 1:
        return Spread(summary["mean"], summary["std"], summary["n"])
    return row["test_bpd"]


def ood_table(in_test: Dump, oods: Sequence[Dump], train: Dump | None = None, *,
              typicality_sizes: Sequence[int] = TYPICALITY_BATCH_SIZES, seed: int = 0,
              alpha: float = TYPICALITY_ALPHA, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> dict:
    """OOD metrics per OOD set and score (`score_pairs`; in-distribution is the positive class),
    each with its bootstrap interval (`bootstrap`; the settings go to ``"intervals"``).

    With the training dump, the typicality scores, and ``typicality_test``: the decision rule per
    OOD set and M, epsilon calibrated on one seeded half of the in-distribution test split (held
    out from training and from the rates), rates measured on the other half and on the OOD set.
    """
    table = {
        "step": in_test.step, "model_hash": in_test.model_hash, "checkpoint": in_test.checkpoint,
        "n_bits": in_test.n_bits, "data_kind": "vectors" if in_test.vectors else "images",
        "in_distribution": in_test.spec, "typicality_seed": seed, "intervals": bootstrap.describe(),
        "bpd": {d.spec: {"mean": float(d.bpd.mean()), "std": float(d.bpd.std()), "count": int(d.bpd.size)}
                for d in [x for x in (train, in_test) if x is not None] + list(oods)},
        "notes": [
            "Scores are oriented higher = more in-distribution; in-distribution is the positive class. "
            "AUROC < 0.5 means the OOD set looks MORE in-distribution than held-out in-distribution data.",
            *(() if in_test.vectors else
              ("png_complexity is -L(x), the PNG size alone (a model-free baseline): it shows what the flow adds.",)),
            bootstrap.note(),
        ],
        "ood": {},
    }
    if in_test.vectors:
        table["notes"].append(VECTORS_NOTE)
    table["notes"] += [f"{d.spec}: the dump holds no complexity_bpd (written by an older version): no complexity "
                       "rows; rewrite it with eval/evaluate.py --task dump --force"
                       for d in [in_test, *oods] if d.complexity_bpd is None and not d.vectors]
    train_nll = None if train is None else float(-train.log_p.mean())
    if train is None:
        table["notes"].append("no training-set dump: typicality scores omitted")
    else:
        table["train_mean_nll_nats"] = train_nll
    for ood in oods:
        pairs = score_pairs(in_test, ood, train_nll=train_nll, typicality_sizes=typicality_sizes, seed=seed)
        table["ood"][ood.spec] = {name: metrics_with_intervals(*pair, bootstrap) for name, pair in pairs.items()}
    if train_nll is not None:
        table["typicality_test"] = _typicality_decisions(in_test, oods, train_nll, typicality_sizes, seed, alpha)
    return table


def _typicality_decisions(in_test: Dump, oods: Sequence[Dump], train_nll: float, sizes: Sequence[int],
                          seed: int, alpha: float) -> dict:
    calib, rest = heldout_split(in_test.log_p.size, seed)
    nll = -in_test.log_p
    out = {"alpha": alpha, "n_bootstrap": TYPICALITY_BOOTSTRAP, "train_mean_nll_nats": train_nll,
           "heldout": f"{calib.size} of the {nll.size} {in_test.spec} samples (seeded half, seed {seed}): epsilon "
                      f"is calibrated on them; in-distribution rates use the other {rest.size}",
           "ood": {}}
    for ood in oods:
        rows = {}
        for m in sizes:
            if min(rest.size, ood.log_p.size, calib.size) < m:
                continue
            rows[f"m{m}"] = typicality_test(nll[rest], -ood.log_p, nll[calib], train_nll, m, alpha=alpha, seed=seed)
        out["ood"][ood.spec] = rows
    return out


def scored_data(table: dict) -> str:
    """What the model of an OOD table scored, in words: ``8-bit images`` or feature vectors."""
    if table.get("data_kind") == "vectors":
        return "feature vectors: continuous bits/dim"
    return f"{table['n_bits']}-bit images"


def ood_markdown(table: dict) -> str:
    lines = [
        f"# OOD detection: in-distribution `{table['in_distribution']}`",
        "",
        f"Checkpoint `{table['checkpoint']}` (step {table['step']}, model hash `{table['model_hash']}`, "
        f"{scored_data(table)}).",
        "",
    ]
    lines += markdown_table(["set", "bits/dim mean", "std", "count"],
                            [[s, v["mean"], v["std"], v["count"]] for s, v in table["bpd"].items()])
    lines.append("")
    lines += markdown_table(["OOD set", "score", *(h for _, h in METRIC_COLUMNS)],
                            [[spec, name, *(metric_cell(r, k) for k, _ in METRIC_COLUMNS)]
                             for spec, rows in table["ood"].items() for name, r in rows.items()])
    lines += _typicality_markdown(table.get("typicality_test"))
    complexity = ("" if table.get("data_kind") == "vectors" else
                  "complexity_corrected is -S(x) = L(x) - bpd(x) (Serra et al. 2020), L = PNG size at maximum "
                  f"compression in bits/dim of the {table['n_bits']}-bit image the model scored; ")
    lines += [""] + [f"- {n}" for n in table["notes"]] + [
        f"- {complexity}typicality_mM is -|mean NLL of a batch of M - training mean NLL| "
        "(Nalisnick et al. 2019) over disjoint seeded batches, so its n counts batches.", ""]
    return "\n".join(lines)


def typicality_rule_text(test: dict) -> str:
    """One sentence saying how the decisions in ``ood_table(...)["typicality_test"]`` were made."""
    return (f"A batch of M images is declared OOD when |its mean NLL - the training mean NLL| > epsilon, "
            f"epsilon being the {test['alpha']:g} quantile of that statistic over {test['n_bootstrap']} bootstrap "
            f"batches of held-out in-distribution data: {test['heldout']}. TPR: OOD batches declared OOD; "
            f"FPR: in-distribution test batches declared OOD (about {1 - test['alpha']:.2g} by construction).")


def typicality_rows(test: dict | None) -> list[list]:
    """The typicality decisions as table rows (OOD set, M, epsilon, TPR, FPR, n in, n OOD)."""
    if not test:
        return []
    return [[spec, int(m[1:]), r["epsilon"], r["tpr"], r["fpr"], r["n_in"], r["n_out"]]
            for spec, by_m in test["ood"].items() for m, r in by_m.items()]


TYPICALITY_HEADER = ["OOD set", "M", "epsilon (nats)", "TPR (OOD flagged)", "FPR (in-dist flagged)", "n in", "n OOD"]


def _typicality_markdown(test: dict | None) -> list[str]:
    if not test:
        return []
    return (["", f"Typicality test as a decision rule (Nalisnick et al. 2019). {typicality_rule_text(test)}", ""]
            + markdown_table(TYPICALITY_HEADER, typicality_rows(test)))
