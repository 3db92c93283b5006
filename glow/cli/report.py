"""Reports over several runs: model variants side by side, and the OOD benchmark matrix (CPU, files only).

\b
Examples:
  # several runs (model variants) side by side, with a background model for the likelihood ratio
  python eval/report.py compare --run runs/demo --run runs/demo_cycle --background runs/demo_background \\
      --in demo --ood digits/test --out runs/comparison
  # the benchmark matrix of the papers: one run per in-distribution set, AUROC per OOD set
  python eval/report.py matrix --run runs/fashion_mnist32 --run runs/cifar10_32 --run runs/celeba32 \\
      --ood mnist/test --ood svhn/test --ood celeba/test --ood cifar10/test --ood cifar100/test --out runs/matrix

\b
Both read the runs' dumps (eval/evaluate.py --task dump). `compare` writes compare.json and
compare.md (one row per variant and score; see docs/variants.md); `matrix` writes
matrix.json, matrix.md and matrix.png (rows = runs, columns = OOD sets; docs/matrix.md).
Every AUROC, AUPR and FPR@95 comes with its 95% bootstrap interval (--bootstrap N resamples,
0 to skip). --group-seeds puts the runs named <name>-s<k> (seeds of one recipe, checked against
their config.yaml) in one row: mean ± standard deviation (N).
Exit codes: 0 done, 2 usage error, 4 dumps missing or not matching, 1 internal error (with a traceback).
"""

import click

from glow.cli import EVAL_MODULES, require_extra, use_file_backend
from glow.cli.figures import parse_in_spec
from glow.errors import exit_on_user_error
from glow.logs import setup_logging
from glow.report.intervals import DEFAULT_RESAMPLES
from glow.report.tables import text_table


def interval_options(command):
    """--bootstrap, --bootstrap-seed and --group-seeds, shared by compare and matrix."""
    command = click.option("--group-seeds", is_flag=True,
                           help="One row per recipe: runs named <name>-s<k> / _s<k> / -seed<k> (and <name>) are "
                                "seeds of <name>, refused unless their config.yaml differ only in train.seed; "
                                "cells show mean ± sd (N), compare/matrix.json every run's values. "
                                "[default: one row per run]")(command)
    command = click.option("--bootstrap-seed", type=int, default=0, show_default=True,
                           help="Seed of the bootstrap resamples.")(command)
    return click.option("--bootstrap", "n_resamples", type=click.IntRange(min=0), default=DEFAULT_RESAMPLES,
                        show_default=True, metavar="N",
                        help="Bootstrap resamples of the 95% interval of every AUROC, AUPR and FPR@95 "
                             "(0: no intervals, faster).")(command)


@click.group(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@exit_on_user_error
def main():
    require_extra("glow-report", "eval", EVAL_MODULES)
    use_file_backend()


@main.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run_dirs", type=click.Path(file_okay=False, exists=True), multiple=True, required=True,
              metavar="DIR", help="Run directory runs/<name>, repeatable: one variant each (label = folder name).")
@click.option("--background", type=click.Path(file_okay=False, exists=True), default=None, metavar="DIR",
              help="Background run (trained with data.perturb_prob > 0): adds a likelihood_ratio row per run. "
                   "[default: none]")
@click.option("--in", "in_dataset", required=True, metavar="DATASET[/SPLIT]",
              help="In-distribution dataset and held-out split, e.g. celeba/test (DATASET alone: --in-split).")
@click.option("--in-split", default=None, metavar="SPLIT",
              help="In-distribution held-out split when --in names only the dataset. [default: test]")
@click.option("--ood", "ood_specs", multiple=True, required=True, metavar="DATASET/SPLIT",
              help="OOD set, repeatable, e.g. svhn/test.")
@click.option("--step", type=click.IntRange(min=0), default=None, metavar="N",
              help="Evaluated step of every run. [default: each run's newest]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Output folder. [default: <parent of the first run>/comparison]")
