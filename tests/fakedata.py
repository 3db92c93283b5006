"""Fake sources in temp dirs, for data/eval/training tests (import: ``from tests.fakedata import ...``
or ``from fakedata import ...`` with tests/ on sys.path).

* :func:`make_fake_celeba` - 178x218 JPEGs in ``img_align_celeba/`` + ``list_eval_partition.txt``.
* :func:`make_fake_svhn` - ``train_32x32.mat`` / ``test_32x32.mat`` with SVHN's key layout.
* :func:`make_fake_folder` - a nested folder of small PNG/JPEG images.
* :func:`build_small_shards` - a shard set with a given number of shards (gaussian source), fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_SIZE = (178, 218)  # (width, height) of img_align_celeba


def make_fake_celeba(root: str | Path, n_train: int = 20, n_valid: int = 6, n_test: int = 8,
                     seed: int = 0, torchvision_layout: bool = False) -> Path:
    """Write a fake CelebA; returns the root to pass to ``celeba --root``.

    Images are smooth random colour gradients plus noise (realistic JPEG sizes), named
    000001.jpg..; the partition file lists them in order as train, valid, test.
    """
    root = Path(root)
    base = root / "celeba" if torchvision_layout else root
    img_dir = base / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = CELEBA_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    lines = []
    n = n_train + n_valid + n_test
    for i in range(n):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (0.5 * yy + 0.5 * xx)[..., None]
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (h, w, 3))
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(img_dir / name, quality=90)
        part = 0 if i < n_train else (1 if i < n_train + n_valid else 2)
        lines.append(f"{name} {part}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def make_fake_svhn(root: str | Path, n_train: int = 30, n_test: int = 12, seed: int = 0,
                   extra: int = 0) -> Path:
    """Write SVHN-format .mat files (X: 32x32x3xN uint8, y: Nx1 uint8 in 1..10)."""
    from scipy.io import savemat

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {"train_32x32.mat": n_train, "test_32x32.mat": n_test}
    if extra:
        files["extra_32x32.mat"] = extra
    for name, n in files.items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, includes 10 (= digit 0)
        savemat(str(root / name), {"X": x, "y": y})
    return root


def svhn_expected_labels(n: int) -> np.ndarray:
    """Labels after the 10 -> 0 mapping for :func:`make_fake_svhn`'s files."""
    return (np.arange(n) % 10 + 1) % 10


def make_fake_folder(root: str | Path, n: int = 24, seed: int = 0) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / f"sub{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (40 + i % 5, 50, 3), dtype=np.uint8)
        ext = ".png" if i % 2 else ".jpg"
        Image.fromarray(img).save(sub / f"img{i:03d}{ext}")
    return root


def build_small_shards(out: str | Path, n: int = 60, samples_per_shard: int = 20, dataset: str = "gaussian",
                       split: str = "test", seed: int = 0) -> dict:
    """Build ``n`` gaussian-field samples as ``ceil(n / samples_per_shard)`` shards under
    ``out/<dataset>/<split>`` (dataset renamed if asked) and return the manifest."""
    from glow.shards import build
    from glow.gaussian_field import gaussian_sources

    src = [s for s in gaussian_sources("gaussian", n_train=n, n_test=n, seed=seed) if s.split == "test"][0]
    src.dataset, src.split = dataset, split
    return build(src, out, samples_per_shard=samples_per_shard, progress=False)
