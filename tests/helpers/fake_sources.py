"""Fake sources in their real on-disk formats, in temp dirs, for the data, evaluation and training tests.

* :func:`make_fake_celeba` - 178x218 JPEGs in ``img_align_celeba/`` + ``list_eval_partition.txt``
  (flat, or as torchvision or the official release lay them out: :data:`CELEBA_LAYOUTS`).
* :func:`make_fake_svhn` - ``train_32x32.mat`` / ``test_32x32.mat`` with SVHN's key layout.
* :func:`make_fake_folder` - a nested folder of small PNG/JPEG images.
* :func:`build_small_shards` - a shard set with a given number of shards (gaussian source), fast.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_SIZE = (178, 218)  # (width, height) of img_align_celeba
# layout -> (image folder, partition file) under the root passed to ``celeba --root``
CELEBA_LAYOUTS = {
    "flat": ("img_align_celeba", "list_eval_partition.txt"),
    "torchvision": ("celeba/img_align_celeba", "celeba/list_eval_partition.txt"),
    "official": ("Img/img_align_celeba", "Eval/list_eval_partition.txt"),
    # the zip extracted one level deeper
    "official-nested": ("Img/img_align_celeba/img_align_celeba", "Eval/list_eval_partition.txt"),
}


def make_fake_celeba(root: str | Path, n_train: int = 20, n_valid: int = 6, n_test: int = 8,
                     seed: int = 0, torchvision_layout: bool = False, layout: str = "flat") -> Path:
    """Write a fake CelebA in ``layout`` (:data:`CELEBA_LAYOUTS`; ``torchvision_layout`` is
    ``layout="torchvision"``); returns the root to pass to ``celeba --root``.

    Images are smooth random colour gradients plus noise (realistic JPEG sizes), named
    000001.jpg..; the partition file lists them in order as train, valid, test.
    """
    root = Path(root)
    images, partition = CELEBA_LAYOUTS["torchvision" if torchvision_layout else layout]
    img_dir = root / images
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
    (root / partition).parent.mkdir(parents=True, exist_ok=True)
    (root / partition).write_text("\n".join(lines) + "\n")
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
    from glow.data.shards import build
    from glow.data.sources.gaussian_field import gaussian_sources

    src = [s for s in gaussian_sources("gaussian", n_train=n, n_test=n, seed=seed) if s.split == "test"][0]
    src.dataset, src.split = dataset, split
    return build(src, out, samples_per_shard=samples_per_shard, progress=False)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An IDX file (gzip'd when ``path`` ends in .gz): magic, big-endian dimensions, uint8 data."""
    import gzip

    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def make_fake_idx(root: str | Path, layout: str = "MNIST", n_train: int = 24, n_test: int = 12, seed: int = 0,
                  gz: bool = False) -> Path:
    """torchvision's ``<root>/<layout>/raw/`` with the four IDX files (28x28 digits, labels 0..9).

    Images are random strokes on black with a white 1-pixel border, so padding is visible."""
    raw = Path(root) / layout / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) // 2
        x[:, [0, -1], :] = 255
        x[:, :, [0, -1]] = 255
        y = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", x, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", y, 2049)
    return Path(root)


def make_fake_cifar(root: str | Path, name: str = "cifar10", per_batch: int = 6, n_test: int = 8,
                    seed: int = 0) -> Path:
    """torchvision's CIFAR python layout: ``cifar-10-batches-py/data_batch_1..5, test_batch`` or
    ``cifar-100-python/train, test``, dicts with b"data" (N x 3072 uint8, R/G/B planes) and labels."""
    import pickle

    rng = np.random.default_rng(seed)
    c10 = name == "cifar10"
    d = Path(root) / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    d.mkdir(parents=True, exist_ok=True)
    files = ({f"data_batch_{i}": per_batch for i in range(1, 6)} if c10 else {"train": 5 * per_batch})
    files["test_batch" if c10 else "test"] = n_test
    for fname, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10 if c10 else 100, n)]
        batch = {b"batch_label": fname.encode(), b"data": data, b"filenames": [b"x%d.png" % i for i in range(n)]}
        if c10:
            batch[b"labels"] = labels
        else:
            batch[b"fine_labels"], batch[b"coarse_labels"] = labels, [v // 5 for v in labels]
        with open(d / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return Path(root)
