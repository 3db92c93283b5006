"""Evaluation tasks on a checkpoint: bits/dim, per-sample dumps, samples, FID, latents.

Every sample of a split is scored exactly once over all processes, with dequantization
noise that depends on (seed, sample key) alone: per-sample scores do not depend on the
batch size, the number of workers or the number of processes (`glow.evaluation.scoring`).
A flow on feature vectors (`model.kind: tabular`) has the dump and bpd tasks only, on the
vector splits of a features root. Rank 0 writes every file,
atomically. What is already done under the same settings is skipped (`glow.evaluation.records`;
the decision is rank 0's, see `glow.evaluation.job`) unless ``force``.

Outputs (`glow.run.Run.eval_dir`): bpd.json, dumps/<dataset>-<split>.npz, samples.png +
samples.json, fid.json, latents.png + latents.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glow.data.manifest import manifest_hash, read_manifest
from glow.data.streams import check_channels, make_eval_loader
from glow.distributed import barrier, gather_objects, on_main
from glow.errors import BadArgument
from glow.evaluation import TASKS
from glow.evaluation.dumps import dump_settings, write_dump
from glow.evaluation.records import Result, read_record
from glow.evaluation.result_tables import add_entries, table_entry
from glow.evaluation.scoring import CountMismatch, score_split
from glow.features.streams import vector_manifest
from glow.files import atomic_write_json, writer
from glow.model import GlowConfig, TabularFlowConfig, model_config
from glow.model.likelihood import requantize
from glow.model.sampling import sample_seeded, save_sample_grid
from glow.run import Checkpoint
from glow.trust import shared_run_allowed

__all__ = [
    "TASKS",
    "VECTOR_TASKS",
    "CountMismatch",
    "EvalContext",
    "EvalOptions",
    "check_eval_data",
    "requested_results",
    "run_bpd",
    "run_fid",
    "run_latents",
    "run_samples",
    "score_split",
]

log = logging.getLogger(__name__)
SHAPE_TASKS = ("dump", "bpd", "latents")  # tasks that read the splits' images into the model
VECTOR_TASKS = ("dump", "bpd")  # what a flow on feature vectors can be asked for


@dataclass
class EvalOptions:
    """What an evaluation job is asked to do (the options of `eval/evaluate.py`)."""

    tasks: list[str] = field(default_factory=lambda: ["dump"])
    specs: list[tuple[str, str]] = field(default_factory=list)  # (dataset, split)
    data_root: str | None = None  # None: the training run's data.root
    batch_size: int = 256
    workers: int = 0
    seed: int = 0
    force: bool = False
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    samples_per_temperature: int = 8
    fid_samples: int = 50000
    fid_temperatures: list[float] = field(default_factory=lambda: [1.0])
    inception_weights: str | None = None
    fid_cache: str | None = None
    latents_images: int = 4
    convert_channels: bool = False
    logger: str | None = None  # none | wandb | tensorboard | mlflow; None: as the training run's run.logger
    allow_shared: bool = False  # --allow-shared-run: another user's run folders and results are accepted


@dataclass
class EvalContext:
    """What every evaluation task needs: the checkpoint, the options, the model and the process layout."""

    checkpoint: Checkpoint
    meta: dict
    options: EvalOptions
    model: torch.nn.Module | None = None  # None: only the skip-if-done checks can run
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    todo: set[str] | None = None  # what rank 0 found to do (Result.what); None: everything requested
    _manifests: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def own_results(self) -> bool:
        """Only results this user wrote count (unless a shared layout is allowed: glow.trust)."""
        return not shared_run_allowed(self.options.allow_shared)

    def writer_setting(self) -> dict:
        """What every result depends on besides its inputs: that you wrote it (glow.evaluation.records)."""
        return {"writer_uid": writer()["writer_uid"]} if self.own_results else {}

    @property
    def out_dir(self) -> Path:
        return self.checkpoint.run.eval_dir(self.step)

    @property
    def data_root(self) -> str:
        return self.options.data_root or self.meta["data"]["root"]

    @property
    def config(self) -> GlowConfig | TabularFlowConfig:
        return model_config(self.meta["model_config"])

    @property
    def vectors(self) -> bool:
        """Whether the model is a flow on feature vectors (its data: vector shards)."""
        return isinstance(self.config, TabularFlowConfig)

    def manifest(self, dataset: str, split: str) -> dict:
        """The split's manifest (of vector shards for a flow on vectors, checked against its
        dimension), read once per job."""
        if (dataset, split) not in self._manifests:
            self._manifests[dataset, split] = (
                vector_manifest(self.data_root, dataset, split, self.config.dim) if self.vectors
                else read_manifest(self.data_root, dataset, split))
        return self._manifests[dataset, split]

    def share_manifests(self) -> None:
        """Rank 0 reads the requested splits' manifests and every rank takes its copy, so the counts
        a gathered result is checked against and the settings a result is keyed on (FID cache key
        included) are the same on every rank even if a split is rebuilt during the job. (The
        samples task reads no split.)"""
        reads_data = bool(set(self.options.tasks) - {"samples"})
        read = lambda: {(d, s): self.manifest(d, s) for d, s in self.options.specs if reads_data}  # noqa: E731
        self._manifests = on_main(read, self.world_size, self.rank)

    def loader_args(self) -> dict:
        """What every scoring stream needs to give images (or vectors) the model's shape
        (glow.data.streams.check_channels; the vectors' dimension)."""
        cfg = self.config
        if self.vectors:
            return {"dim": cfg.dim}
        return {"channels": cfg.in_channels, "convert_channels": self.options.convert_channels,
                "resolution": cfg.image_size}

    def wanted(self, result: Result) -> bool:
        """Compute ``result``? (forced, or rank 0 found it missing or stale)."""
        if self.options.force:
            return True
        if self.todo is None:
            raise RuntimeError("EvalContext.todo is not set: decide with glow.evaluation.job first")
        return result.what in self.todo


def check_eval_data(ctx: EvalContext) -> None:
    """Every split the shape tasks read exists, is complete and fits the checkpoint's model
    (resolution; channels unless converted; a flow on vectors: their dimension, and only the
    tasks that apply to it)."""
    if ctx.vectors:
        other = [t for t in ctx.options.tasks if t not in VECTOR_TASKS]
        if other:
            raise BadArgument(f"{ctx.checkpoint.path} is a flow on feature vectors (model.kind: tabular): it has no "
                              f"images for --task {', '.join(other)}; ask for {' / '.join(VECTOR_TASKS)}")
        for dataset, split in ctx.options.specs:
            ctx.manifest(dataset, split)  # complete, vectors, of the model's dimension
        return
    if not set(SHAPE_TASKS) & set(ctx.options.tasks):
        return
    cfg = ctx.config
    for dataset, split in ctx.options.specs:
        check_channels(ctx.manifest(dataset, split), Path(ctx.data_root) / dataset / split, cfg.in_channels,
                       ctx.options.convert_channels, cfg.image_size)


# -- what each result depends on ---------------------------------------------------------------
def _data_settings(ctx: EvalContext, dataset: str, split: str) -> dict:
    """What a result on a split depends on besides the split itself: another seed, data root,
    shard build or checkpoint recomputes."""
    return {"step": ctx.step, "model_hash": ctx.meta["model_hash"], "seed": int(ctx.options.seed),
            "data_root": str(Path(ctx.data_root).resolve()),
            "manifest_hash": manifest_hash(ctx.manifest(dataset, split)), **ctx.writer_setting()}


def dump_result(ctx: EvalContext, dataset: str, split: str) -> Result:
    path = ctx.checkpoint.run.dump_path(ctx.step, f"{dataset}/{split}")
    return Result(f"dump {dataset}/{split}", _data_settings(ctx, dataset, split),
                  lambda: dump_settings(path, ctx.own_results))


def bpd_result(ctx: EvalContext, dataset: str, split: str) -> Result:
    spec = f"{dataset}/{split}"
    return Result(f"bpd {spec}", _data_settings(ctx, dataset, split),
                  lambda: table_entry(ctx.out_dir / "bpd.json", spec, ctx.own_results))


def fid_result(ctx: EvalContext, dataset: str, split: str, temperature: float) -> Result:
    key = f"{dataset}/{split}@T={temperature}"
    settings = {**_data_settings(ctx, dataset, split), "n_samples": int(ctx.options.fid_samples)}
    return Result(f"fid {dataset}/{split} T={temperature}", settings,
                  lambda: table_entry(ctx.out_dir / "fid.json", key, ctx.own_results))


def _image_result(ctx: EvalContext, name: str, settings: dict) -> Result:
    image, record = ctx.out_dir / f"{name}.png", ctx.out_dir / f"{name}.json"
    return Result(name, {**settings, **ctx.writer_setting()}, lambda: read_record(image, record, ctx.own_results))


def samples_result(ctx: EvalContext) -> Result:
    o = ctx.options
    return _image_result(ctx, "samples", {
        "temperatures": [float(t) for t in o.temperatures], "per_temperature": int(o.samples_per_temperature),
        "seed": int(o.seed), "step": ctx.step, "model_hash": ctx.meta["model_hash"]})


def latents_result(ctx: EvalContext) -> Result:
    o = ctx.options
    return _image_result(ctx, "latents", {
        "data": {f"{d}/{s}": manifest_hash(ctx.manifest(d, s)) for d, s in o.specs},
        "data_root": str(Path(ctx.data_root).resolve()), "images_per_split": int(o.latents_images),
        "convert_channels": bool(o.convert_channels), "seed": int(o.seed), "step": ctx.step,
        "model_hash": ctx.meta["model_hash"]})


def requested_results(ctx: EvalContext) -> list[Result]:
    """Every result the requested tasks produce, in task order."""
    o, out = ctx.options, []
    for task in o.tasks:
        if task in ("dump", "bpd"):
            make = dump_result if task == "dump" else bpd_result
            out += [make(ctx, d, s) for d, s in o.specs]
        elif task == "samples":
            out.append(samples_result(ctx))
        elif task == "latents":
            out.append(latents_result(ctx))
        elif task == "fid":
            out += [fid_result(ctx, d, s, t) for d, s in o.specs for t in o.fid_temperatures]
    return out


# -- bits/dim and dumps --------------------------------------------------------------------
def run_bpd(ctx: EvalContext, dataset: str, split: str, dump: bool) -> dict | None:
    """Task `bpd` (the bpd.json entry) or `dump` (the per-sample dump and the bpd.json entry)."""
    spec = f"{dataset}/{split}"
    result = dump_result(ctx, dataset, split) if dump else bpd_result(ctx, dataset, split)
    if not ctx.wanted(result):
        log.info("%s: result exists under %s, skipped (--force recomputes)", spec, ctx.out_dir)
        return None
    scores = score_split(ctx, dataset, split)
    cfg, manifest = ctx.model.config, ctx.manifest(dataset, split)
    kind = {"data_kind": "vectors"} if ctx.vectors else {"data_kind": "images", "n_bits": int(cfg.n_bits)}
    entry = {"mean": float(scores["bpd"].mean()), "std": float(scores["bpd"].std()), "count": int(len(scores["bpd"])),
             **kind, "weights_digest": ctx.meta.get("weights_digest", ""), **writer(), **result.settings}
    if not ctx.vectors and manifest.get("channels", 3) != cfg.in_channels:  # only with --convert-channels
        entry["channels_converted"] = f"{manifest.get('channels', 3)} -> {cfg.in_channels}"
    if ctx.is_main:
        if dump:
            path = ctx.checkpoint.run.dump_path(ctx.step, spec)
            write_dump(path, scores, checkpoint=str(ctx.checkpoint.path), dataset=dataset, split=split,
                       weights_digest=entry["weights_digest"], **kind, **{**writer(), **result.settings})
            log.info("wrote %s", path)
        add_entries(ctx.out_dir / "bpd.json", {spec: entry}, ctx.own_results)
        log.info("%s: %.4f bits/dim over %d samples (step %d)", spec, entry["mean"], entry["count"], ctx.step)
    barrier(ctx.world_size)
    return entry


# -- samples and latents -------------------------------------------------------------------------
def _run_image(ctx: EvalContext, result: Result, draw) -> Path | None:
    """``<what>.png`` drawn by rank 0 with ``draw(path)``, and ``<what>.json`` (its settings) beside it."""
    path = ctx.out_dir / f"{result.what}.png"
    if not ctx.wanted(result):
        log.info("%s exists, skipped", path)
        return None
    if ctx.is_main:
        draw(path)
        atomic_write_json(ctx.out_dir / f"{result.what}.json", {**writer(), **result.settings})
        log.info("wrote %s", path)
    barrier(ctx.world_size)
    return path


def run_samples(ctx: EvalContext) -> Path | None:
    """samples.png: one row per temperature, the same noise in every row."""
    o = ctx.options
    return _run_image(ctx, samples_result(ctx), lambda path: save_sample_grid(
        ctx.model, path, o.temperatures, o.samples_per_temperature, seed=o.seed))


def run_latents(ctx: EvalContext) -> Path | None:
    """latents.png for the first ``latents_images`` of each split."""
    from glow.evaluation.latents import plot_latents

    def draw(path: Path) -> None:
        n, sets = ctx.options.latents_images, []
        for dataset, split in ctx.options.specs:
            loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=n, rank=0, world_size=1,
                                      manifest=ctx.manifest(dataset, split), **ctx.loader_args())
            sets.append((f"{dataset}/{split}", next(iter(loader))["image"][:n]))
        plot_latents(ctx.model, sets, path, seed=ctx.options.seed)

    return _run_image(ctx, latents_result(ctx), draw)


