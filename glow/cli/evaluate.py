"""Evaluate a checkpoint: bits/dim, per-sample dumps, samples, FID, latents.

\b
Examples:
  # per-sample dumps of the demo's in-distribution train/test and OOD sets, 2 CPU processes
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m glow.cli.launch --config_file train/accelerate/cpu_2proc.yaml \\
      eval/evaluate.py --checkpoint runs/demo/checkpoints/latest --task dump \\
      --data demo/train --data demo/test --data digits/test
  # CelebA test bits/dim and SVHN dump on all GPUs of a node
  python -m glow.cli.launch eval/evaluate.py --checkpoint runs/celeba32/checkpoints/latest \\
      --task dump --data celeba/test --data svhn/test
  # samples at temperatures, FID against CelebA train (needs the Inception weights file)
  python eval/evaluate.py --checkpoint runs/celeba32 --task samples --task fid --data celeba/train \\
      --inception-weights ~/pt_inception-2015-12-05-6726825d.pth

\b
Tasks and what each writes under runs/<name>/eval/step-N/:
  dump     dumps/<dataset>-<split>.npz (per-sample key, index, label, log p(x) in nats,
           bits/dim, PNG complexity) and the split's bpd.json entry: all figures need
  bpd      the bpd.json entry only (mean/std bits/dim); `dump` already writes it
  samples  samples.png (one row per --temperature, same noise in every row), samples.json
  fid      fid.json entry per --data split and --fid-temperature (--fid-samples images)
  latents  latents.png: per-level latents and coupling s/t maps of --latents-images images

\b
A result is skipped when it exists and was computed with the same checkpoint, seed, data
root and shard build, by you (--force recomputes); --check-done only reports whether anything
is left. Results also go to the run's tracker (run.logger: wandb, tensorboard or mlflow; job
type eval, beside the training run); --no-wandb turns that off, --wandb logs to wandb.
No --config or KEY=VALUE: the model, its data settings and its tracker come from the
checkpoint and its run (meta.json, config.yaml), and every evaluation setting is an option
here, recorded with each result so that a rerun with other settings recomputes it.
Exit codes: 0 done, 2 usage or configuration error (also: the run directory or a fixed folder
in it is a link or another user's), 3 --check-done: work to do, 4 data
error (shards missing, corrupt or not fitting the model), 5 checkpoint or FID weights error,
1 internal error (with a traceback).
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
from glow.evaluation import TASKS

EXIT_PENDING = 3  # --check-done: some requested result is missing or stale


def _parse_spec(spec: str) -> tuple[str, str]:
    from glow.names import parse_spec

    try:
        return parse_spec(spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", required=True, metavar="PATH",
              help="A step dir, a run dir, or runs/<name>/checkpoints/latest (the newest complete step).")
@click.option("--task", "tasks", type=click.Choice(TASKS), multiple=True, default=("dump",), show_default=True,
              help="What to compute, repeatable (see Tasks above).")
@click.option("--data", "specs", multiple=True, metavar="DATASET/SPLIT",
              help="Split to evaluate, repeatable, e.g. --data celeba/test --data svhn/test. "
                   "[default: none; dump, bpd, fid and latents need one]")
@click.option("--data-root", default=None, metavar="DIR",
              help="Shard root. [default: the training run's data.root, from the checkpoint]")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per process and batch.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data loader worker processes per process.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the dequantization noise and of the samples.")
@click.option("--force", is_flag=True, help="Recompute results that exist under the same settings.")
@click.option("--temperature", "temperatures", type=float, multiple=True, default=(0.0, 0.5, 0.7, 0.8, 0.9, 1.0),
              show_default=True, help="Sampling temperatures of the samples task (one row each), repeatable.")
@click.option("--samples-per-temperature", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images per row of samples.png.")
@click.option("--fid-samples", type=click.IntRange(min=2), default=50000, show_default=True,
              help="Generated images per FID value.")
@click.option("--fid-temperature", "fid_temperatures", type=float, multiple=True, default=(1.0,), show_default=True,
              help="Sampling temperatures of the fid task, repeatable (one fid.json entry each).")
@click.option("--inception-weights", default=None, metavar="FILE",
              help="pt_inception-2015-12-05-6726825d.pth, loaded as plain tensors. "
                   "[default: $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth]")
@click.option("--fid-cache", default=None, metavar="DIR",
              help="Cache of the reference statistics of each split. "
                   "[default: $GLOW_FID_CACHE, else $XDG_CACHE_HOME/glow-ood/fid-stats]")
@click.option("--latents-images", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per --data split in latents.png.")
@click.option("--check-done", is_flag=True,
              help="Only say whether there is work: exit 0 when every requested result exists under the same "
                   f"settings, {EXIT_PENDING} otherwise. Loads no model, starts no process group (for schedulers).")
@click.option("--convert-channels", is_flag=True,
              help="Score sets of the other modality: grayscale replicated to RGB for an RGB model, RGB to "
                   "luma (ITU-R 601-2) for a grayscale model. Without it a mismatch is an error.")
@logger_options("the results (job type eval)")
@shared_run_option("Evaluate a run whose directory (or fixed folders) is a link or another user's, and take "
                   "results another user wrote as done", "refuse them; recompute results you did not write")
@exit_on_user_error
def main(checkpoint, tasks, specs, data_root, batch_size, workers, seed, force, temperatures,
         samples_per_temperature, fid_samples, fid_temperatures, inception_weights, fid_cache, latents_images,
         check_done, convert_channels, logger, use_wandb, allow_shared_run):
    require_extra("glow-eval", "eval", EVAL_MODULES)
    from glow.evaluation import job
    from glow.evaluation.tasks import EvalOptions

    parsed = [_parse_spec(s) for s in specs]
    if logger is None and use_wandb is not None:
        logger = "wandb" if use_wandb else "none"
    if any(t in tasks for t in ("dump", "bpd", "fid", "latents")) and not parsed:
        raise click.UsageError(f"tasks {', '.join(tasks)} need at least one --data DATASET/SPLIT")
    options = EvalOptions(
        tasks=list(tasks), specs=parsed, data_root=data_root, batch_size=batch_size, workers=workers, seed=seed,
        force=force, temperatures=list(temperatures), samples_per_temperature=samples_per_temperature,
        fid_samples=fid_samples, fid_temperatures=list(fid_temperatures), inception_weights=inception_weights,
        fid_cache=fid_cache, latents_images=latents_images, convert_channels=convert_channels, logger=logger,
        allow_shared=allow_shared_run)
    if check_done:
        todo, out_dir = job.check_done(checkpoint, options)
        click.echo(f"to do: {', '.join(todo)}" if todo else f"done: every result is in {out_dir}")
        raise SystemExit(EXIT_PENDING if todo else 0)
    if logger is not None:
        check_tracker_installed(logger, "--logger ", "--logger none")  # before the work, not after it
    if "latents" in tasks:
        use_file_backend()
    job.evaluate(checkpoint, options)


if __name__ == "__main__":
    main()
