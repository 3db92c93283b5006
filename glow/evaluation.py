"""Evaluation jobs on a checkpoint: bits/dim, per-sample dumps, samples, FID, latents.

Every sample of a split is scored exactly once over all processes, with dequantization
noise that depends on (seed, sample key) alone: per-sample scores do not depend on the
batch size, the number of workers or the number of processes. Rank 0 writes every file,
atomically; an existing result is skipped unless `force`.

Outputs (DESIGN.md): runs/<name>/eval/step-N/{bpd.json, dumps/<dataset>-<split>.npz,
samples.png, fid.json, latents.png}.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from glow.data import make_eval_loader, manifest_hash, read_manifest
from glow.distributed import barrier, gather_objects
from glow.files import atomic_write_bytes, atomic_write_text
from glow.likelihood import bits_per_dim, eval_noise, log_p_x, preprocess
from glow.metrics import png_complexity_bpd_batch
from glow.model import Glow
from glow.performance import fast_eval
from glow.sampling import sample_seeded, save_sample_grid

__all__ = [
    "CountMismatch",
    "dump_path",
    "EvalContext",
    "eval_dir",
    "run_bpd",
    "score_split",
    "update_bpd_json",
]

log = logging.getLogger(__name__)


class CountMismatch(RuntimeError):
    """The gathered number of samples differs from the manifest: never write a partial dump."""


@dataclass
class EvalContext:
    """What every evaluation task needs: the model, its checkpoint and the process layout."""

    model: Glow
    meta: dict
    out_dir: Path  # runs/<name>/eval/step-N
    data_root: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    batch_size: int = 256
    num_workers: int = 0
    seed: int = 0
    force: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def eval_dir(checkpoint_dir: Path, step: int) -> Path:
    """runs/<name>/checkpoints/step-N -> runs/<name>/eval/step-N."""
    return Path(checkpoint_dir).parent.parent / "eval" / f"step-{step:08d}"


# -- bits/dim and dumps --------------------------------------------------------------------
def score_split(ctx: EvalContext, dataset: str, split: str) -> dict[str, np.ndarray]:
    """Per-sample log p(x) (nats), bpd and PNG complexity of every sample of a split.

    Returns the merged arrays (sorted by index) on every rank; raises CountMismatch when
    the gathered count differs from the manifest.
    """
    manifest = read_manifest(ctx.data_root, dataset, split)
    expected = int(manifest["count"])
    loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=ctx.batch_size, rank=ctx.rank,
                              world_size=ctx.world_size, num_workers=ctx.num_workers)
    parts: dict[str, list] = {"key": [], "index": [], "label": [], "log_p": [], "bpd": [], "complexity_bpd": []}
    bar = tqdm(total=expected, desc=f"{dataset}/{split}", disable=not ctx.is_main, dynamic_ncols=True)
    with fast_eval(ctx.model):  # eval mode, inference mode, 1x1-conv weights computed once
        for batch in loader:
            _score_batch(ctx, batch, parts)
            bar.update(len(batch["key"]) * ctx.world_size)
    bar.close()
    local = {k: (np.array(v, dtype=str) if k == "key" else _concat(v)) for k, v in parts.items()}
    gathered = gather_objects(local, ctx.world_size)
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in local}
    if len(merged["index"]) != expected:
        raise CountMismatch(
            f"{dataset}/{split}: scored {len(merged['index'])} samples over {ctx.world_size} process(es), "
            f"the manifest ({Path(ctx.data_root) / dataset / split / 'manifest.json'}) says {expected}; "
            "the shards are incomplete or the stream lost samples: no dump written"
        )
    if len(np.unique(merged["key"])) != expected:
        raise CountMismatch(f"{dataset}/{split}: duplicate keys in the gathered scores")
    order = np.argsort(merged["index"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    merged["manifest_hash"] = manifest_hash(manifest)
    return merged


def _score_batch(ctx: EvalContext, batch: dict, parts: dict[str, list]) -> None:
    model, n_bits, n_dims = ctx.model, ctx.model.config.n_bits, ctx.model.config.n_dims
    images = batch["image"]
    if tuple(images.shape[1:]) != model.input_shape:
        raise ValueError(
            f"images have shape {tuple(images.shape[1:])}, the model expects "
            f"{model.input_shape}: evaluate on shards built at the model's resolution"
        )
    noise = eval_noise(ctx.seed, batch["key"], images.shape[1:])
    y = preprocess(images, n_bits, noise).to(ctx.device)
    log_p_y = _log_prob_full_batch(model, y, ctx.batch_size).double().cpu()
    parts["key"] += list(batch["key"])
    parts["index"].append(batch["index"].numpy())
    parts["label"].append(batch["label"].numpy())
    parts["log_p"].append(log_p_x(log_p_y, n_dims, n_bits).numpy())
    parts["bpd"].append(bits_per_dim(log_p_y, n_dims, n_bits).numpy())
    parts["complexity_bpd"].append(png_complexity_bpd_batch(images))


def _log_prob_full_batch(model: Glow, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """log_prob with a short batch padded to `batch_size`.

    Convolution kernels are chosen by batch shape; padding makes every batch the same
    shape, so a sample's score is bitwise the same whichever rank, batch and position it
    lands in (for a given --batch-size).
    """
    n = y.shape[0]
    if n < batch_size:
        y = torch.cat([y, y[-1:].expand(batch_size - n, *y.shape[1:])])
    return model.log_prob(y)[:n]


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0)


def dump_path(step_dir: Path, dataset: str, split: str) -> Path:
    """Where the per-sample dump of a split lives (the one definition of the layout)."""
    return Path(step_dir) / "dumps" / f"{dataset}-{split}.npz"


def write_dump(ctx: EvalContext, dataset: str, split: str, scores: dict) -> Path:
    path = dump_path(ctx.out_dir, dataset, split)
    buf = io.BytesIO()
    np.savez(
        buf,
        key=scores["key"], index=scores["index"].astype(np.int64), label=scores["label"].astype(np.int64),
        log_p=scores["log_p"].astype(np.float64), bpd=scores["bpd"].astype(np.float64),
        complexity_bpd=scores["complexity_bpd"].astype(np.float64),
        step=np.array(int(ctx.meta["step"])), model_hash=np.array(ctx.meta["model_hash"]),
        checkpoint=np.array(str(ctx.meta["path"])), dataset=np.array(dataset), split=np.array(split),
        data_root=np.array(str(ctx.data_root)), n_bits=np.array(int(ctx.model.config.n_bits)),
        seed=np.array(int(ctx.seed)), manifest_hash=np.array(scores["manifest_hash"]),
    )
    atomic_write_bytes(path, buf.getvalue())
    return path


def update_bpd_json(path: Path, spec: str, entry: dict) -> None:
    """Add one `<dataset>/<split>` entry to bpd.json under a file lock (array tasks share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[spec] = entry
        atomic_write_text(path, json.dumps(table, indent=2, sort_keys=True) + "\n")


def bpd_done(ctx: EvalContext, spec: str) -> bool:
    path = ctx.out_dir / "bpd.json"
    return path.exists() and spec in json.loads(path.read_text())


def run_bpd(ctx: EvalContext, dataset: str, split: str, dump: bool) -> dict | None:
    """Task `bpd` (summary only) or `dump` (summary and per-sample dump)."""
    spec = f"{dataset}/{split}"
    if not ctx.force and (dump_path(ctx.out_dir, dataset, split).exists() if dump else bpd_done(ctx, spec)):
        log.info("%s: result exists under %s, skipped (--force recomputes)", spec, ctx.out_dir)
        return None
    scores = score_split(ctx, dataset, split)
    entry = {
        "mean": float(scores["bpd"].mean()), "std": float(scores["bpd"].std()), "count": int(len(scores["bpd"])),
        "n_bits": int(ctx.model.config.n_bits), "step": int(ctx.meta["step"]),
        "model_hash": ctx.meta["model_hash"], "seed": ctx.seed,
    }
    if ctx.is_main:
        if dump:
            log.info("wrote %s", write_dump(ctx, dataset, split, scores))
        update_bpd_json(ctx.out_dir / "bpd.json", spec, entry)
        log.info("%s: %.4f bits/dim over %d samples (step %d)", spec, entry["mean"], entry["count"], entry["step"])
    barrier(ctx.world_size)
    return entry


# -- samples -------------------------------------------------------------------------------
def run_samples(ctx: EvalContext, temperatures: list[float], per_temperature: int) -> Path | None:
    path = ctx.out_dir / "samples.png"
    if path.exists() and not ctx.force:
        log.info("%s exists, skipped", path)
        return None
    if ctx.is_main:
        save_sample_grid(ctx.model, path, temperatures, per_temperature, seed=ctx.seed)
        atomic_write_text(ctx.out_dir / "samples.json", json.dumps(
            {"temperatures": temperatures, "per_temperature": per_temperature, "seed": ctx.seed}, indent=2))
        log.info("wrote %s (rows: temperatures %s)", path, temperatures)
    barrier(ctx.world_size)
    return path


def run_latents(ctx: EvalContext, specs: list[tuple[str, str]], n_images: int) -> Path | None:
    """latents.png for the first `n_images` of each split (rank 0 draws)."""
    from glow.latents import plot_latents

    path = ctx.out_dir / "latents.png"
    if path.exists() and not ctx.force:
        log.info("%s exists, skipped", path)
        return None
    if ctx.is_main:
        sets = []
        for dataset, split in specs:
            loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=n_images, rank=0, world_size=1)
            sets.append((f"{dataset}/{split}", next(iter(loader))["image"][:n_images]))
        plot_latents(ctx.model, sets, path, seed=ctx.seed)
        log.info("wrote %s", path)
    barrier(ctx.world_size)
    return path


