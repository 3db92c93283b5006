"""Train a Glow on WebDataset shards, on one device or many.

\b
Examples:
  # the CPU demo, 2 processes (real DDP over gloo); installed: glow-train, or -m glow.cli.train
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m glow.cli.launch --config_file "$(glow-train --launch-config cpu_2proc)" \\
      -m glow.cli.train --config demo
  # CelebA 32x32 (Kirichenko et al. 2020) on all GPUs of a machine, from a checkout
  python -m glow.cli.launch --config_file train/accelerate/multi_gpu.yaml train/train.py \\
      --config train/configs/celeba32.yaml data.root=/data/shards run.name=celeba32
  # print the resolved config and exit (interpolation between keys works)
  python -m glow.cli.train --config tiny --dry-run train.max_steps=10 'run.name=${data.dataset}_L${model.n_levels}'

\b
--config takes a YAML file or the name of a shipped config (--list-configs shows them);
without it the library defaults apply (run.name must then be given). Overrides are dotted
KEY=VALUE pairs applied after the config file, e.g. train.max_steps=100 model.n_levels=2
(every key and its default: docs/configuration.md). The run directory is
<run.root>/<run.name>; an existing run resumes from its newest complete checkpoint. The
shards (<data.root>/<data.dataset>/<data.split>) are checked against the model
(model.image_size, model.in_channels) before anything is written.

\b
Exit codes: 0 finished; 2 configuration or override error; 4 data error (shards missing,
corrupt or not fitting the model); 5 checkpoint error (resuming or run.init_from with
another model); 1 internal error or too many non-finite steps (with a traceback for a bug).
A stop on request (SIGUSR1, SIGTERM, <run>/STOP) saves a complete checkpoint, writes
<run>/STOPPED ("<step> <reason>"), the signal to requeue, and exits 0 (a stop is not a
failure); <run>/FINISH does the same at the next step but ends for good (reason FINISH: no
requeue, evaluation follows). 2 also when another live trainer holds <run>/LOCK, or when the
run directory or a fixed folder in it is a link or another user's (--allow-shared-run); 5 also
when the disk has no room for a checkpoint; 1 also when a peer died or hung (dist.timeout_s).
Several processes: launch with python -m glow.cli.launch to keep these codes (accelerate
launch alone reports 1).
"""

import sys

import click

from glow.config import (
    launch_config_path,
    launch_configs,
    load_config,
    shipped_configs,
    to_yaml,
)
from glow.errors import exit_on_user_error


def _list_configs(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    for title, shipped in (("training configs (--config NAME)", shipped_configs()),
                           ("accelerate launch configs (--launch-config NAME)", launch_configs())):
        click.echo(f"{title}:")
        for name, path in shipped.items():
            click.echo(f"  {name:<24} {path}")
    ctx.exit(0)


def _print_launch_config(ctx: click.Context, _param, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    click.echo(str(exit_on_user_error(launch_config_path)(value)))
    ctx.exit(0)


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", default=None, metavar="YAML|NAME",
              help="Config file, or the name of a shipped one (e.g. demo, celeba32), over the library defaults "
                   "(glow/config.py). [default: the library defaults alone]")
@click.option("--dry-run", is_flag=True, help="Print the resolved config (file + overrides) and exit.")
@click.option("--no-resume", is_flag=True,
              help="Refuse to continue an existing run instead of resuming it. [default: resume]")
@click.option("--allow-shared-run", is_flag=True,
              help="Work in a run directory (or fixed folders in it) that is a link or another user's: a "
                   "deliberately shared layout (also GLOW_ALLOW_SHARED_RUN=1; docs/cluster.md, Trust and sharing). "
                   "[default: refuse]")
@click.option("--list-configs", is_flag=True, expose_value=False, is_eager=True, callback=_list_configs,
              help="List the shipped training and accelerate launch configs with their files, and exit.")
@click.option("--launch-config", metavar="NAME", default=None, expose_value=False, is_eager=True,
              callback=_print_launch_config,
              help="Print the file of a shipped accelerate launch config (cpu_2proc, multi_gpu, deepspeed_zero2) "
                   "for `accelerate launch --config_file`, and exit. [default: not printed]")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@exit_on_user_error
def main(config_path: str | None, dry_run: bool, no_resume: bool, allow_shared_run: bool,
         overrides: tuple[str, ...]) -> None:
    cfg = load_config(config_path, overrides)
    if dry_run:
        click.echo(to_yaml(cfg), nl=False)
        return
    from glow.distributed import die_with_launcher, finish, make_accelerator
    from glow.training.trainer import Trainer

    die_with_launcher()
    accelerator = make_accelerator(cfg.dist.timeout_s)
    code = Trainer(cfg, accelerator, resume=not no_resume, allow_shared=allow_shared_run).fit()
    finish(accelerator)
    sys.exit(code)


if __name__ == "__main__":
    main()
