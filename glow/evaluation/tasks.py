"""Evaluation jobs on a checkpoint: bits/dim, per-sample dumps, samples, FID, latents.

Every sample of a split is scored exactly once over all processes, with dequantization
noise that depends on (seed, sample key) alone: per-sample scores do not depend on the
batch size, the number of workers or the number of processes. Rank 0 writes every file,
atomically; an existing result is skipped unless `force`.

Outputs: runs/<name>/eval/step-N/{bpd.json, dumps/<dataset>-<split>.npz,
samples.png, fid.json, latents.png}.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glow.data.streams import (
    check_channels,
    make_eval_loader,
    manifest_hash,
    read_manifest,
)
from glow.distributed import barrier, gather_objects
from glow.errors import DataError
from glow.evaluation.complexity import png_complexity_bpd_batch
from glow.evaluation.dumps import dump_path, load_dump, write_dump
from glow.evaluation.result_tables import add_entries, is_done, mismatched_settings
from glow.files import atomic_write_json
from glow.model import Glow, GlowConfig
from glow.model.likelihood import (
    bits_per_dim,
    eval_noise,
    log_p_x,
    preprocess,
    quantize,
    requantize,
)
from glow.model.performance import fast_eval
from glow.model.sampling import sample_seeded, save_sample_grid
from glow.progress import Progress

__all__ = [
    "CountMismatch",
    "EvalContext",
    "check_eval_data",
    "pending_work",
    "run_bpd",
    "run_fid",
    "run_latents",
    "run_samples",
    "score_split",
    "track_results",
]

log = logging.getLogger(__name__)


class CountMismatch(DataError, RuntimeError):
    """The gathered number of samples differs from the manifest: never write a partial dump."""


@dataclass
class EvalContext:
    """What every evaluation task needs: the model, its checkpoint and the process layout."""

    model: Glow | None  # None: only the skip-if-done checks (`pending_work`) can run
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
    convert_channels: bool = False  # evaluate a set of the other modality (gray <-> RGB) by converting it

    def loader_args(self) -> dict:
        """What every scoring stream needs to give images the model's shape (glow.data.streams.check_channels)."""
        cfg = self.model.config
        return {"channels": cfg.in_channels, "convert_channels": self.convert_channels, "resolution": cfg.image_size}

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_eval_data(data_root: str, meta: dict, specs: list[tuple[str, str]], convert_channels: bool = False) -> None:
    """Every split exists, is complete and fits the checkpoint's model (resolution; channels
    unless converted): checked at start, before a process group or a model is set up."""
    config = GlowConfig.from_dict(meta["model_config"])
    for dataset, split in specs:
        manifest = read_manifest(data_root, dataset, split)
        check_channels(manifest, Path(data_root) / dataset / split, config.in_channels, convert_channels,
                       config.image_size)


# -- bits/dim and dumps --------------------------------------------------------------------
def score_split(ctx: EvalContext, dataset: str, split: str) -> dict[str, np.ndarray]:
    """Per-sample log p(x) (nats), bpd and PNG complexity of every sample of a split.

    Returns the merged arrays (sorted by index) on every rank; raises CountMismatch when
    the gathered count differs from the manifest.
    """
    manifest = read_manifest(ctx.data_root, dataset, split)
    expected = int(manifest["count"])
    loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=ctx.batch_size, rank=ctx.rank,
                              world_size=ctx.world_size, num_workers=ctx.num_workers, **ctx.loader_args())
    parts: dict[str, list] = {"key": [], "index": [], "label": [], "log_p": [], "bpd": [], "complexity_bpd": []}
    bar = Progress(expected, desc=f"{dataset}/{split}", enabled=ctx.is_main, unit="image", every_s=60.0)
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
    # L(x) of the image the model scored: the n_bits bins (Serra et al. compare code lengths of one image)
    parts["complexity_bpd"].append(png_complexity_bpd_batch(quantize(images, n_bits)))


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


