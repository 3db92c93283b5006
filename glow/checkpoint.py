"""What a checkpoint holds and how it is written and loaded (where it is: `glow.run`).

A step directory holds
    state/              accelerate state (model, optimizer, RNG per rank, registered objects)
    model.safetensors   weights for evaluation (the EMA weights when EMA is enabled)
    meta.json           step, model config and hash, config hash, data, seed, batch layout, precision
    COMPLETE            written by rank 0 after every rank saved: only then the step counts

A checkpoint is never group-writable: its folders are created without group write
(`glow.run.Run.new_step_folder`), and after each save the state accelerate and DeepSpeed wrote
loses group and other write permission whatever the umask (`seal_state`). DeepSpeed state is
unpickled on load, so it is accepted only when nothing in it is a link, another user's, or
writable by group or others (`check_deepspeed_state`). Before
a save the free space is checked against the size of the last checkpoint, and a disk that fills
during one is named in one line, in log.txt too (`check_disk_space`, `disk_full_named`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load, save

from glow import __version__
from glow.errors import (
    CheckpointError,
    CheckpointMismatch,
    CheckpointMissing,
    UserError,
)
from glow.files import atomic_write_bytes, atomic_write_text, read_bytes, read_json
from glow.model import Glow, GlowConfig, TabularFlowConfig, build_model, model_config
from glow.run import Checkpoint, Run, resolve_checkpoint
from glow.trust import check_private_tree, make_private_tree

__all__ = [
    "EMA_WEIGHTS",
    "TRAINER_STATE",
    "DiskFull",
    "check_deepspeed_state",
    "check_disk_space",
    "check_model_hash",
    "check_rng_state",
    "checkpoint_meta",
    "disk_full_named",
    "load_model",
    "load_trainer_state",
    "load_weights",
    "prepare_save",
    "save_trainer_state",
    "seal_state",
    "warm_start",
    "write_export",
]

log = logging.getLogger(__name__)
MAX_WEIGHTS_BYTES = 64 << 30  # model.safetensors / ema.safetensors: far above any Glow we train


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read without following links, with a size cap (never a pickle)."""
    return load(read_bytes(path, MAX_WEIGHTS_BYTES))


def checkpoint_meta(cfg, *, step: int, images_seen: int, ema: bool, replica_digests: list[str],
                    layout: Mapping[str, int]) -> dict:
    """meta.json of a training checkpoint: what evaluation needs to rebuild and describe the model,
    and how the step was taken: ``layout`` (world_size, micro_batch_size, accumulation_steps,
    global_batch_size: `glow.training.shape.BatchShape.as_meta`) and the precision."""
    from glow.config import config_hash

    return {
        **{key: int(value) for key, value in layout.items()},
        "precision": cfg.train.precision,
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
        "version": __version__,
    }


def check_model_hash(meta: dict, config: GlowConfig | TabularFlowConfig, what: str) -> None:
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


class DeepSpeedStateRefused(CheckpointError, PermissionError):
    """DeepSpeed state that someone other than its writer could have changed (DeepSpeed unpickles it)."""


_DEEPSPEED_ADVICE = ("DeepSpeed resumes by unpickling its state, so glow-ood resumes it only from files you wrote "
                     "that no one else can change. Copy the run (cp -r makes the files yours) after checking where "
                     "it came from, or warm-start from its model.safetensors with run.init_from")


def check_deepspeed_state(state_dir: str | Path) -> None:
    """Refuse (exit 5, naming the path) DeepSpeed state holding a link, a file or folder of
    another user, or anything group- or other-writable (before it is loaded)."""
    check_private_tree(state_dir, DeepSpeedStateRefused, _DEEPSPEED_ADVICE)


def seal_state(state_dir: str | Path) -> None:
    """After a save (rank 0, every rank done): no group or other write permission anywhere in the
    state, whatever the umask, so no one else can change it in place before a resume."""
    make_private_tree(state_dir, DeepSpeedStateRefused, _DEEPSPEED_ADVICE)


# ------------------------------------------------------------------ a full disk
DISK_MARGIN = 1.1  # a new checkpoint needs the last one's size plus this margin


class DiskFull(CheckpointError, OSError):
    """No room on the run's filesystem for a checkpoint (exit 5); the last complete one is intact."""


def _disk(path: Path) -> str:
    """The filesystem holding ``path``: its mount point, and its device where /proc/mounts says."""
    mount = path.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    with contextlib.suppress(OSError):
        with open("/proc/mounts", encoding="utf-8", errors="replace") as table:
            devices = [line.split()[0] for line in table if line.split()[1:2] == [str(mount)]]
        if devices:
            return f"{mount} ({devices[-1]})"
    return str(mount)


def _size(folder: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(folder) for f in files)


def _human(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('B', 'KB', 'MB', 'GB', 'TB')[unit]}" if unit else f"{int(n)} B"


