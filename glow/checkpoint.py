"""What a checkpoint holds and how it is written and loaded (where it is: `glow.run`).

A step directory holds
    state/              accelerate state (model, optimizer, RNG per rank, registered objects)
    model.safetensors   weights for evaluation (the EMA weights when EMA is enabled)
    meta.json           step, model config and hash, config hash, data, seed
    COMPLETE            written by rank 0 after every rank saved: only then the step counts
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load, save

from glow import __version__
from glow.errors import CheckpointError, CheckpointMismatch, CheckpointMissing
from glow.files import atomic_write_bytes, atomic_write_text, read_bytes, read_json
from glow.model import Glow, GlowConfig
from glow.run import Checkpoint, resolve_checkpoint

__all__ = [
    "EMA_WEIGHTS",
    "TRAINER_STATE",
    "check_model_hash",
    "check_own_files",
    "check_rng_state",
    "checkpoint_meta",
    "load_model",
    "load_weights",
    "load_trainer_state",
    "save_trainer_state",
    "warm_start",
    "write_export",
]

log = logging.getLogger(__name__)
MAX_WEIGHTS_BYTES = 64 << 30  # model.safetensors / ema.safetensors: far above any Glow we train


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read without following links, with a size cap (never a pickle)."""
    return load(read_bytes(path, MAX_WEIGHTS_BYTES))


def checkpoint_meta(cfg, *, step: int, images_seen: int, ema: bool, replica_digests: list[str],
                    world_size: int) -> dict:
    """meta.json of a training checkpoint: what evaluation needs to rebuild and describe the model."""
    from glow.config import config_hash

    return {
        "step": int(step),
        "images_seen": int(images_seen),
        "model_config": cfg.model.to_dict(),
        "model_hash": cfg.model.hash(),
        "config_hash": config_hash(cfg),
        "data": {"root": cfg.data.root, "dataset": cfg.data.dataset},
        "seed": cfg.train.seed,
        "ema": bool(ema),
        "perturb_prob": cfg.data.perturb_prob,
        "replica_digests": list(replica_digests),
        "world_size": int(world_size),
        "version": __version__,
    }


def check_model_hash(meta: dict, config: GlowConfig, what: str) -> None:
    """The one model-hash check: ``meta`` (a checkpoint's) must describe ``config``'s architecture.

    ``what`` says what was attempted ("resume", "run.init_from", "load"); CheckpointMismatch
    (exit 5) names the checkpoint and both configs.
    """
    stored = meta["model_hash"]
    if stored != config.hash():
        raise CheckpointMismatch(
            f"{what} {meta.get('path', '?')}: its model config (hash {stored}, {meta['model_config']}) differs "
            f"from the requested one (hash {config.hash()}, {config.to_dict()}); give the same model settings, "
            "another checkpoint, or another run.name")


