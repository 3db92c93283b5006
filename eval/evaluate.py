"""Evaluation jobs on a checkpoint: bits/dim, per-sample dumps, samples, FID, latents.

\b
Examples:
  # per-sample dumps of the demo's in-distribution train/test and OOD sets, 2 CPU processes
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file train/accelerate/cpu_2proc.yaml \\
      eval/evaluate.py --checkpoint runs/demo/checkpoints/latest --task dump \\
      --data demo/train --data demo/test --data digits/test
  # CelebA test bits/dim and SVHN dump on all GPUs of a node
  accelerate launch eval/evaluate.py --checkpoint runs/celeba32/checkpoints/latest \\
      --task dump --data celeba/test --data svhn/test
  # samples at temperatures, FID against CelebA train (needs the Inception weights file)
  python eval/evaluate.py --checkpoint runs/celeba32 --task samples --task fid --data celeba/train \\
      --inception-weights ~/pt_inception-2015-12-05-6726825d.pth

Outputs go to runs/<name>/eval/step-N/ (bpd.json, dumps/<dataset>-<split>.npz, samples.png,
fid.json, latents.png). A result is skipped when it exists and was computed with the same
checkpoint, seed, data root and shard build (--force recomputes); --check-done only reports
whether anything is left (exit 0: nothing, 3: work to do). Tasks:
  dump     per-sample key, index, label, log p(x) (nats), bits/dim, PNG complexity + bpd.json
  bpd      bpd.json entry only
  samples  grid at --temperature values (same noise in every row)
  fid      FID of --fid-samples generated images against each --data split
  latents  per-level latents and coupling s/t maps of the first --latents-images of each --data
"""

import logging
import os
from pathlib import Path

import click

TASKS = ("dump", "bpd", "samples", "fid", "latents")
EXIT_PENDING = 3  # --check-done: some requested result is missing or stale


def _parse_spec(spec: str) -> tuple[str, str]:
    from glow.names import parse_spec

    try:
        return parse_spec(spec)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, metavar="PATH",
              help="A step dir, a run dir, or runs/<name>/checkpoints/latest (newest complete).")
@click.option("--task", "tasks", type=click.Choice(TASKS), multiple=True, default=("dump",), show_default=True)
@click.option("--data", "specs", multiple=True, metavar="DATASET/SPLIT", help="Repeatable, e.g. svhn/test.")
@click.option("--data-root", default=None, metavar="DIR", help="Shard root (default: the training data root).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Per process.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Loader workers per process.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of dequantization noise and samples.")
@click.option("--force", is_flag=True, help="Recompute results that exist.")
@click.option("--temperature", "temperatures", type=float, multiple=True, default=(0.0, 0.5, 0.7, 0.8, 0.9, 1.0),
              show_default=True, help="Sampling temperatures (samples and fid).")
@click.option("--samples-per-temperature", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--fid-samples", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--fid-temperature", "fid_temperatures", type=float, multiple=True, default=(1.0,), show_default=True)
@click.option("--inception-weights", default=None, metavar="FILE",
              help="pt_inception-2015-12-05-6726825d.pth (default: $TORCH_HOME/hub/checkpoints/).")
@click.option("--fid-cache", default=None, metavar="DIR", help="Reference statistics cache (default <data-root>/fid-stats).")
@click.option("--latents-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--check-done", is_flag=True,
              help="Only say whether there is work: exit 0 when every requested result exists under the same "
                   f"settings, {EXIT_PENDING} otherwise. Loads no model, starts no process group (for schedulers).")
@click.option("--convert-channels", is_flag=True,
              help="Score sets of the other modality: grayscale replicated to RGB for an RGB model, RGB to "
                   "luma (ITU-R 601-2) for a grayscale model. Without it a mismatch is an error.")
def main(checkpoint, tasks, specs, data_root, batch_size, workers, seed, force, temperatures,
         samples_per_temperature, fid_samples, fid_temperatures, inception_weights, fid_cache, latents_images,
         check_done, convert_channels):
    from glow.checkpoint import load_model, read_meta, resolve_checkpoint
    from glow.dumps import eval_dir
    from glow.evaluation import (CountMismatch, EvalContext, pending_work, run_bpd, run_fid, run_latents,
                                 run_samples)
    from glow.tracking import setup_logging
    from glow.distributed import make_accelerator
    from glow.shards import ShardError

    parsed = [_parse_spec(s) for s in specs]
    if any(t in tasks for t in ("dump", "bpd", "fid", "latents")) and not parsed:
        raise click.UsageError(f"tasks {', '.join(tasks)} need at least one --data DATASET/SPLIT")
    try:
        step_path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from err
    if check_done:
        meta = {**read_meta(step_path), "path": str(step_path)}
        ctx = EvalContext(model=None, meta=meta, out_dir=eval_dir(step_path, meta["step"]),
                          data_root=data_root or meta["data"]["root"], seed=seed)
        todo = ["everything (--force)"] if force else pending_work(
            ctx, list(tasks), parsed, temperatures=list(temperatures), per_temperature=samples_per_temperature,
            fid_temperatures=list(fid_temperatures), fid_samples=fid_samples)
        click.echo(f"to do: {', '.join(todo)}" if todo else f"done: every result is in {ctx.out_dir}")
        raise SystemExit(EXIT_PENDING if todo else 0)
    accelerator = make_accelerator()
    model, meta = load_model(step_path, accelerator.device)
    out_dir = eval_dir(step_path, meta["step"])
    setup_logging(out_dir if accelerator.is_main_process else None, accelerator.is_main_process, accelerator.process_index)
    log = logging.getLogger("evaluate")
    log.info("checkpoint %s (step %d), %d process(es), tasks %s", step_path, meta["step"],
             accelerator.num_processes, ", ".join(tasks))
    ctx = EvalContext(
        model=model, meta=meta, out_dir=out_dir, data_root=data_root or meta["data"]["root"],
        rank=accelerator.process_index, world_size=accelerator.num_processes, device=accelerator.device,
        batch_size=batch_size, num_workers=workers, seed=seed, force=force, convert_channels=convert_channels,
    )
    try:
        for task in tasks:
            if task in ("dump", "bpd"):
                for dataset, split in parsed:
                    run_bpd(ctx, dataset, split, dump=task == "dump")
            elif task == "samples":
                run_samples(ctx, list(temperatures), samples_per_temperature)
            elif task == "fid":
                cache = Path(fid_cache) if fid_cache else Path(ctx.data_root) / "fid-stats"
                for dataset, split in parsed:
                    run_fid(ctx, dataset, split, list(fid_temperatures), fid_samples, inception_weights, cache)
            elif task == "latents":
                run_latents(ctx, parsed, latents_images)
    except (CountMismatch, FileNotFoundError, ValueError, ShardError) as err:
        raise click.ClickException(str(err)) from err
    accelerator.end_training()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
