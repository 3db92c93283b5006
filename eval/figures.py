"""Merge the evaluation dumps of a run into figures, the OOD table and one page of results (CPU, files only).

\b
Examples:
  # CelebA vs SVHN (Kirichenko et al. 2020), newest evaluated step
  python eval/figures.py --run runs/celeba32 --in celeba/test --ood svhn/test
  # the CPU demo, a given step, validation split as in-distribution, shards moved since the dumps
  python eval/figures.py --run runs/demo --step 3000 --in demo/valid --ood digits/test --data-root data/shards
  # several runs (model variants) side by side, with a background model for the likelihood ratio
  python eval/figures.py compare --run runs/demo --run runs/demo_cycle --background runs/demo_background \\
      --in demo --ood digits/test --out runs/comparison
  # the benchmark matrix of the papers: one run per in-distribution set, AUROC per OOD set
  python eval/figures.py matrix --run runs/fashion_mnist32 --run runs/cifar10_32 --run runs/celeba32 \\
      --ood mnist/test --ood svhn/test --ood celeba/test --ood cifar10/test --ood cifar100/test --out runs/matrix

\b
Reads runs/<name>/eval/step-N/dumps/<dataset>-<split>.npz (written by
`eval/evaluate.py --task dump`) and writes runs/<name>/figures/: distributions.png,
exp1.png, exp2.png, samples.png, ood.json, ood.md and index.html (the whole result on one
self-contained page: open it in a browser). The in-distribution training split's dump
(--train-split) adds the typicality rows. With the run's run.logger wandb, the table and
figures also go to wandb (job type figures; offline in <run>/wandb/ unless WANDB_MODE says
otherwise). `compare` writes compare.json and compare.md (one row per variant and score;
see docs/variants.md); `matrix` writes matrix.json, matrix.md and matrix.png (rows = runs,
columns = OOD sets; docs/matrix.md). Exit codes: 0 done, 2 usage error, 4 dumps missing or
not matching, 1 internal error (with a traceback).
"""

import click

from glow.errors import exit_on_user_error
from glow.figures import make_figures


def _in_spec(value: str, in_split: str | None) -> tuple[str, str]:
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


class _DefaultToFigures(click.Group):
    """`figures.py [OPTIONS]` runs the `figures` command (the single-run usage); `figures.py compare ...`."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["figures", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToFigures, help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    pass


@main.command("figures", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--wandb/--no-wandb", "use_wandb", default=None,
              help="Log the OOD table, bits/dim and figures to wandb (job type figures, in the training run's "
                   "project and group). [default: as the training run's run.logger]")
@exit_on_user_error
def figures(run_dir, step, in_dataset, in_split, train_split, ood_specs, data_root, out_dir, k, seed, use_wandb):
    """Figures, the OOD table and index.html of one run (what `figures.py --run ...` runs).

    \b
    Example:
      python eval/figures.py --run runs/demo --in demo/test --ood digits/test
    """
    import logging

    from glow.figures import track_figures
    from glow.tracking import run_tracker

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    in_dataset, in_split = _in_spec(in_dataset, in_split)
    res = make_figures(run_dir, in_dataset, ood_specs, step=step, in_split=in_split, train_split=train_split,
                       out_dir=out_dir, data_root=data_root, k=k, seed=seed)
    # Only a finished result opens a wandb run (a refused command leaves no empty run behind).
    tracker = run_tracker(run_dir, "figures", int(res.table["step"]),
                          f"{in_dataset}/{in_split} {' '.join(ood_specs)}", enabled=use_wandb)
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
    for spec, v in t["bpd"].items():
        click.echo(f"  {spec:<22} {v['mean']:.4f} bits/dim (std {v['std']:.4f}, n={v['count']})")
    click.echo(f"{'OOD set':<24}{'score':<22}{'AUROC':>8}{'FPR@95':>8}")
    for spec, rows in t["ood"].items():
        for name in ("log_likelihood", "complexity_corrected", "png_complexity", "typicality_m25"):
            if name in rows:
                click.echo(f"{spec:<24}{name:<22}{rows[name]['auroc']:>8.4f}{rows[name]['fpr_at_95_tpr']:>8.4f}")


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
@exit_on_user_error
def compare(run_dirs, background, in_dataset, in_split, ood_specs, step, out_dir):
    """Several runs side by side: compare.json / compare.md, one row per (variant, score).

    \b
    Example:
      python eval/figures.py compare --run runs/demo --run runs/demo_cycle --in demo/test --ood digits/test
    """
    import logging

    from glow.compare import compare_runs

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    in_dataset, in_split = _in_spec(in_dataset, in_split)
    table, files = compare_runs(run_dirs, in_dataset, ood_specs, background=background, out_dir=out_dir,
                                in_split=in_split, step=step)
    for p in files:
        click.echo(f"wrote {p}")
    header = "".join(f"{s + ' AUROC':>22}" for s in table["ood_sets"])
    click.echo(f"{'variant':<24}{'score':<22}{'test bpd':>9}{header}")
    for row in table["rows"]:
        bpd = "-" if row["test_bpd"] is None else f"{row['test_bpd']:.4f}"
        aurocs = "".join(f"{row['ood'][s]['auroc']:>22.4f}" for s in table["ood_sets"])
        click.echo(f"{row['variant']:<24}{row['score']:<22}{bpd:>9}{aurocs}")


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
@exit_on_user_error
def matrix(runs, ood_specs, score, step, in_split, train_split, seed, out_dir):
    """The OOD benchmark matrix: rows = in-distribution models, columns = OOD sets, cells = AUROC.

    \b
    Example:
      python eval/figures.py matrix --run runs/cifar10_32 --run runs/celeba32 --ood svhn/test --out runs/matrix
    """
    import logging
    from pathlib import Path

    from glow.matrix import format_cell, write_matrix

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = out_dir or str(Path(runs[0].partition("=")[0]).parent / "matrix")
    table, files = write_matrix(runs, ood_specs, out, score=score, step=step, in_split=in_split,
                                train_split=train_split, seed=seed)
    for p in files:
        click.echo(f"wrote {p}")
    click.echo(f"AUROC of {score}:")
    click.echo(f"{'model (in-distribution)':<36}" + "".join(f"{s:>16}" for s in table["ood_sets"]))
    for r in table["rows"]:
        click.echo(f"{r['label'] + ' (' + r['in_distribution'] + ')':<36}"
                   + "".join(f"{format_cell(r, s, score):>16}" for s in table["ood_sets"]))


if __name__ == "__main__":
    main()