def write_export(checkpoint: Checkpoint, state_dict: dict[str, torch.Tensor], meta: dict) -> None:
    """model.safetensors + meta.json (rank 0 only; before COMPLETE)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"model_hash": meta["model_hash"], "step": str(meta["step"])})
    atomic_write_bytes(checkpoint.model_path, blob)
    atomic_write_text(checkpoint.meta_path, json.dumps(meta, indent=2, sort_keys=True))


# ------------------------------------------------------------------ trainer state, no pickles
TRAINER_STATE = "trainer_state.json"  # counters and LR-scheduler state
MAX_TRAINER_STATE_BYTES = 16 << 20  # a few KB; the loss window grows with train.log_every
EMA_WEIGHTS = "ema.safetensors"


def save_trainer_state(state_dir: str | Path, counters: dict, scheduler: dict, ema: dict | None) -> None:
    """The trainer's own state beside accelerate's files, as JSON and safetensors only.

    (accelerate's `register_for_checkpointing` would pickle these and unpickle them on resume
    with ``weights_only=False``: a planted file in a shared run directory would run code.)
    """
    state_dir = Path(state_dir)
    atomic_write_text(state_dir / TRAINER_STATE, json.dumps({"counters": counters, "scheduler": scheduler},
                                                            indent=1, sort_keys=True))
    if ema is not None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in ema.items()}
        atomic_write_bytes(state_dir / EMA_WEIGHTS, save(tensors))


def load_trainer_state(state_dir: str | Path, ema: bool) -> tuple[dict, dict, dict | None]:
    """(counters, scheduler state, EMA state dict or None) written by `save_trainer_state`."""
    state_dir = Path(state_dir)
    path = state_dir / TRAINER_STATE
    if not path.is_file():
        raise CheckpointMissing(f"{path} is missing: {state_dir} was not written by this version of glow-ood "
                                "(older checkpoints pickled this state); start a new run or use run.init_from")
    stored = read_json(path, MAX_TRAINER_STATE_BYTES)
    weights = None
    if ema:
        ema_path = state_dir / EMA_WEIGHTS
        if not ema_path.is_file():
            raise CheckpointMissing(f"{ema_path} is missing but optim.ema_decay > 0: the run was started without EMA")
        weights = load_weights(ema_path)
    return stored["counters"], stored["scheduler"], weights


def check_rng_state(state_dir: str | Path, process_index: int) -> None:
    """Load this rank's RNG file as accelerate will (``weights_only=True``), but fail loudly:
    accelerate swallows the error, and the run would resume silently with other noise."""
    from accelerate.utils import load

    path = Path(state_dir) / f"random_states_{process_index}.pkl"
    try:
        load(path)
    except Exception as err:
        raise CheckpointMismatch(f"{path} cannot be read as plain tensors ({type(err).__name__}: {str(err)[:200]}); "
                         "exact resume needs it: resume from an earlier checkpoint or start a new run") from None


class CheckpointNotOwned(CheckpointError, PermissionError):
    """A DeepSpeed state directory holding files of another user (DeepSpeed unpickles them)."""


def check_own_files(directory: str | Path) -> None:
    """Refuse a directory holding files of another user (for loaders that unpickle, e.g. DeepSpeed's)."""
    me = os.getuid()
    for path in sorted(Path(directory).rglob("*")):
        owner = path.lstat().st_uid
        if owner != me:
            raise CheckpointNotOwned(
                f"{path} belongs to user id {owner}, not to you ({me}): DeepSpeed resumes by unpickling its state "
                "files, so glow-ood resumes DeepSpeed runs only from files you wrote. Copy the run (cp -r makes "
                "the files yours) after checking where it came from, or warm-start from its model.safetensors "
                "with run.init_from"
            )


def warm_start(model: Glow, spec: str | Path) -> Checkpoint:
    """Load the exported weights of the checkpoint at ``spec`` (`run.init_from`) into ``model``,
    whose config must have the same hash; returns the checkpoint used."""
    source = resolve_checkpoint(spec)
    check_model_hash(source.meta(), model.config, "run.init_from")
    model.load_state_dict(load_weights(source.model_path))
    return source


def load_model(spec: str | Path | Checkpoint, device: str | torch.device = "cpu") -> tuple[Glow, dict]:
    """Model weights and meta of a checkpoint (never the optimizer), in eval mode.

    ``spec``: a :class:`glow.run.Checkpoint`, or anything :func:`glow.run.resolve_checkpoint` takes.
    """
    checkpoint = spec if isinstance(spec, Checkpoint) else resolve_checkpoint(spec)
    meta = checkpoint.meta()
    config = GlowConfig.from_dict(meta["model_config"])
    if config.hash() != meta["model_hash"]:
        raise CheckpointMismatch(
            f"{checkpoint.meta_path}: model_hash {meta['model_hash']} does not match its model_config "
            f"({config.hash()}); the checkpoint was written by an incompatible version"
        )
    model = Glow(config)
    model.load_state_dict(load_weights(checkpoint.model_path))
    return model.to(device).eval(), meta
