"""The OOD metrics of a pair of score sets: AUROC, AUPR-in, AUPR-out and FPR at 95% TPR.

Scores are oriented so that HIGHER means "more in-distribution"; in-distribution is the
positive class. Point estimates only: `glow.report.intervals` adds bootstrap intervals and
`glow.report.scores` says which scores there are.
"""

from __future__ import annotations

import numpy as np

from glow.errors import ResultsInvalid

__all__ = ["ood_metrics"]


def ood_metrics(scores_in, scores_out) -> dict:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR for scores where higher = in-distribution.

    In-distribution is the positive class. AUPR-in uses in-distribution as positive with the
    score as is; AUPR-out uses OOD as positive with the negated score. ``fpr_at_95_tpr`` is the
    fraction of OOD samples accepted when the threshold accepts 95% of in-distribution samples.
    AUROC < 0.5 means the OOD set looks more in-distribution than the in-distribution set.
    """
    # imported here: the commands read this package's constants before they check the [eval] extra
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"ood_metrics needs both sets non-empty, got n_in={s_in.size}, n_out={s_out.size}")
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if not np.isfinite(s).all():
            raise ResultsInvalid(f"{name} has {int((~np.isfinite(s)).sum())} non-finite values; fix the dump first")
    y = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    s = np.concatenate([s_in, s_out])
    # Every threshold: with tied scores the thinned curve (drop_intermediate) can skip the 95% crossing.
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    idx = int(np.searchsorted(tpr, 0.95, side="left"))
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr_at_95_tpr": float(fpr[idx]),
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
    }