# -- FID -----------------------------------------------------------------------------------
def _check_same_network(network: torch.nn.Module, ctx: EvalContext) -> None:
    """Every rank found its own Inception weights file (a node-local $TORCH_HOME differs per node):
    their digests must agree, or the features would silently mix two networks (exit 5)."""
    from glow.distributed import state_digest
    from glow.errors import CheckpointMismatch

    if ctx.world_size == 1:
        return
    digests = gather_objects(state_digest(network.state_dict()), ctx.world_size)
    if len(set(digests)) != 1:
        raise CheckpointMismatch(f"the processes loaded different Inception weights (digests {digests}): give every "
                                 "node the same file (--inception-weights PATH on a shared filesystem)")


def run_fid(ctx: EvalContext, dataset: str, split: str) -> dict | None:
    """FID of generated samples (one seed per sample, dealt across ranks) against a split.

    Each rank accumulates the moments (n, sum x, sum x x^T) of its own features; one float64
    all-reduce per feature set merges them, so no rank ever holds all the features. The real
    images are reduced to the model's bit depth, as its samples are. Whether the reference
    statistics come from the shared cache is rank 0's decision (its statistics go to every rank).
    """
    from glow.distributed import all_reduce_sum
    from glow.evaluation.fid import (
        FID_DIM,
        FeatureMoments,
        frechet_distance,
        inception_features,
        load_inception,
        read_cached_statistics,
        save_statistics,
        statistics_key,
        statistics_path,
    )

    o, spec = ctx.options, f"{dataset}/{split}"
    todo = [(t, r) for t in o.fid_temperatures if ctx.wanted(r := fid_result(ctx, dataset, split, t))]
    if not todo:
        log.info("FID for %s at %s exists in %s, skipped", spec, o.fid_temperatures, ctx.out_dir / "fid.json")
        return None
    from glow.evaluation.fid import default_statistics_cache

    cache = Path(o.fid_cache) if o.fid_cache else default_statistics_cache()
    inception = load_inception(ctx.device, o.inception_weights)  # fails early, clearly, without weights
    _check_same_network(inception, ctx)
    cfg, manifest = ctx.model.config, ctx.manifest(dataset, split)
    n_bits = int(cfg.n_bits)
    key = statistics_key(dataset, split, int(cfg.image_size), n_bits, int(manifest["count"]), manifest_hash(manifest))

    def reduced(moments: FeatureMoments) -> FeatureMoments:
        dim = moments.total.shape[0]
        return FeatureMoments.from_packed(all_reduce_sum(moments.packed(), ctx.world_size, ctx.device), dim)

    reference = on_main(lambda: read_cached_statistics(cache, key), ctx.world_size, ctx.rank)
    if reference is None:  # every rank computes its share; rank 0 writes the cache
        loader = make_eval_loader(ctx.data_root, dataset, split, batch_size=o.batch_size, rank=ctx.rank,
                                  world_size=ctx.world_size, num_workers=o.workers, manifest=manifest)
        moments = FeatureMoments(FID_DIM)
        for batch in loader:  # quantized as the samples are: FID does not count the bit depth
            moments.add(inception_features(requantize(batch["image"], n_bits), ctx.device, model=inception))
        reference = reduced(moments).statistics()
        if ctx.is_main:
            save_statistics(statistics_path(cache, key), *reference, key)
            log.info("FID reference statistics written to %s", statistics_path(cache, key))
    mu_ref, sigma_ref = reference
    results = {}
    mine = range(ctx.rank, o.fid_samples, ctx.world_size)
    for t, result in todo:
        moments = FeatureMoments(FID_DIM)
        for start in range(0, len(mine), o.batch_size):
            images = sample_seeded(ctx.model, mine[start : start + o.batch_size], t, o.seed)
            moments.add(inception_features(images, ctx.device, model=inception))
        moments = reduced(moments)
        mu, sigma = moments.statistics()
        results[f"{spec}@T={t}"] = {
            "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "temperature": t, **writer(), **result.settings,
            "reference": spec, "reference_count": int(manifest["count"]),
        }
        log.info("FID %s T=%s: %.3f (%d samples)", spec, t, results[f"{spec}@T={t}"]["fid"], moments.n)
    if ctx.is_main:
        add_entries(ctx.out_dir / "fid.json", results, ctx.own_results)
    barrier(ctx.world_size)
    return results