def check_disk_space(run: Run) -> None:
    """Before a save (rank 0 decides for every rank): DiskFull, in one line naming the disk and
    its free space, when the filesystem of checkpoints/ has less room than the last complete
    checkpoint took (with DISK_MARGIN). Nothing to compare with before the first checkpoint."""
    last = run.latest()
    if last is None:
        return
    need, free = _size(last.path) * DISK_MARGIN, shutil.disk_usage(run.checkpoints_dir).free
    if free < need:
        message = (f"not enough space for a checkpoint on {_disk(run.checkpoints_dir)}: {_human(free)} free, the last "
                   f"checkpoint ({last.path}) took {_human(need / DISK_MARGIN)}; free space there or lower "
                   "train.keep_checkpoints, then resume (the last checkpoint is intact)")
        log.error("%s", message)
        raise DiskFull(message)


def prepare_save(run: Run, step: int) -> None:
    """Before every rank saves the checkpoint of ``step`` (rank 0 decides): room for it
    (`check_disk_space`) and a fresh folder no one else can write (`glow.run.Run.new_step_folder`)."""
    check_disk_space(run)
    run.new_step_folder(step)


FULL_BELOW = 1 << 20  # a failed write that leaves less than this free was a full disk


def _out_of_space(err: BaseException, free: int) -> bool:
    """Whether ``err`` came from a full disk: ENOSPC or a quota, or a writer that loses the errno
    (torch: "basic_ios::clear: iostream error", "unexpected pos"; safetensors: "os error 28")
    failing while the filesystem has next to nothing left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(err) for s in ("No space left", "os error 28", "Disk quota exceeded")) or free < FULL_BELOW


@contextlib.contextmanager
def disk_full_named(run: Run, is_main: bool) -> Iterator[None]:
    """Training inside: a write that fails for lack of space becomes DiskFull (exit 5), one line
    naming the disk and its free space, logged (so in log.txt) as well as raised. Rank 0 first
    removes the partial checkpoint the failed save left (the last complete one is intact), which
    also makes room for that line. Anything else passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not _out_of_space(err, shutil.disk_usage(run.path).free):
            raise
        if is_main:
            newest = run.latest_step()
            for partial in (c for c in run.step_folders() if c.step > newest and not c.is_complete()):
                shutil.rmtree(partial.path, ignore_errors=True)
        what = "disk quota exceeded" if isinstance(err, OSError) and err.errno == errno.EDQUOT else "no space left"
        message = (f"{what} on {_disk(run.path)} ({_human(shutil.disk_usage(run.path).free)} free now) while writing "
                   f"under {run.path} ({type(err).__name__}: {str(err)[:200]}); the last complete checkpoint is intact: "
                   "free space there, then resume")
        log.error("%s", message)
        raise DiskFull(message) from None


def warm_start(model: Glow, spec: str | Path) -> Checkpoint:
    """Load the exported weights of the checkpoint at ``spec`` (`run.init_from`) into ``model``,
    whose config must have the same hash; returns the checkpoint used."""
    source = resolve_checkpoint(spec)
    check_model_hash(source.meta(), model.config, "run.init_from")
    model.load_state_dict(load_weights(source.model_path))
    return source


def model_of(meta: dict, where: str | Path):
    """A fresh model of the kind and architecture ``meta`` (a checkpoint's meta.json at ``where``)
    describes (`glow.model.model_config`: a Glow, or the flow on vectors), its hash checked
    against the stored one; CheckpointMismatch (exit 5) when the config is unknown or the hash
    differs (written by an incompatible version)."""
    try:
        config = model_config(meta["model_config"])
    except (ValueError, TypeError) as err:
        raise CheckpointMismatch(f"{where}: its model_config cannot be read ({err}); the checkpoint was written by "
                                 "an incompatible version") from None
    if config.hash() != meta["model_hash"]:
        raise CheckpointMismatch(
            f"{where}: model_hash {meta['model_hash']} does not match its model_config "
            f"({config.hash()}); the checkpoint was written by an incompatible version"
        )
    return build_model(config)


def load_model(spec: str | Path | Checkpoint, device: str | torch.device = "cpu") -> tuple[Glow, dict]:
    """Model weights and meta of a checkpoint (never the optimizer), in eval mode: a `Glow`, or a
    `glow.model.tabular.TabularFlow` for a ``model.kind: tabular`` run.

    ``spec``: a :class:`glow.run.Checkpoint`, or anything :func:`glow.run.resolve_checkpoint` takes.
    """
    checkpoint = spec if isinstance(spec, Checkpoint) else resolve_checkpoint(spec)
    meta = checkpoint.meta()
    model = model_of(meta, checkpoint.meta_path)
    model.load_state_dict(load_weights(checkpoint.model_path))
    return model.to(device).eval(), meta
