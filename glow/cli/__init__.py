"""The command-line programs. Each module's `main` (or `cli`) is an installed console script
(glow-train, glow-eval, glow-figures, glow-report, glow-shards) and runs with `python -m glow.cli.<name>`
(so `python -m glow.cli.launch -m glow.cli.train` works; `glow.cli.launch` is `accelerate launch` keeping
a user error's exit code); the scripts in train/, eval/ and shards/ call the same code."""

import importlib.util

from glow.config import LOGGERS
from glow.errors import UserError

__all__ = ["EVAL_MODULES", "LOGGERS", "require_extra", "use_file_backend"]

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
