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

\b
Overrides are dotted KEY=VALUE pairs applied after the config file, e.g. train.max_steps=100
model.n_levels=2 (every key and its default: docs/configuration.md). The run directory is
<run.root>/<run.name>; an existing run resumes from its newest complete checkpoint. The
shards (<data.root>/<data.dataset>/<data.split>) are checked against the model
(model.image_size, model.in_channels) before anything is written.

\b
Exit codes: 0 finished; 2 configuration or override error; 4 data error (shards missing,
corrupt or not fitting the model); 5 checkpoint error (resuming or run.init_from with
another model); 1 internal error or too many non-finite steps (with a traceback for a bug).
A stop on request (SIGUSR1, SIGTERM, <run>/STOP) saves a complete checkpoint, writes
<run>/STOPPED ("<step> <reason>"), the signal to requeue, and exits 0 (a stop is not a
failure). 2 also when another live trainer holds <run>/LOCK; 1 also when a peer died or
hung (dist.timeout_s).
"""

import sys

import click

from glow.config import load_config, to_yaml
from glow.errors import exit_on_user_error


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              metavar="YAML", help="Config file, e.g. train/configs/demo.yaml (over the defaults in glow/config.py).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config (file + overrides) and exit.")
@click.option("--no-resume", is_flag=True,
              help="Refuse to continue an existing run instead of resuming it. [default: resume]")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@exit_on_user_error
def main(config_path: str, dry_run: bool, no_resume: bool, overrides: tuple[str, ...]) -> None:
    cfg = load_config(config_path, overrides)
    if dry_run:
        click.echo(to_yaml(cfg), nl=False)
        return
    from glow.distributed import die_with_launcher, finish, make_accelerator
    from glow.training.trainer import Trainer

    die_with_launcher()
    accelerator = make_accelerator(cfg.dist.timeout_s)
    code = Trainer(cfg, accelerator, resume=not no_resume).fit()
    finish(accelerator)
    sys.exit(code)


if __name__ == "__main__":
    main()
