"""Logging and experiment tracking.

stdlib logging: the main process at INFO to stdout and `<run>/log.txt`, the others at
WARNING. `metrics.jsonl` is the source of truth; wandb mirrors it. wandb runs offline
unless the user sets WANDB_MODE, and never asks for a key (it takes one from its own
login or environment if the user chose online mode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from glow.files import atomic_write_text

__all__ = ["MetricsLog", "Progress", "Tracker", "git_sha", "run_tracker", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: Path | None, is_main: bool, rank: int = 0) -> None:
    """Configure the root logger once per process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_glow", False):
            root.removeHandler(handler)
    level = logging.INFO if is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    prefix = "" if is_main else f"[rank {rank}] "
    for handler in handlers:
        handler.setFormatter(logging.Formatter(prefix + FORMAT))
        handler._glow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # accelerate reports every file of every save at INFO; keep the run log readable.
    for noisy in ("accelerate", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


class Tracker:
    """wandb mirror of the metrics and results (or nothing, with logger 'none').

    Training and every evaluation job of a run log into the same project and group (the run
    name), told apart by ``job_type`` (train, eval, figures): a sweep compares them in one
    place. Offline by default (``<run>/wandb/``; ``wandb sync`` uploads), online when
    WANDB_MODE says so; no API key is read or written here.
    """

    def __init__(self, kind: str, run_dir: Path, project: str, name: str, config: dict, *,
                 job_type: str = "train", run_id: str | None = None, display_name: str | None = None):
        self.run = None
        if kind != "wandb":
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=project, group=name, job_type=job_type, name=display_name or name,
            id=run_id or _wandb_id(run_dir, name), resume="allow", dir=str(run_dir), config=config,
        )

    def log(self, record: dict, step: int | None) -> None:
        if self.run is not None:
            self.run.log(record, step=step)

    def log_image(self, key: str, path: Path, step: int | None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def log_summary(self, values: dict) -> None:
        """Headline numbers (bits/dim per split, FID): one value per key, shown in run tables."""
        if self.run is not None:
            self.run.summary.update(values)

    def log_histogram(self, key: str, values, step: int | None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Histogram(values)}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def run_tracker(run_dir: str | Path, job_type: str, step: int, detail: str = "", enabled: bool | None = None,
                extra_config: dict | None = None) -> Tracker:
    """The tracker of an evaluation or figures job of the run in ``run_dir``.

    Project, logger and config come from ``<run>/config.yaml`` (as written by training);
    ``enabled`` overrides its ``run.logger`` (None: follow it). The wandb id is a function
    of (run, job type, checkpoint step, ``detail``), so a requeued job continues its own
    wandb run and ``wandb sync`` merges its offline folders in order.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    run = config.get("run", {})
    name = run.get("name", run_dir.name)
    # A folder without config.yaml was not made by train.py: no tracker unless asked for.
    wanted = (path.is_file() and run.get("logger", "wandb") == "wandb") if enabled is None else enabled
    digest = hashlib.sha256(f"{run_dir.resolve()}|{job_type}|{step}|{detail}".encode()).hexdigest()[:10]
    return Tracker(
        "wandb" if wanted else "none", run_dir, run.get("wandb_project", "glow-ood"), name,
        {**config, **(extra_config or {}), "checkpoint_step": step},
        job_type=job_type, run_id=f"{job_type}-{digest}", display_name=f"{name}-{job_type}-step{step}",
    )


def _wandb_id(run_dir: Path, name: str) -> str:
    """A stable id per run directory, so a requeued job continues the same wandb run."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    run_id = f"{name[:40]}-{hashlib.sha256(f'{run_dir.resolve()}{time.time()}'.encode()).hexdigest()[:8]}"
    atomic_write_text(path, run_id)
    return run_id


class Progress:
    """Progress of a loop, suited to where the output goes.

    On a terminal: a tqdm bar. Anywhere else (a Slurm log file, a pipe): no carriage-return
    noise, but one log line every ``every_s`` seconds and at the end, e.g.
    ``train: step 1200/5000 (24%), 812 img/s, 3.412 bits/dim, ETA 0:07:48``.
    """

    def __init__(self, total: int, initial: int = 0, *, desc: str, enabled: bool = True, unit: str = "step",
                 images_per_unit: int = 0, every_s: float = 60.0, stream=None):
        from tqdm.auto import tqdm

        self.total, self.count, self.desc, self.unit, self.every_s = total, initial, desc, unit, every_s
        self.images_per_unit = images_per_unit
        self.enabled = enabled
        stream = stream if stream is not None else sys.stderr
        self.terminal = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.terminal, dynamic_ncols=True,
                        mininterval=2.0, file=stream) if self.terminal else None
        self.start_count, self.start = initial, time.perf_counter()
        self.last_line = self.start
        self.fields: dict[str, str] = {}

    def update(self, n: int = 1, **fields: str) -> None:
        """Advance by ``n``; ``fields`` (e.g. bits/dim) are shown with the next report."""
        self.count += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self._line()

    def line(self) -> str:
        """The one-line report (also logged periodically off a terminal)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = self.count - self.start_count
        rate = done / elapsed
        parts = [f"{self.desc}: {self.unit} {self.count}/{self.total} ({100 * self.count / max(self.total, 1):.0f}%)"]
        if self.images_per_unit:
            parts.append(f"{rate * self.images_per_unit:.0f} img/s")
        else:
            parts.append(f"{rate:.2f} {self.unit}/s")
        parts += [f"{v} {k}" for k, v in self.fields.items()]
        if rate > 0 and self.count < self.total:
            parts.append(f"ETA {_duration((self.total - self.count) / rate)}")
        return ", ".join(parts)

    def _line(self) -> None:
        logging.getLogger("progress").info(self.line())
        self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.count > self.start_count:
            self._line()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