def _settings(ctx: EvalContext, manifest: dict) -> dict:
    """What a result of this job depends on besides the split: a stored result is reused only
    when all of it matches (another seed, data root, shard build or checkpoint recomputes)."""
    return {"step": int(ctx.meta["step"]), "model_hash": ctx.meta["model_hash"], "seed": int(ctx.seed),
            "data_root": str(Path(ctx.data_root).resolve()), "manifest_hash": manifest_hash(manifest)}


def _dump_done(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        d = load_dump(path)
    except ValueError as err:
        log.warning("%s is unreadable (%s): recomputing", path, err)
        return False
    stored = {k: getattr(d, k) for k in settings}
    stored["data_root"] = str(Path(d.data_root).resolve())
    diff = mismatched_settings(stored, settings)
    if diff:
        log.info("%s was computed with other settings (%s): recomputing", path,
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    return not diff


def _bpd_done(ctx: EvalContext, dataset: str, split: str, dump: bool) -> bool:
    settings = _settings(ctx, read_manifest(ctx.data_root, dataset, split))
    if dump:
        return _dump_done(dump_path(ctx.out_dir, dataset, split), settings)
    return is_done(ctx.out_dir / "bpd.json", f"{dataset}/{split}", settings)


def _fid_pending(ctx: EvalContext, dataset: str, split: str, temperatures: list[float], n_samples: int) -> list[float]:
    """The temperatures whose FID against this split is not yet in fid.json under these settings."""
    settings = _fid_settings(ctx, read_manifest(ctx.data_root, dataset, split), n_samples)
    return [t for t in temperatures if not is_done(ctx.out_dir / "fid.json", f"{dataset}/{split}@T={t}", settings)]


def _fid_settings(ctx: EvalContext, manifest: dict, n_samples: int) -> dict:
    return {**_settings(ctx, manifest), "n_samples": int(n_samples)}


def _samples_settings(ctx: EvalContext, temperatures: list[float], per_temperature: int) -> dict:
    return {"temperatures": [float(t) for t in temperatures], "per_temperature": int(per_temperature),
            "seed": int(ctx.seed), "step": int(ctx.meta["step"]), "model_hash": ctx.meta["model_hash"]}


def _samples_done(ctx: EvalContext, temperatures: list[float], per_temperature: int) -> bool:
    path, record = ctx.out_dir / "samples.png", ctx.out_dir / "samples.json"
    if not (path.is_file() and record.is_file()):
        return False
    stored = json.loads(record.read_text())
    return not mismatched_settings(stored, _samples_settings(ctx, temperatures, per_temperature))


def pending_work(ctx: EvalContext, tasks: list[str], specs: list[tuple[str, str]], *, temperatures: list[float],
                 per_temperature: int, fid_temperatures: list[float], fid_samples: int) -> list[str]:
    """What the given tasks would compute (empty: all done under the same settings).

    The one skip-if-done rule: the tasks themselves skip by it, and a scheduler asks it
    before starting processes (`eval/evaluate.py --check-done`). Needs ``ctx.meta``, not the model.
    """
    todo = []
    for task in tasks:
        if task in ("dump", "bpd"):
            todo += [f"{task} {d}/{s}" for d, s in specs if not _bpd_done(ctx, d, s, task == "dump")]
        elif task == "samples" and not _samples_done(ctx, temperatures, per_temperature):
            todo.append("samples")
        elif task == "latents" and not (ctx.out_dir / "latents.png").is_file():
            todo.append("latents")
        elif task == "fid":
            todo += [f"fid {d}/{s} T={t}" for d, s in specs for t in _fid_pending(ctx, d, s, fid_temperatures,
                                                                                    fid_samples)]
    return todo


def run_bpd(ctx: EvalContext, dataset: str, split: str, dump: bool) -> dict | None:
    """Task `bpd` (summary only) or `dump` (summary and per-sample dump)."""
    spec = f"{dataset}/{split}"
    manifest = read_manifest(ctx.data_root, dataset, split)
    settings = _settings(ctx, manifest)
    path = dump_path(ctx.out_dir, dataset, split)
    if not ctx.force and _bpd_done(ctx, dataset, split, dump):
        log.info("%s: result exists under %s, skipped (--force recomputes)", spec, ctx.out_dir)
        return None
    scores = score_split(ctx, dataset, split)
    entry = {
        "mean": float(scores["bpd"].mean()), "std": float(scores["bpd"].std()), "count": int(len(scores["bpd"])),
        "n_bits": int(ctx.model.config.n_bits), **settings,
    }
    if manifest.get("channels", 3) != ctx.model.config.in_channels:  # only reachable with --convert-channels
        entry["channels_converted"] = f"{manifest.get('channels', 3)} -> {ctx.model.config.in_channels}"
    if ctx.is_main:
        if dump:
            write_dump(path, scores, checkpoint=str(ctx.meta["path"]), dataset=dataset, split=split,
                       n_bits=int(ctx.model.config.n_bits), **settings)
            log.info("wrote %s", path)
        add_entries(ctx.out_dir / "bpd.json", {spec: entry})
        log.info("%s: %.4f bits/dim over %d samples (step %d)", spec, entry["mean"], entry["count"], entry["step"])
    barrier(ctx.world_size)
    return entry


# -- samples -------------------------------------------------------------------------------
def run_samples(ctx: EvalContext, temperatures: list[float], per_temperature: int) -> Path | None:
    path = ctx.out_dir / "samples.png"
    if not ctx.force and _samples_done(ctx, temperatures, per_temperature):
        log.info("%s exists, skipped", path)
        return None
    if ctx.is_main:
        save_sample_grid(ctx.model, path, temperatures, per_temperature, seed=ctx.seed)
        atomic_write_json(ctx.out_dir / "samples.json", _samples_settings(ctx, temperatures, per_temperature))
        log.info("wrote %s (rows: temperatures %s)", path, temperatures)
    barrier(ctx.world_size)
    return path


def run_latents(ctx: EvalContext, specs: list[tuple[str, str]], n_images: int) -> Path | None:
    """latents.png for the first `n_images` of each split (rank 0 draws)."""
    from glow.evaluation.latents import plot_latents

    path = ctx.out_dir / "latents.png"
    if path.exists() and not ctx.force:
        log.info("%s exists, skipped", path)
        return None
    if ctx.is_main:
        sets = []
        for dataset, split in specs:
            loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=n_images, rank=0, world_size=1,
                                      **ctx.loader_args())
            sets.append((f"{dataset}/{split}", next(iter(loader))["image"][:n_images]))
        plot_latents(ctx.model, sets, path, seed=ctx.seed)
        log.info("wrote %s", path)
    barrier(ctx.world_size)
    return path


# -- FID -----------------------------------------------------------------------------------
def run_fid(ctx: EvalContext, dataset: str, split: str, temperatures: list[float], n_samples: int,
            weights_path: str | None, cache_dir: Path) -> dict | None:
    """FID of generated samples (one seed per sample, dealt across ranks) against a split.

    Each rank accumulates the moments (n, sum x, sum x x^T) of its own features; one float64
    all-reduce per feature set merges them, so no rank ever holds all the features. The
    real images are reduced to the model's bit depth, as its samples are.
    """
    from glow.distributed import all_reduce_sum
    from glow.evaluation.fid import (
        FID_DIM,
        FeatureMoments,
        cached_statistics,
        frechet_distance,
        inception_features,
        load_inception,
        statistics_key,
    )

    path = ctx.out_dir / "fid.json"
    spec = f"{dataset}/{split}"
    manifest = read_manifest(ctx.data_root, dataset, split)
    settings = _fid_settings(ctx, manifest, n_samples)
    wanted = list(temperatures) if ctx.force else _fid_pending(ctx, dataset, split, temperatures, n_samples)
    if not wanted:
        log.info("FID for %s at %s exists in %s, skipped", spec, temperatures, path)
        return None
    inception = load_inception(ctx.device, weights_path)  # fails early, clearly, without weights
    n_bits, size = int(ctx.model.config.n_bits), int(ctx.model.config.image_size)
    key = statistics_key(dataset, split, size, n_bits, int(manifest["count"]), manifest_hash(manifest))

    def reduced(moments: FeatureMoments) -> FeatureMoments:
        dim = moments.total.shape[0]
        return FeatureMoments.from_packed(all_reduce_sum(moments.packed(), ctx.world_size, ctx.device), dim)

    def real_moments() -> FeatureMoments:
        loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=ctx.batch_size, rank=ctx.rank,
                                  world_size=ctx.world_size, num_workers=ctx.num_workers)
        moments = FeatureMoments(FID_DIM)
        for batch in loader:  # quantized as the samples are: FID does not count the bit depth
            moments.add(inception_features(requantize(batch["image"], n_bits), ctx.device, model=inception))
        return reduced(moments)

    # Every rank takes part in the reduction; only rank 0 writes the cache.
    mu_ref, sigma_ref = cached_statistics(cache_dir, key, real_moments, write=ctx.is_main)
    results = {}
    mine = range(ctx.rank, n_samples, ctx.world_size)
    for t in wanted:
        moments = FeatureMoments(FID_DIM)
        for start in range(0, len(mine), ctx.batch_size):
            images = sample_seeded(ctx.model, mine[start : start + ctx.batch_size], t, ctx.seed)
            moments.add(inception_features(images, ctx.device, model=inception))
        moments = reduced(moments)
        mu, sigma = moments.statistics()
        results[f"{spec}@T={t}"] = {
            "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "temperature": t, **settings,
            "reference": spec, "reference_count": int(manifest["count"]),
        }
        log.info("FID %s T=%s: %.3f (%d samples)", spec, t, results[f"{spec}@T={t}"]["fid"], moments.n)
    if ctx.is_main:
        add_entries(path, results)
    barrier(ctx.world_size)
    return results



