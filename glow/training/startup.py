"""What a training attempt checks before it writes anything, and the lines its log starts with.

`check_launch` holds the recipe against the launch: the batch layout for this world size
(`glow.training.shape`), the launcher's mixed precision and accumulation; a disagreement is a
ConfigError (exit 2) raised alike on every rank. (The model is held against its shards by
`glow.training.batches`, whose ``check`` rank 0 runs for every rank.) `log_startup` writes who,
where, the recipe's layout and precision, and what resuming on another layout changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from glow.config import Config, ConfigError
from glow.distributed import check_launcher_precision
from glow.tracking import git_sha
from glow.training.resume import ResumePoint
from glow.training.shape import BatchShape, batch_shape, layout_changes

__all__ = ["check_launch", "log_startup"]

log = logging.getLogger(__name__)


def check_launch(cfg: Config, accelerator, deepspeed: bool) -> BatchShape:
    """The layout of `train.global_batch_size` over this launch's processes; refuses a world size
    that does not divide it, and a launcher precision or accumulation the config does not state."""
    shape = batch_shape(cfg.train.global_batch_size, accelerator.num_processes, cfg.train.micro_batch_size)
    check_launcher_precision(cfg.train.precision)
    if not deepspeed and accelerator.gradient_accumulation_steps != 1:  # accelerate would divide the loss again
        raise ConfigError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={accelerator.gradient_accumulation_steps} is set: "
                          "glow-ood derives accumulation from train.global_batch_size and train.micro_batch_size; "
                          "unset it")
    return shape


def log_startup(cfg: Config, accelerator, shape: BatchShape, data, *, run_path: Path, n_parameters: int,
                resumed: ResumePoint | None, resumed_from: Path | None) -> None:
    """The first lines of the training log (every rank; rank 0's reach log.txt); ``data``: the
    run's `glow.training.batches.TrainingData`."""
    acc = accelerator
    log.info("glow-ood train: run %s, git %s, world size %d, device %s, distributed %s",
             run_path, git_sha(), acc.num_processes, acc.device, acc.distributed_type)
    if "SLURM_JOB_ID" in os.environ:
        log.info("slurm job %s, restart count %s, node %s", os.environ["SLURM_JOB_ID"],
                 os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("SLURMD_NODENAME", "?"))
    log.info("recipe: %s (train.global_batch_size=%d, train.micro_batch_size=%d), precision %s",
             shape.describe(), cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.precision)
    if resumed is not None and resumed.config_changed:
        log.warning("resuming step %d with a changed (model-compatible) config", resumed.step)
    for note in layout_changes(resumed.layout, shape) if resumed is not None else ():
        log.warning(note)
    log.info("model %s (hash %s), %d parameters", cfg.model.to_dict(), cfg.model.hash(), n_parameters)
    if resumed_from:
        log.info("resuming from %s", resumed_from)
    else:
        log.info("starting from scratch")
    if not data.samples:
        log.info("no sample grids: a flow on feature vectors has no images to draw (train.sample_every is unused)")
    if acc.is_main_process:  # readers (ranks x workers) sharing shards: say how to rebuild
        warning = data.fan_out_warning(acc.num_processes)
        if warning:
            log.warning(warning)
