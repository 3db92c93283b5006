"""The command-line programs. Each module's `main` (or `cli`) is an installed console script
(glow-train, glow-eval, glow-figures, glow-report, glow-shards) and runs with `python -m glow.cli.<name>`
(so `python -m glow.cli.launch -m glow.cli.train` works; `glow.cli.launch` is `accelerate launch` keeping
a user error's exit code); the scripts in train/, eval/ and shards/ call the same code."""

import importlib.util

from glow.config import LOGGERS
from glow.errors import UserError

__all__ = ["EVAL_MODULES", "LOGGERS", "logger_options", "require_extra", "shared_run_option", "use_file_backend"]

EVAL_MODULES = ("matplotlib", "sklearn", "scipy")  # what the [eval] extra installs


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Refuse to start (exit 2) when a module of an optional extra is missing, naming the extra."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{command} needs {', '.join(missing)} (not installed): pip install 'glow-ood[{extra}]'")


def use_file_backend() -> None:
    """The commands draw figures into files: matplotlib's Agg backend, whatever display the shell
    has. Chosen here, by the program, never at a library import (a notebook keeps its backend)."""
    import matplotlib

    matplotlib.use("Agg")


def logger_options(results: str):
    """``--logger`` (the tracker that gets ``results``, beside the training run) and its hidden alias
    ``--wandb/--no-wandb``: the options of every job that reports to the run's tracker."""
    import click

    def decorate(command):
        command = click.option("--wandb/--no-wandb", "use_wandb", default=None, hidden=True,
                               help="Same as --logger wandb / --logger none. [default: the training run's "
                                    "run.logger]")(command)
        return click.option("--logger", type=click.Choice(LOGGERS), default=None,
                            help=f"Tracker for {results}, beside the training run. [default: the training run's run.logger]")(command)

    return decorate


def shared_run_option(what: str, default: str = "refuse"):
    """``--allow-shared-run``: ``what`` the command does with a run whose directory (or fixed folders)
    is a link or another user's, as a deliberately shared layout allows."""
    import click

    return click.option("--allow-shared-run", is_flag=True,
                        help=f"{what}: a deliberately shared layout (also GLOW_ALLOW_SHARED_RUN=1). "
                             f"[default: {default}]")
