"""Fast paths that do not change what the model computes (see docs/PERFORMANCE.md).

Training (options in `TrainConfig`, applied by `apply_fast_paths` from `Trainer._build`):
- `train.channels_last`: the coupling networks take their input in channels-last memory
  format (a forward pre-hook), so every convolution inside runs NHWC. Parameters keep
  their default format, so checkpoints are unchanged.
- `train.checkpointing`: each flow step is recomputed in the backward pass
  (`torch.utils.checkpoint`, `use_reentrant=False`) instead of keeping its activations.
- `train.compile`: `nn.Module.compile` in place (state-dict keys unchanged) of the
  model's `forward`, i.e. the training log-likelihood; `sample`/`log_prob` calls made
  directly stay eager. ActNorm's data-dependent init must have happened before the first
  compiled call (the trainer initializes, or loads a checkpoint, first).

Evaluation: `eval_log_prob(model, y)` / `with fast_eval(model): ...` run in eval mode
under `torch.inference_mode` with every LU 1x1-convolution weight and its inverse
computed once (`cached_weights`). The cache is ignored whenever autograd is on or a
parameter changed since it was made, and dropped when the context exits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from glow.model.flows import ActNorm, CouplingNet, InvConv2dLU

__all__ = ["apply_fast_paths", "apply_train_config", "cached_weights", "eval_log_prob", "fast_eval", "uninitialized_actnorms"]

log = logging.getLogger(__name__)


def _channels_last_input(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


def uninitialized_actnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ActNorm) and not bool(m.initialized)]


def apply_fast_paths(
    model: nn.Module,
    *,
    compile: bool = False,
    channels_last: bool = False,
    checkpointing: bool = False,
    compile_mode: str = "default",
) -> nn.Module:
    """Switch on the requested training fast paths, in place; returns `model`.

    `model` is a `glow.model.Glow` (not wrapped by DDP). Call it after ActNorm's
    data-dependent init or before loading a checkpoint, and before the optimizer is
    built from its parameters (they stay the same objects either way).
    """
    if channels_last:
        for module in model.modules():
            if isinstance(module, CouplingNet):
                module.register_forward_pre_hook(_channels_last_input)
    if checkpointing:
        if not hasattr(model, "checkpoint_steps"):
            raise TypeError(f"train.checkpointing needs a glow.model.Glow, got {type(model).__name__}")
        model.checkpoint_steps = True
    if compile:
        pending = uninitialized_actnorms(model)
        if pending:
            log.info("torch.compile: %d ActNorm layers not initialized yet; they must be (init pass or "
                     "checkpoint load) before the first training step", len(pending))
        model.compile(mode=None if compile_mode == "default" else compile_mode)
    enabled = [n for n, on in (("compile", compile), ("channels_last", channels_last),
                               ("checkpointing", checkpointing)) if on]
    if enabled:
        log.info("training fast paths: %s", ", ".join(enabled))
    return model


def apply_train_config(model: nn.Module, train_cfg) -> nn.Module:
    """`apply_fast_paths` with the options of a `glow.config.TrainConfig`."""
    return apply_fast_paths(model, compile=train_cfg.compile, channels_last=train_cfg.channels_last,
                            checkpointing=train_cfg.checkpointing, compile_mode=train_cfg.compile_mode)


@contextlib.contextmanager
def cached_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Compute every InvConv2dLU weight and inverse once for the duration of the block."""
    layers = [m for m in model.modules() if isinstance(m, InvConv2dLU)]
    for layer in layers:
        layer.cache_weights()
    try:
        yield model
    finally:
        for layer in layers:
            layer.clear_cache()


@contextlib.contextmanager
def fast_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode + `torch.inference_mode` + cached 1x1-conv weights; restores the mode on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), cached_weights(model):
            yield model
    finally:
        model.train(was_training)


def eval_log_prob(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Per-sample log p_y (nats) through the inference fast path; an inference tensor."""
    with fast_eval(model):
        return model.log_prob(y)