# -- tracker -------------------------------------------------------------------------------
def track_results(tracker, out_dir: Path, tasks: list[str], specs: list[tuple[str, str]], step: int) -> list[str]:
    """Send this job's results, read back from ``out_dir``, to ``tracker``; returns the keys.

    Read from the files (not from the tasks' return values), so a job whose results were
    already there (skipped) still reports them: bits/dim per split into the run summary,
    per-sample bits/dim of each dump as a histogram, FID per split and temperature, and
    samples.png / latents.png as images.
    """
    from glow.evaluation.result_tables import read_table

    logged: list[str] = []
    wanted = {f"{d}/{s}" for d, s in specs}
    if {"dump", "bpd"} & set(tasks):
        for spec, entry in read_table(out_dir / "bpd.json").items():
            if spec in wanted:
                tracker.log_summary({f"bpd/{spec}": entry["mean"], f"bpd_std/{spec}": entry["std"]})
                logged.append(f"bpd/{spec}")
    if "dump" in tasks:
        for dataset, split in specs:
            path = dump_path(out_dir, dataset, split)
            if path.is_file():
                tracker.log_histogram(f"bpd_per_sample/{dataset}/{split}", load_dump(path).bpd, step=step)
                logged.append(f"bpd_per_sample/{dataset}/{split}")
    if "fid" in tasks:
        for key, entry in read_table(out_dir / "fid.json").items():
            if key.split("@")[0] in wanted:
                tracker.log_summary({f"fid/{key}": entry["fid"]})
                logged.append(f"fid/{key}")
    for task, image in (("samples", "samples.png"), ("latents", "latents.png")):
        if task in tasks and (out_dir / image).is_file():
            tracker.log_image(task, out_dir / image, step=step)
            logged.append(task)
    return logged
