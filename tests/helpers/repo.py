"""The repository's paths and scripts, and the two ways a test runs an entry point: as a subprocess
(:func:`run`, when the process boundary is the subject) or in this process (:func:`invoke`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train" / "train.py"
EVALUATE = REPO / "eval" / "evaluate.py"
FIGURES = REPO / "eval" / "figures.py"
TINY = REPO / "train" / "configs" / "tiny.yaml"
CPU_2PROC = REPO / "train" / "accelerate" / "cpu_2proc.yaml"


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment for a CPU subprocess: one thread, wandb offline, this checkout's glow."""
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               PYTHONPATH=str(REPO), **extra)
    return env


def run(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cmd`` in the repository with :func:`cpu_env` (or ``env``), output captured as text."""
    return subprocess.run(cmd, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def load_script(path: str | Path, name: str | None = None):
    """The module of a script under the repository (``eval/figures.py``), loaded without running
    its ``__main__`` block."""
    path = REPO / path
    spec = importlib.util.spec_from_file_location(name or f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Result:
    """What :func:`invoke` saw: the exit status and the two streams (as a subprocess's)."""

    returncode: int
    stdout: str
    stderr: str


def invoke(command, *args: str, env: dict[str, str] | None = None, bugs_propagate: bool = True) -> Result:
    """A click entry point (``glow.cli.evaluate.main``) run in this process with ``args``, as its
    console script would be: exit status, stdout (the log lines included) and stderr apart. An
    exception that is not a user error propagates with its traceback, as it does in the script;
    with ``bugs_propagate=False`` it is status 1 with the exception in stderr instead."""
    import logging

    from click.testing import CliRunner

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(command, [str(a) for a in args], env=env, catch_exceptions=not bugs_propagate)
    finally:  # the entry point's log handlers write to the runner's streams and to the run's log.txt
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], root.level = saved
    code = result.exit_code if isinstance(result.exit_code, int) else 1
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    return Result(code, result.stdout, result.stderr + (f"\n{result.exception!r}" if crashed else ""))
