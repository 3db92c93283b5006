"""The optimizer, its learning-rate schedule and the EMA of the weights, built from `optim.*`.

The schedule is a pure function of the step (`lr_factor`), wrapped in a `LambdaLR` that the
trainer steps once per optimizer step and saves as JSON with every checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["lr_factor", "make_ema", "make_optimizer", "make_scheduler"]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.optimizer`` over every parameter of ``model``."""
    return OPTIMIZERS[optim.optimizer](model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                       weight_decay=optim.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, optim, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then constant or cosine decay (`lr_factor`); not passed through accelerate's
    prepare, whose scheduler wrapper steps once per process."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, max_steps, optim.schedule, optim.min_lr_ratio))


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and buffers, or None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
