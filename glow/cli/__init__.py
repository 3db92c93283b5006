"""The command-line programs. Each module's `main` (or `cli`) is an installed console script
(glow-train, glow-eval, glow-figures, glow-report, glow-shards) and runs with `python -m glow.cli.<name>`
(so `accelerate launch -m glow.cli.train` works); the scripts in train/, eval/ and shards/ call the same code."""

from glow.config import LOGGERS

__all__ = ["LOGGERS", "use_file_backend"]


def use_file_backend() -> None:
    """The commands draw figures into files: matplotlib's Agg backend, whatever display the shell
    has. Chosen here, by the program, never at a library import (a notebook keeps its backend)."""
    import matplotlib

    matplotlib.use("Agg")