# -- FID -----------------------------------------------------------------------------------
def run_fid(ctx: EvalContext, dataset: str, split: str, temperatures: list[float], n_samples: int,
            weights_path: str | None, cache_dir: Path) -> dict | None:
    """FID of generated samples (one seed per sample, dealt across ranks) against a split."""
    from glow.metrics import (cached_statistics, feature_statistics, frechet_distance, inception_features,
                              load_inception, statistics_key)

    path = ctx.out_dir / "fid.json"
    spec = f"{dataset}/{split}"
    existing = json.loads(path.read_text()) if path.exists() else {}
    wanted = [t for t in temperatures if ctx.force or f"{spec}@T={t}" not in existing]
    if not wanted:
        log.info("FID for %s at %s exists in %s, skipped", spec, temperatures, path)
        return None
    inception = load_inception(ctx.device, weights_path)  # fails early, clearly, without weights
    manifest = read_manifest(ctx.data_root, dataset, split)
    key = statistics_key(manifest_hash(manifest), int(ctx.model.config.image_size))

    def real_features() -> np.ndarray:
        loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=ctx.batch_size, rank=ctx.rank,
                                  world_size=ctx.world_size, num_workers=ctx.num_workers)
        local = [inception_features(b["image"], ctx.device, model=inception) for b in loader]
        feats = np.concatenate(local) if local else np.zeros((0, 2048))
        return np.concatenate(gather_objects(feats, ctx.world_size))

    # Every rank takes part in computing the features; only rank 0 writes the cache.
    mu_ref, sigma_ref = cached_statistics(cache_dir, key, real_features, write=ctx.is_main)
    results = {}
    mine = range(ctx.rank, n_samples, ctx.world_size)
    for t in wanted:
        feats = []
        for start in range(0, len(mine), ctx.batch_size):
            images = sample_seeded(ctx.model, mine[start : start + ctx.batch_size], t, ctx.seed)
            feats.append(inception_features(images, ctx.device, model=inception))
        local = np.concatenate(feats) if feats else np.zeros((0, 2048))
        allf = np.concatenate(gather_objects(local, ctx.world_size))
        mu, sigma = feature_statistics(allf)
        results[f"{spec}@T={t}"] = {
            "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "temperature": t, "n_samples": int(len(allf)),
            "reference": spec, "reference_count": int(manifest["count"]), "step": int(ctx.meta["step"]),
            "model_hash": ctx.meta["model_hash"], "seed": ctx.seed,
        }
        log.info("FID %s T=%s: %.3f (%d samples)", spec, t, results[f"{spec}@T={t}"]["fid"], len(allf))
    if ctx.is_main:
        with open(path.with_name("fid.json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = json.loads(path.read_text()) if path.exists() else {}
            table.update(results)
            atomic_write_text(path, json.dumps(table, indent=2, sort_keys=True) + "\n")
    barrier(ctx.world_size)
    return results

