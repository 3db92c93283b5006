"""Train a Glow on WebDataset shards, on one device or many.

\b
Examples:
  # the CPU demo, 2 processes (real DDP over gloo)
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file train/accelerate/cpu_2proc.yaml \\
      train/train.py --config train/configs/demo.yaml
  # CelebA 32x32 (Kirichenko et al. 2020) on all GPUs of a machine
  accelerate launch --config_file train/accelerate/multi_gpu.yaml train/train.py \\
      --config train/configs/celeba32.yaml data.root=/data/shards run.name=celeba32
  # print the resolved config and exit
  python train/train.py --config train/configs/tiny.yaml --dry-run train.max_steps=10

Overrides are dotted key=value pairs (see glow/config.py for every key). The run directory
is <run.root>/<run.name>; an existing run resumes from its newest complete checkpoint.
Exit codes: 0 finished, 75 stopped on request (resumable; <run>/STOPPED is written),
1 failed.
"""

import sys

import click

from glow.config import ConfigError, load_config, to_yaml


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              metavar="YAML", help="Config file in train/configs/ (overrides the dataclass defaults).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--no-resume", is_flag=True, help="Refuse to continue an existing run instead of resuming it.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def main(config_path: str, dry_run: bool, no_resume: bool, overrides: tuple[str, ...]) -> None:
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    if dry_run:
        click.echo(to_yaml(cfg), nl=False)
        return
    from glow.distributed import make_accelerator
    from glow.trainer import Trainer

    accelerator = make_accelerator()
    try:
        code = Trainer(cfg, accelerator, resume=not no_resume).fit()
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    accelerator.end_training()
    sys.exit(code)


if __name__ == "__main__":
    main()
