"""Experiment tracking: `metrics.jsonl` (the source of truth) and its wandb mirror.

`metrics.jsonl` is the source of truth; wandb mirrors it. wandb runs offline
unless the user sets WANDB_MODE, and never asks for a key (it takes one from its own
login or environment if the user chose online mode).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from glow.files import atomic_write_text

__all__ = ["MetricsLog", "Tracker", "git_sha", "run_tracker"]

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
