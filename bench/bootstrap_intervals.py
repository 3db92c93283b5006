"""How long do bootstrap intervals of the OOD metrics take at the paper's set sizes?

CelebA test (19,962) as in-distribution against SVHN test (26,032) is the largest pair the
OOD table holds. Draws Gaussian scores of those sizes (rounded to float32, as dumps hold
log-likelihoods, so ties occur as they do in real dumps), then times
`glow.report.intervals.ood_intervals` with the default 1,000 resamples, and, for
scale, one `glow.report.scores.ood_metrics` call (scikit-learn) times the resample count.
Peak memory is the tracemalloc high-water mark of the interval call. Not a test: timings
depend on the machine and its load.

\b
Example:
  python bench/bootstrap_intervals.py --repeats 3 --out bench-results/bootstrap_intervals.json
"""

from __future__ import annotations

import json
import statistics
import time
import tracemalloc

import click
import numpy as np

from glow.files import atomic_write_json
from glow.report.intervals import DEFAULT_RESAMPLES, format_interval, ood_intervals
from glow.report.scores import ood_metrics


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n-in", default=19_962, show_default=True, help="in-distribution scores (CelebA test)")
@click.option("--n-out", default=26_032, show_default=True, help="OOD scores (SVHN test)")
@click.option("--resamples", default=DEFAULT_RESAMPLES, show_default=True, help="bootstrap resamples per call")
@click.option("--repeats", default=3, show_default=True, help="timed calls (median reported)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the results as JSON [default: printed only]")
def main(n_in: int, n_out: int, resamples: int, repeats: int, out: str | None) -> None:
    rng = np.random.default_rng(0)
    s_in = rng.normal(-3.6, 0.3, n_in).astype(np.float32).astype(np.float64)
    s_out = rng.normal(-3.3, 0.4, n_out).astype(np.float32).astype(np.float64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = ood_intervals(s_in, s_out, n_resamples=resamples, seed=0)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    ood_intervals(s_in, s_out, n_resamples=resamples, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    start = time.perf_counter()
    ood_metrics(s_in, s_out)
    sklearn_one = time.perf_counter() - start
    report = {
        "n_in": n_in, "n_out": n_out, "n_resamples": resamples, "distinct_scores": int(np.unique(
            np.concatenate([s_in, s_out])).size),
        "seconds_median": statistics.median(times), "seconds_all": times, "peak_mib": peak / 2**20,
        "sklearn_one_call_s": sklearn_one, "sklearn_estimate_s": sklearn_one * resamples,
        "intervals": {k: format_interval(result[k], 4) for k in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")},
    }
    click.echo(json.dumps(report, indent=1))
    if out:
        atomic_write_json(out, report)


if __name__ == "__main__":
    main()
