"""Checkpoints: `runs/<name>/checkpoints/step-%08d/` with a COMPLETE marker written last.

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
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from glow.errors import CheckpointError, CheckpointMismatch, CheckpointMissing
from glow.files import atomic_write_bytes, atomic_write_text
from glow.model import Glow, GlowConfig
from glow.names import STEP_RE, step_dir_name

__all__ = [
    "complete_checkpoints",
    "latest_checkpoint",
    "load_model",
    "prune_checkpoints",
    "read_meta",
    "resolve_checkpoint",
    "step_dir",
    "write_export",
]

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / step_dir_name(step)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    return [(s, p) for s, p in _step_dirs(Path(run_dir)) if (p / COMPLETE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    complete = complete_checkpoints(run_dir)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step dir, a run dir, or `<run>/checkpoints/latest` -> a complete step dir."""
    path = Path(path)
    if path.name == "latest":
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (path / COMPLETE).is_file():
        return path
    if STEP_RE.match(path.name):
        raise CheckpointMissing(f"checkpoint {path} is not complete (no {COMPLETE} file) or does not exist")
    run_dir = path.parent if path.name == "checkpoints" else path
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointMissing(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    return latest


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and stale partial saves."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return
    newest = complete[-1][0]
    keep_steps = {s for s, _ in complete[-keep:]}
    for step, path in _step_dirs(Path(run_dir)):
        stale_partial = step < newest and not (path / COMPLETE).is_file()
        if (step not in keep_steps and (path / COMPLETE).is_file()) or stale_partial:
            # Remove the marker first: a crash mid-delete leaves an incomplete dir, never
            # a "complete" one with files missing.
            (path / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def write_export(directory: Path, state_dict: dict[str, torch.Tensor], meta: dict) -> None:
    """model.safetensors + meta.json (rank 0 only; before COMPLETE)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"model_hash": meta["model_hash"], "step": str(meta["step"])})
    atomic_write_bytes(directory / "model.safetensors", blob)
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2, sort_keys=True))


# ------------------------------------------------------------------ trainer state, no pickles
TRAINER_STATE = "trainer_state.json"  # counters and LR-scheduler state
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
    stored = json.loads(path.read_text())
    weights = None
    if ema:
        ema_path = state_dir / EMA_WEIGHTS
        if not ema_path.is_file():
            raise CheckpointMissing(f"{ema_path} is missing but optim.ema_decay > 0: the run was started without EMA")
        weights = load_file(str(ema_path))
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


def warm_start(model: Glow, path: str | Path) -> Path:
    """Load the exported weights of the checkpoint at ``path`` (`run.init_from`) into ``model``,
    whose config must have the same hash; returns the step dir used."""
    source = resolve_checkpoint(path)
    meta = read_meta(source)
    if meta["model_hash"] != model.config.hash():
        raise CheckpointMismatch(
            f"run.init_from {source}: its model config (hash {meta['model_hash']}, {meta['model_config']}) "
            f"differs from model.* of this config (hash {model.config.hash()}): give the same model settings "
            "or another run.init_from")
    model.load_state_dict(load_file(str(source / "model.safetensors")))
    return source


def read_meta(step_path: str | Path) -> dict:
    path = Path(step_path) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointMissing(f"{path} is missing: not a glow-ood checkpoint") from err


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Glow, dict]:
    """Model weights and meta of a checkpoint (never the optimizer), in eval mode."""
    step_path = resolve_checkpoint(path)
    meta = read_meta(step_path)
    config = GlowConfig.from_dict(meta["model_config"])
    if config.hash() != meta["model_hash"]:
        raise CheckpointMismatch(
            f"{step_path / 'meta.json'}: model_hash {meta['model_hash']} does not match its model_config "
            f"({config.hash()}); the checkpoint was written by an incompatible version"
        )
    model = Glow(config)
    model.load_state_dict(load_file(str(step_path / "model.safetensors")))
    meta["path"] = str(step_path)
    return model.to(device).eval(), meta
