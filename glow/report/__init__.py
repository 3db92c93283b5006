"""Reports from files on disk (no GPU, no torch): OOD scores and metrics, figures, the results
page, comparisons of several runs and the benchmark matrix."""
