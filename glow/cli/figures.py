"""Figures, the OOD table and one page of results of one run (CPU, files only).

\b
Examples:
  # CelebA vs SVHN (Kirichenko et al. 2020), newest evaluated step
  python eval/figures.py --run runs/celeba32 --in celeba/test --ood svhn/test
  # the CPU demo, a given step, shards moved since the dumps
  python eval/figures.py --run runs/demo --step 1200 --in demo/test --ood digits/test --data-root data/shards

\b
Reads runs/<name>/eval/step-N/dumps/<dataset>-<split>.npz (written by
`eval/evaluate.py --task dump`) and writes runs/<name>/figures/: distributions.png,
exp1.png, exp2.png, samples.png, ood.json, ood.md and index.html (the whole result on one
self-contained page: open it in a browser). The in-distribution training split's dump
(--train-split) adds the typicality rows. The table, bits/dim and figures also go to the
run's tracker (run.logger: wandb, tensorboard or mlflow; job type figures) unless --logger
says otherwise. Several runs side by side, and the benchmark matrix: eval/report.py.
No --config or KEY=VALUE: everything comes from files on disk (the dumps and the run's
config.yaml); the choices left are the options here.
Exit codes: 0 done, 2 usage error (also: the run directory, a fixed folder in it or a file read
is a link or another user's), 4 dumps missing or not matching, 1 internal error (with a traceback).
"""

import click

from glow.cli import (
    EVAL_MODULES,
    logger_options,
    require_extra,
    shared_run_option,
    use_file_backend,
)
from glow.config import check_tracker_installed
from glow.errors import exit_on_user_error
from glow.logs import setup_logging
from glow.report.intervals import DEFAULT_RESAMPLES


def parse_in_spec(value: str, in_split: str | None) -> tuple[str, str]:
    """--in DATASET or DATASET/SPLIT (and --in-split) -> (dataset, split)."""
    from glow.names import check_name, parse_spec

    try:
        if "/" in value:
            dataset, split = parse_spec(value)
            if in_split is not None and in_split != split:
                raise click.BadParameter(f"--in {value} names split {split!r}, --in-split says {in_split!r}: "
                                         "give the split once", param_hint="--in")
            return dataset, split
        return check_name(value, "--in dataset"), check_name(in_split or "test", "--in-split")
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--in") from None


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), required=True,
              metavar="DIR", help="Run directory runs/<name>.")
@click.option("--step", type=click.IntRange(min=0), default=None, metavar="N",
              help="Evaluated step. [default: the newest under <run>/eval/]")
@click.option("--in", "in_dataset", required=True, metavar="DATASET[/SPLIT]",
              help="In-distribution dataset and held-out split, e.g. celeba/test or celeba/valid "
                   "(DATASET alone: split --in-split).")
@click.option("--in-split", default=None, metavar="SPLIT",
              help="In-distribution held-out split when --in names only the dataset. [default: test]")
@click.option("--train-split", default="train", show_default=True, metavar="SPLIT",
              help="In-distribution training split (distributions and typicality; used when its dump exists).")
@click.option("--ood", "ood_specs", multiple=True, required=True, metavar="DATASET/SPLIT",
              help="OOD set, repeatable, e.g. svhn/test.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Shard root for the images of exp1/exp2. [default: the one recorded in the dumps]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Output folder. [default: <run>/figures]")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per panel in exp1/exp2.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the typicality batches.")
@click.option("--bootstrap", "n_resamples", type=click.IntRange(min=0), default=DEFAULT_RESAMPLES, show_default=True,
              metavar="N", help="Bootstrap resamples of the 95% interval of every AUROC, AUPR and FPR@95 "
                                "(0: no intervals, faster).")
@click.option("--bootstrap-seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@logger_options("the OOD table, bits/dim and figures (job type figures)")
@shared_run_option("Draw a run whose directory (or fixed folders) is a link or another user's, from dumps another "
                   "user wrote")
@exit_on_user_error
def main(run_dir, step, in_dataset, in_split, train_split, ood_specs, data_root, out_dir, k, seed, n_resamples,
         bootstrap_seed, logger, use_wandb, allow_shared_run):
    require_extra("glow-figures", "eval", EVAL_MODULES)
    from glow.report.figures import make_figures, track_figures
    from glow.report.intervals import Bootstrap
    from glow.report.scores import metric_cell
    from glow.report.tables import text_table
    from glow.tracking import run_tracker

    setup_logging()
    use_file_backend()
    if logger is None and use_wandb is not None:
        logger = "wandb" if use_wandb else "none"
    if logger is not None:
        check_tracker_installed(logger, "--logger ", "--logger none")  # before the work, not after it
    in_dataset, in_split = parse_in_spec(in_dataset, in_split)
    res = make_figures(run_dir, in_dataset, ood_specs, step=step, in_split=in_split, train_split=train_split,
                       out_dir=out_dir, data_root=data_root, k=k, seed=seed,
                       bootstrap=Bootstrap(n_resamples, bootstrap_seed), allow_shared=allow_shared_run)
    # Only a finished result opens a wandb run (a refused command leaves no empty run behind).
    tracker = run_tracker(run_dir, "figures", int(res.table["step"]),
                          f"{in_dataset}/{in_split} {' '.join(ood_specs)}", logger=logger)
    try:
        track_figures(tracker, res.table, [p for p in res.files if p.suffix == ".png"])
    finally:
        tracker.close()
    click.echo(f"figures in {res.out_dir}:")
    for p in res.files:
        click.echo(f"  {p}")
    for name, why in res.skipped.items():
        click.echo(f"  skipped {name}: {why}")
    t = res.table
    click.echo(f"\nin-distribution {t['in_distribution']}, step {t['step']}, model {t['model_hash']}")
    click.echo(text_table(["split", "bits/dim", "std", "n"],
                          [[spec, v["mean"], v["std"], v["count"]] for spec, v in t["bpd"].items()]))
    shown = ("log_likelihood", "complexity_corrected", "png_complexity", "typicality_m25")
    click.echo()
    click.echo(text_table(["OOD set", "score", "AUROC", "FPR@95"],
                          [[spec, name, metric_cell(rows[name], "auroc"), metric_cell(rows[name], "fpr_at_95_tpr")]
                           for spec, rows in t["ood"].items() for name in shown if name in rows], digits=3))
    if n_resamples:
        click.echo(f"[low, high]: 95% bootstrap intervals, {n_resamples} resamples, seed {bootstrap_seed}")

if __name__ == "__main__":
    main()
