"""Images/s read + decoded per data worker, at 32x32 and 64x64.

Builds shards of natural-image crops (scikit-image photos) in a temp dir, then times
``glow.data.streams`` streams: the eval stream and the train stream (shuffle buffer, batching) in
one process (= one worker), and the train stream with ``--workers`` DataLoader workers.
Prints the results as JSON.

\b
Example:
  python bench/data_throughput.py --n 4000 --workers 2
"""
from __future__ import annotations

import json
import tempfile
import time

import click
import numpy as np


def _crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    from glow.data.sources.demo import DEMO_PHOTOS, load_photo

    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in DEMO_PHOTOS]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out[i] = img[y:y + size, x:x + size]
    return out


def _time(it, warmup: int = 2) -> tuple[int, float]:
    it = iter(it)
    for _ in range(warmup):
        next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += (b["image"] if isinstance(b, dict) else b).shape[0]
    return n, time.perf_counter() - t0


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n", default=4000, show_default=True, help="Images per resolution.")
@click.option("--batch-size", default=64, show_default=True, help="Images per batch of the train stream.")
@click.option("--workers", default=2, show_default=True, help="DataLoader workers for the multi-worker run.")
def main(n, batch_size, workers):
    from glow.data.shards import build
    from glow.data.sources.images import array_source
    from glow.data.streams import make_eval_loader, make_train_loader

    results = {}
    with tempfile.TemporaryDirectory() as root:
        for size in (32, 64):
            name = f"bench{size}"
            src = array_source(name, "test", _crops(n, size), None, size, {"resolution": size}, "bench")
            t0 = time.perf_counter()
            man = build(src, root, samples_per_shard=1000, progress=False)
            build_s = time.perf_counter() - t0
            nb = n // batch_size
            ev = _time(make_eval_loader(root, name, "test", batch_size=batch_size, rank=0, world_size=1))
            tr = _time(make_train_loader(root, name, "test", batch_size=batch_size, seed=0, epoch=0, rank=0,
                                         world_size=1, num_workers=0, batches_per_epoch=nb))
            trw = _time(make_train_loader(root, name, "test", batch_size=batch_size, seed=0, epoch=0, rank=0,
                                          world_size=1, num_workers=workers, batches_per_epoch=nb), warmup=workers)
            shard_mb = sum(s["bytes"] for s in man["shards"]) / 1e6
            results[f"{size}x{size}"] = {
                "png_bytes_per_image": round(shard_mb * 1e6 / n),
                "build_images_per_s_1proc": round(n / build_s),
                "eval_images_per_s_1worker": round(ev[0] / ev[1]),
                "train_images_per_s_1worker": round(tr[0] / tr[1]),
                f"train_images_per_s_{workers}workers_total": round(trw[0] / trw[1]),
            }
    click.echo(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