@interval_options
@exit_on_user_error
def compare(run_dirs, background, in_dataset, in_split, ood_specs, step, out_dir, n_resamples, bootstrap_seed,
            group_seeds):
    """Several runs side by side: compare.json / compare.md, one row per (variant, score).

    \b
    Example:
      python eval/report.py compare --run runs/demo --run runs/demo_cycle --in demo/test --ood digits/test
    """
    from glow.report.compare import compare_runs
    from glow.report.intervals import Bootstrap
    from glow.report.scores import metric_cell, test_bpd_cell

    setup_logging()
    in_dataset, in_split = parse_in_spec(in_dataset, in_split)
    table, files = compare_runs(run_dirs, in_dataset, ood_specs, background=background, out_dir=out_dir,
                                in_split=in_split, step=step, bootstrap=Bootstrap(n_resamples, bootstrap_seed),
                                group_seeds=group_seeds)
    for p in files:
        click.echo(f"wrote {p}")
    click.echo(text_table(["variant", "score", "test bpd", *(f"{s} AUROC" for s in table["ood_sets"])],
                          [[row["variant"], row["score"], test_bpd_cell(row),
                            *(metric_cell(row["ood"][s], "auroc") for s in table["ood_sets"])]
                           for row in table["rows"]], digits=3))
    _legend(n_resamples, bootstrap_seed, group_seeds)


@main.command("matrix", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "runs", multiple=True, required=True, metavar="DIR[=DATASET/SPLIT]",
              help="A run, repeatable: one row each. Its in-distribution set is data.dataset of its config.yaml "
                   "with --in-split, or the DATASET/SPLIT given after '='.")
@click.option("--ood", "ood_specs", multiple=True, required=True, metavar="DATASET/SPLIT",
              help="OOD set, repeatable: one column each (a run's own set shows as '(in)').")
@click.option("--score", default="log_likelihood", show_default=True,
              help="Score shown in matrix.md's first table and the heatmap (log_likelihood, complexity_corrected, "
                   "png_complexity, typicality_mM); matrix.json holds every score.")
@click.option("--step", type=click.IntRange(min=0), default=None, metavar="N",
              help="Evaluated step of every run. [default: each run's newest]")
@click.option("--in-split", default="test", show_default=True, help="In-distribution held-out split.")
@click.option("--train-split", default="train", show_default=True,
              help="Training split whose dump (if any) enables the typicality scores.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the typicality batches.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Output folder. [default: <parent of the first run>/matrix]")
@interval_options
@exit_on_user_error
def matrix(runs, ood_specs, score, step, in_split, train_split, seed, out_dir, n_resamples, bootstrap_seed,
           group_seeds):
    """The OOD benchmark matrix: rows = in-distribution models, columns = OOD sets, cells = AUROC.

    \b
    Example:
      python eval/report.py matrix --run runs/cifar10_32 --run runs/celeba32 --ood svhn/test --out runs/matrix
    """
    from pathlib import Path

    from glow.report.intervals import Bootstrap
    from glow.report.matrix import format_cell, write_matrix

    setup_logging()
    out = out_dir or str(Path(runs[0].partition("=")[0]).parent / "matrix")
    table, files = write_matrix(runs, ood_specs, out, score=score, step=step, in_split=in_split,
                                train_split=train_split, seed=seed, bootstrap=Bootstrap(n_resamples, bootstrap_seed),
                                group_seeds=group_seeds)
    for p in files:
        click.echo(f"wrote {p}")
    click.echo(f"AUROC of {score}:")
    click.echo(text_table(["model (in-distribution)", *table["ood_sets"]],
                          [[f"{r['label']} ({r['in_distribution']})",
                            *(format_cell(r, s, score) for s in table["ood_sets"])] for r in table["rows"]]))
    _legend(n_resamples, bootstrap_seed, group_seeds)


def _legend(n_resamples: int, bootstrap_seed: int, group_seeds: bool) -> None:
    """What the brackets (and ± with seeds) in the terminal table mean."""
    if n_resamples:
        click.echo(f"[low, high]: 95% bootstrap interval ({n_resamples} resamples, seed {bootstrap_seed})")
    if group_seeds:
        click.echo("mean ± sd (N=n): over the seeds of one recipe")

if __name__ == "__main__":
    main()
