"""Per-sample scores of a split under a checkpoint's model: the numbers a dump holds.

Images (a Glow): log p(x) in nats of the ``n_bits`` image with dequantization noise that
depends on (seed, sample key) alone, bits/dim, and the PNG complexity L(x) of the image the
model scored. Vectors (the flow on features, `model.kind: tabular`): log p(x) in nats of the
real vector (no quantization, no noise) and its continuous bits/dim; no complexity. Either
way every sample of the split is scored exactly once over all processes, a short batch is
padded to the batch size (a sample's score does not depend on the batch it lands in), and the
gathered count must equal the manifest's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glow.data.streams import make_eval_loader
from glow.distributed import gather_objects
from glow.errors import DataError
from glow.evaluation.complexity import png_complexity_bpd_batch
from glow.features.streams import make_vector_eval_loader
from glow.model.likelihood import (
    bits_per_dim,
    eval_noise,
    log_p_x,
    preprocess,
    quantize,
)
from glow.model.performance import fast_eval
from glow.model.tabular_config import continuous_bits_per_dim
from glow.progress import Progress

__all__ = ["CountMismatch", "score_split"]


class CountMismatch(DataError, RuntimeError):
    """The gathered number of samples differs from the manifest: never write a partial dump."""


def score_split(ctx, dataset: str, split: str) -> dict[str, np.ndarray]:
    """Per-sample ``log_p`` (nats), ``bpd`` (and, for images, ``complexity_bpd``) with ``key``,
    ``index`` and ``label`` of every sample of a split (``ctx``: a `glow.evaluation.tasks.EvalContext`).

    Returns the merged arrays (sorted by index) on every rank; raises CountMismatch when
    the gathered count differs from the manifest.
    """
    o = ctx.options
    manifest = ctx.manifest(dataset, split)
    expected = int(manifest["count"])
    make_loader, score = (make_vector_eval_loader, _score_vectors) if ctx.vectors else (make_eval_loader, _score_images)
    loader = make_loader(ctx.data_root, dataset, split, batch_size=o.batch_size, rank=ctx.rank,
                         world_size=ctx.world_size, num_workers=o.workers, manifest=manifest, **ctx.loader_args())
    parts: dict[str, list] = {"key": [], "index": [], "label": [], "log_p": [], "bpd": []}
    if not ctx.vectors:
        parts["complexity_bpd"] = []
    unit = "vector" if ctx.vectors else "image"
    bar = Progress(expected, desc=f"{dataset}/{split}", enabled=ctx.is_main, unit=unit, every_s=60.0)
    with fast_eval(ctx.model):  # eval mode, inference mode, 1x1-conv weights computed once
        for batch in loader:
            parts["key"] += list(batch["key"])
            parts["index"].append(batch["index"].numpy())
            parts["label"].append(batch["label"].numpy())
            score(ctx, batch, parts)
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
    return {k: v[order] for k, v in merged.items()}


def _score_images(ctx, batch: dict, parts: dict[str, list]) -> None:
    model, n_bits, n_dims = ctx.model, ctx.model.config.n_bits, ctx.model.config.n_dims
    images = batch["image"]
    if tuple(images.shape[1:]) != model.input_shape:
        raise ValueError(
            f"images have shape {tuple(images.shape[1:])}, the model expects "
            f"{model.input_shape}: evaluate on shards built at the model's resolution"
        )
    noise = eval_noise(ctx.options.seed, batch["key"], images.shape[1:])
    y = preprocess(images, n_bits, noise).to(ctx.device)
    log_p_y = _log_prob_full_batch(model, y, ctx.options.batch_size).double().cpu()
    parts["log_p"].append(log_p_x(log_p_y, n_dims, n_bits).numpy())
    parts["bpd"].append(bits_per_dim(log_p_y, n_dims, n_bits).numpy())
    # L(x) of the image the model scored: the n_bits bins (Serra et al. compare code lengths of one image)
    parts["complexity_bpd"].append(png_complexity_bpd_batch(quantize(images, n_bits)))


def _score_vectors(ctx, batch: dict, parts: dict[str, list]) -> None:
    vectors = batch["vector"].to(ctx.device)
    log_p = _log_prob_full_batch(ctx.model, vectors, ctx.options.batch_size).double().cpu()
    parts["log_p"].append(log_p.numpy())
    parts["bpd"].append(continuous_bits_per_dim(log_p, ctx.model.config.n_dims).numpy())


def _log_prob_full_batch(model, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """log_prob with a short batch padded to `batch_size`.

    Kernels are chosen by batch shape; padding makes every batch the same shape, so a sample's
    score is bitwise the same whichever rank, batch and position it lands in (for a given
    --batch-size).
    """
    n = y.shape[0]
    if n < batch_size:
        y = torch.cat([y, y[-1:].expand(batch_size - n, *y.shape[1:])])
    return model.log_prob(y)[:n]


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0)
