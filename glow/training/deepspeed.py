"""The DeepSpeed engine's batch, accumulation, clipping and precision, taken from the training config.

Under DeepSpeed the engine accumulates, clips and steps by its own config, which accelerate
fills from the launcher (`train/accelerate/deepspeed_zero2.yaml`, `--gradient_accumulation_steps`,
a DeepSpeed JSON file). The recipe is the one source: the batch layout comes from
`glow.training.shape` (the same derivation as without DeepSpeed), clipping from `optim.grad_clip`,
precision from `train.precision`. A launcher value that disagrees is refused with what to change;
accelerate's placeholders ("auto", its default accumulation of 1) are filled in.
"""

from __future__ import annotations

import logging

from glow.config import ConfigError
from glow.training.shape import BatchShape

__all__ = ["configure_deepspeed"]

log = logging.getLogger(__name__)
_PLACEHOLDERS = ("auto", None)


def _stated(value) -> bool:
    return value not in _PLACEHOLDERS


def configure_deepspeed(ds: dict, shape: BatchShape, grad_clip: float) -> None:
    """Write the recipe's layout and clipping into the DeepSpeed config ``ds`` (before `prepare`)."""
    derived = {"train_micro_batch_size_per_gpu": shape.micro_batch, "gradient_accumulation_steps": shape.accumulation,
               "train_batch_size": shape.global_batch}
    for key, ours in derived.items():
        theirs = ds.get(key)
        if key == "gradient_accumulation_steps" and str(theirs) == "1":
            theirs = None  # accelerate's default: states nothing
        if _stated(theirs) and int(theirs) != ours:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={theirs}, but train.global_batch_size={shape.global_batch} over "
                f"{shape.world_size} process(es) gives {ours} ({shape.describe()}): remove {key} from the DeepSpeed "
                "config (glow-ood derives it), or change train.global_batch_size / train.micro_batch_size")
    ds.update(derived)
    for dtype in ("fp16", "bf16"):
        if str((ds.get(dtype) or {}).get("enabled", False)).lower() == "true":
            raise ConfigError(
                f"the DeepSpeed config enables {dtype}: glow-ood keeps the weights in fp32 and applies "
                f"train.precision itself; remove {dtype} from the DeepSpeed config and set train.precision=bf16 "
                "for bf16 coupling networks")
    theirs = ds.get("gradient_clipping", "auto")
    if _stated(theirs) and float(theirs) != grad_clip:
        log.warning("DeepSpeed config sets gradient_clipping=%s; optim.grad_clip=%s is used instead", theirs, grad_clip)
    ds["gradient_clipping"] = float(grad_clip)
    log.info("DeepSpeed: train_micro_batch_size_per_gpu=%d, gradient_accumulation_steps=%d, train_batch_size=%d, "
             "gradient_clipping=%s (from the training config)", shape.micro_batch, shape.accumulation,
             shape.global_batch, grad_clip)
