"""Experiment tracking: `metrics.jsonl` (the source of truth) and its mirror in a tracker.

``run.logger`` picks the mirror: ``none``, ``wandb``, ``tensorboard`` or ``mlflow``. The
trackers are accelerate's own classes (``accelerate.tracking``: what
``Accelerator(log_with=...)`` builds), started on the main process only: training creates
its tracker on rank 0, and every evaluation or figures job logs from its main process.
``metrics.jsonl`` is written whatever the logger.

Training and every evaluation job of a run log into one place, told apart by job type
(train, eval, figures), each with a stable id so a requeued job continues its own record:
- wandb: project ``run.wandb_project``, group = the run name; offline (``<run>/wandb/``,
  ``wandb sync`` uploads) unless ``run.wandb_mode`` is ``online``; ``WANDB_MODE`` in the
  environment, when set, wins (wandb's own convention). No API key is read or written here.
- tensorboard: ``<run>/tensorboard/<job>`` (``tensorboard --logdir runs``); a resumed job
  purges the events past its restart step, so curves do not double.
- mlflow: experiment ``run.wandb_project``, tracking URI ``$MLFLOW_TRACKING_URI`` (a site's
  server) or else the run's own SQLite store ``<run>/mlflow.db``; the run ids are kept
  under ``<run>/mlflow_ids/``.
Nothing here changes the environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

from glow.config import ConfigError, check_tracker_installed
from glow.files import atomic_write_text, open_append, read_text
from glow.run import Run

__all__ = ["MetricsLog", "Tracker", "git_sha", "run_tracker"]

log = logging.getLogger(__name__)

METRICS_CAP = 1 << 30  # metrics.jsonl: ~200 bytes a line, a million lines fit many times over
SMALL_FILE_CAP = 1 << 20  # config.yaml, the tracker id files


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
        for line in read_text(self.path, METRICS_CAP).splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        fd = open_append(self.path)  # never through a link; O_EXCL when it creates the file
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def _flat(config: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists become strings (TensorBoard hparams and
    MLflow params take scalars only)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _kept_id(path: Path) -> str | None:
    """The id a previous attempt stored at ``path`` (None: first attempt)."""
    if not path.is_file():
        return None
    return read_text(path, SMALL_FILE_CAP).strip() or None


class Tracker:
    """The mirror of the metrics and results in the tracker ``kind`` (or nothing, for 'none').

    ``run`` is the accelerate tracker while one is open (None otherwise). ``config`` is the
    run's resolved config as a dict (its ``run.wandb_mode`` is read from it); ``step`` is the
    checkpoint step an evaluation job reports on (summaries are logged at it).
    """

    def __init__(self, kind: str, run_dir: Path, project: str, name: str, config: dict, *,
                 job_type: str = "train", run_id: str | None = None, display_name: str | None = None,
                 step: int | None = None):
        self.run = None
        self.kind = kind
        self.step = step
        if kind == "none":
            return
        check_tracker_installed(kind)
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its state (a figures job has no Accelerator)
        run_dir = Path(run_dir)
        display_name = display_name or name
        if kind == "wandb":
            self.run = _start_wandb(run_dir, project, name, config, job_type, run_id, display_name)
        elif kind == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            self.run = TensorBoardTracker(run_id or job_type, Run(run_dir).tensorboard_dir)
            self._config = _flat(config)
            self._started = False
            if step is not None:
                self._start_tensorboard(step)
        elif kind == "mlflow":
            self.run = _start_mlflow(run_dir, project, name, config, job_type, run_id or job_type, display_name)
        else:
            raise ValueError(f"unknown tracker {kind!r}")

    def _start_tensorboard(self, step: int) -> None:
        """Open the event writer at the first event: ``purge_step`` hides what an earlier
        attempt logged from this step on (a resumed run replays those steps)."""
        if self.kind == "tensorboard" and not self._started:
            self.run.init_kwargs["purge_step"] = step
            self.run.start()
            self.run.store_init_configuration(self._config)
            self._started = True

    def log(self, record: dict, step: int | None) -> None:
        if self.run is not None:
            self._start_tensorboard(step or 0)
            self.run.log(record, step=step)

    def log_image(self, key: str, path: Path, step: int | None) -> None:
        if self.run is None:
            return
        self._start_tensorboard(step or 0)
        if self.kind == "wandb":
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)
        elif self.kind == "tensorboard":
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.run.log_images({key: pixels[None]}, step=step, dataformats="NHWC")
        else:
            self.run.log_artifact(str(path), artifact_path=key)

    def log_summary(self, values: dict) -> None:
        """Headline numbers (bits/dim per split, FID): one value per key, shown in run tables."""
        if self.run is None:
            return
        if self.kind == "wandb":
            self.run.tracker.summary.update(values)
        else:
            self.log(values, self.step)

    def log_histogram(self, key: str, values, step: int | None) -> None:
        """A distribution (per-sample bits/dim); MLflow has no histograms (the dumps hold the values)."""
        if self.run is None:
            return
        self._start_tensorboard(step or 0)
        if self.kind == "wandb":
            import wandb

            self.run.log({key: wandb.Histogram(values)}, step=step)
        elif self.kind == "tensorboard":
            import numpy as np

            self.run.tracker.add_histogram(key, np.asarray(values), global_step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None) -> None:
        if self.run is None:
            return
        self._start_tensorboard(step or 0)
        if self.kind == "wandb":
            self.run.log_table(key, columns=columns, data=rows, step=step)
        elif self.kind == "tensorboard":
            lines = [columns, ["---"] * len(columns), *rows]
            self.run.log({key: "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)},
                         step=step)
        else:
            import mlflow

            mlflow.log_dict({"columns": columns, "data": rows}, f"{key}.json")

    def close(self) -> None:
        if self.run is not None:
            if self.kind != "tensorboard" or self._started:
                self.run.finish()
            self.run = None


def _start_wandb(run_dir: Path, project: str, name: str, config: dict, job_type: str, run_id: str | None,
                 display_name: str):
    import wandb
    from accelerate.tracking import WandBTracker

    # The environment wins when it says something (wandb's convention); else run.wandb_mode.
    mode = {} if "WANDB_MODE" in os.environ else {"mode": config.get("run", {}).get("wandb_mode", "offline")}
    quiet = {} if "WANDB_SILENT" in os.environ else {"silent": True}
    # Set up before the run starts wandb's service: given only to init, the mode comes too late
    # and an offline run still resolves wandb's host names (a DNS query from an offline node).
    wandb.setup(settings=wandb.Settings(**mode, **quiet))
    init = {"group": name, "job_type": job_type, "name": display_name, "id": run_id or _wandb_id(run_dir, name),
            "resume": "allow", "dir": str(run_dir), "config": config, **mode}
    tracker = WandBTracker(project, **init)
    tracker.start()
    return tracker


def _start_mlflow(run_dir: Path, project: str, name: str, config: dict, job_type: str, key: str,
                  display_name: str):
    import mlflow
    from accelerate.tracking import MLflowTracker

    if not os.environ.get("MLFLOW_TRACKING_URI"):  # else MLflow's default would be ./mlflow.db of the cwd
        mlflow.set_tracking_uri(f"sqlite:///{Run(run_dir).mlflow_db_path.resolve()}")
    id_file = Run(run_dir).mlflow_ids_dir / key
    known = _kept_id(id_file)
    tracker = MLflowTracker(experiment_name=project, run_id=known, run_name=display_name,
                            tags={"glow.group": name, "glow.job_type": job_type})
    tracker.start()
    if known is None:  # params are logged once: MLflow refuses a changed value (e.g. a longer max_steps)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, tracker.tracker.info.run_id)
        tracker.store_init_configuration(_flat(config))
    return tracker


def run_tracker(run_dir: str | Path, job_type: str, step: int, detail: str = "", enabled: bool | None = None,
                extra_config: dict | None = None, logger: str | None = None) -> Tracker:
    """The tracker of an evaluation or figures job of the run in ``run_dir``.

    Project, logger and config come from ``<run>/config.yaml`` (as written by training);
    ``logger`` overrides its ``run.logger``; so does ``enabled`` (``--wandb/--no-wandb``:
    True is wandb, False none). The run's own tracker, when its package is missing here, is
    skipped with a warning; one asked for explicitly is an error (exit 2). The id is a
    function of (run, job type, checkpoint step, ``detail``), so a requeued job continues its
    own record.
    """
    run_dir = Path(run_dir)
    config = Run(run_dir).config()
    run = config.get("run", {})
    name = run.get("name", run_dir.name)
    # A folder without config.yaml was not made by train.py: no tracker unless asked for.
    if logger is None and enabled is None:
        logger = run.get("logger", "none")
        try:
            check_tracker_installed(logger)
        except ConfigError as err:  # the results are on disk already; the mirror is what is missing
            log.warning("%s job: results not sent to the run's tracker: %s", job_type, err)
            logger = "none"
    elif logger is None:
        logger = "wandb" if enabled else "none"
    digest = hashlib.sha256(f"{run_dir.resolve()}|{job_type}|{step}|{detail}".encode()).hexdigest()[:10]
    return Tracker(
        logger, run_dir, run.get("wandb_project", "glow-ood"), name,
        {**config, **(extra_config or {}), "checkpoint_step": step},
        job_type=job_type, run_id=f"{job_type}-{digest}", display_name=f"{name}-{job_type}-step{step}", step=step,
    )


def _wandb_id(run_dir: Path, name: str) -> str:
    """A stable id per run directory, so a requeued job continues the same wandb run."""
    path = Run(run_dir).wandb_id_path
    known = _kept_id(path)
    if known:
        return known
    run_id = f"{name[:40]}-{hashlib.sha256(f'{run_dir.resolve()}{time.time()}'.encode()).hexdigest()[:8]}"
    atomic_write_text(path, run_id)
    return run_id
