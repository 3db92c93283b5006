"""Readers for the real data sources: CelebA, SVHN and a folder of images.

Each ``*_source`` function returns one :class:`glow.shards.Source` per split. Image
transforms follow torchvision's semantics exactly (``Resize(n)`` resizes the short side to
``n`` with the long side ``int(n * long / short)``; ``CenterCrop`` rounds the offset), but
are written on Pillow so that pool workers need not import torch; ``tests/test_shards.py``
checks the equality against torchvision.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from glow.errors import DataError
from glow.shards import BadSourceImage, Source, digest_strings

logger = logging.getLogger(__name__)

INTERPOLATION = "bilinear, antialiased (Pillow Image.resize, as torchvision Resize(antialias=True))"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

CELEBA_PRESETS = {
    # Kirichenko et al. 2020: torchvision Resize(32) then CenterCrop(32).
    "kirichenko32": {"resolution": 32, "order": ["resize_short", "center_crop"], "crop": None},
    # Glow / most PyTorch ports: CenterCrop(148) then Resize(64).
    "glow64": {"resolution": 64, "order": ["center_crop", "resize"], "crop": 148},
}
CELEBA_SPLITS = {0: "train", 1: "valid", 2: "test"}


class SourceError(DataError, ValueError):
    """The user pointed a builder at something that is not the expected source."""


# --------------------------------------------------------------------------- transforms
def resize_short(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` (bilinear, antialiased) on a PIL image."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` for an image at least ``size`` on each side."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image of size {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def open_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as RGB; any failure names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise BadSourceImage(path, f"{type(exn).__name__}: {exn}") from None


def transform_pil(img: Image.Image, steps: Sequence[str], resolution: int, crop: int | None) -> np.ndarray:
    for step in steps:
        if step == "resize_short":
            img = resize_short(img, resolution)
        elif step == "resize":
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.BILINEAR)
        elif step == "center_crop":
            img = center_crop(img, crop or resolution)
        else:  # pragma: no cover
            raise ValueError(f"unknown transform step {step!r}")
    return np.asarray(img, dtype=np.uint8)


def _process_file(payload: tuple, *, steps: tuple, resolution: int, crop: int | None) -> tuple:
    index, path, rel, label = payload
    img = open_rgb(path)
    try:
        arr = transform_pil(img, steps, resolution, crop)
    except ValueError as exn:
        raise BadSourceImage(path, str(exn)) from None
    return index, arr, {"source": rel, "label": label}


def _list_payloads(items: list, start: int, stop: int) -> list:
    return [(i, *items[i]) for i in range(start, stop)]


# --------------------------------------------------------------------------- CelebA
def find_celeba(root: str | os.PathLike) -> tuple[Path, Path]:
    """Return (image dir, partition file) for the official or torchvision layout."""
    root = Path(root)
    for base in (root, root / "celeba"):
        img_dir, part = base / "img_align_celeba", base / "list_eval_partition.txt"
        if img_dir.is_dir():
            if not part.is_file():
                raise SourceError(
                    f"CelebA partition file missing: expected {part} (lines like '000001.jpg 0', "
                    f"0/1/2 = train/valid/test) next to {img_dir}"
                )
            return img_dir, part
    raise SourceError(
        f"no CelebA images under {root}: expected {root}/img_align_celeba/*.jpg and "
        f"{root}/list_eval_partition.txt (or torchvision's {root}/celeba/...)"
    )


def read_partition(part: Path) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {s: [] for s in CELEBA_SPLITS.values()}
    for lineno, line in enumerate(part.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise SourceError(f"{part}:{lineno}: expected '<file>.jpg <0|1|2>', got {line!r}")
        splits[CELEBA_SPLITS[int(fields[1])]].append(fields[0])
    if not any(splits.values()):
        raise SourceError(f"{part} lists no images; expected lines like '000001.jpg 0'")
    return splits


def celeba_sources(root: str | os.PathLike, preset: str = "kirichenko32",
                   resolution: int | None = None, splits: Sequence[str] | None = None) -> list[Source]:
    if preset not in CELEBA_PRESETS:
        raise SourceError(f"unknown CelebA preset {preset!r}; expected one of {sorted(CELEBA_PRESETS)}")
    p = CELEBA_PRESETS[preset]
    res = int(resolution or p["resolution"])
    img_dir, part = find_celeba(root)
    parts = read_partition(part)
    steps = tuple(p["order"])
    crop = p["crop"]
    settings = {
        "resolution": res,
        "preprocessing": {
            "preset": preset,
            "steps": list(steps),
            "crop": crop if crop else res,
            "resize": res,
            "interpolation": INTERPOLATION,
            "torchvision_equivalent": (
                f"Resize({res}) + CenterCrop({res})" if preset == "kirichenko32"
                else f"CenterCrop({crop}) + Resize({res})"
            ),
        },
        "source": {"kind": "celeba", "description": "CelebA aligned faces, official partition",
                   "images": str(img_dir.resolve()), "partition": str(part.resolve()),
                   "partition_sha256": hashlib.sha256(part.read_bytes()).hexdigest()},
    }
    process = functools.partial(_process_file, steps=steps, resolution=res, crop=crop)
    out = []
    for split, names in parts.items():
        if splits is not None and split not in splits:
            continue
        if not names:
            continue
        items = [(str(img_dir / n), n, None) for n in names]
        out.append(Source("celeba", split, len(items), functools.partial(_list_payloads, items),
                          process, settings, digest_strings(names)))
    return out


# --------------------------------------------------------------------------- SVHN
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


def load_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images N x 32 x 32 x 3 uint8, labels N int64 with 10 -> 0)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exn:
        raise SourceError(f"cannot read {path} as a MATLAB file ({exn}); expected SVHN's {path.name}") from None
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise SourceError(f"{path} has keys {found}; expected 'X' (32x32x3xN uint8) and 'y' (Nx1, 1..10)")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise SourceError(f"{path}: X has shape {x.shape} and y {mat['y'].shape}; expected (32,32,3,N) and (N,1)")
    if x.dtype != np.uint8:
        raise SourceError(f"{path}: X has dtype {x.dtype}; expected uint8")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() > 10):
        raise SourceError(f"{path}: labels range {y.min()}..{y.max()}; expected 1..10 (10 = digit 0)")
    y[y == 10] = 0
    return np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2))), y


def _process_array(payload: tuple, *, resolution: int) -> tuple:
    index, arr, source, label = payload
    if arr.shape[0] != resolution or arr.shape[1] != resolution:
        arr = np.asarray(Image.fromarray(arr, "RGB").resize((resolution, resolution), Image.BILINEAR))
    return index, arr, {"source": source, "label": label}


class _ArrayPayloads:
    def __init__(self, images: np.ndarray, labels: np.ndarray | None, source: str):
        self.images, self.labels, self.source = images, labels, source

    def __call__(self, start: int, stop: int) -> list:
        lab = self.labels
        return [(i, self.images[i], f"{self.source}[{i}]", None if lab is None else int(lab[i]))
                for i in range(start, stop)]


def array_source(dataset: str, split: str, images: np.ndarray, labels: np.ndarray | None,
                 resolution: int, settings: dict, source_name: str, extra: dict | None = None) -> Source:
    h = hashlib.sha256(images.tobytes())
    if labels is not None:
        h.update(np.asarray(labels, np.int64).tobytes())
    return Source(dataset, split, len(images), _ArrayPayloads(images, labels, source_name),
                  functools.partial(_process_array, resolution=resolution), {**settings, "resolution": int(resolution)},
                  h.hexdigest()[:16], extra or {})


def svhn_sources(root: str | os.PathLike, resolution: int = 32,
                 splits: Sequence[str] | None = None) -> list[Source]:
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"SVHN directory {root} does not exist; expected it to hold {', '.join(SVHN_FILES.values())}")
    found = {s: root / f for s, f in SVHN_FILES.items() if (root / f).is_file()}
    if "train" not in found and "test" not in found:
        raise SourceError(f"no SVHN files in {root}: expected train_32x32.mat and/or test_32x32.mat "
                          f"(optional extra_32x32.mat) from http://ufldl.stanford.edu/housenumbers/")
    out = []
    for split, path in found.items():
        if splits is not None and split not in splits:
            continue
        images, labels = load_svhn_mat(path)
        settings = {
            "resolution": int(resolution),
            "preprocessing": {
                "crop": None,
                "resize": None if resolution == 32 else int(resolution),
                "interpolation": None if resolution == 32 else "bilinear (Pillow Image.resize)",
            },
            "source": {"kind": "svhn", "description": "SVHN cropped digits (format 2); label 10 -> 0",
                       "file": str(path.resolve())},
        }
        out.append(array_source("svhn", split, images, labels, resolution, settings, path.name))
    return out


# --------------------------------------------------------------------------- folder
def _split_of(rel: str, seed: int, fractions: dict[str, float]) -> str:
    """Deterministic split of a file from a hash of (seed, relative path)."""
    h = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    acc = 0.0
    for name in sorted(fractions):
        acc += fractions[name]
        if u < acc:
            return name
    return "train"


def folder_sources(root: str | os.PathLike, name: str | None = None, resolution: int = 32,
                   fractions: dict[str, float] | None = None, seed: int = 0) -> list[Source]:
    """Every image under ``root`` (recursive), resized (short side) and centre-cropped.

    ``fractions`` maps split names (e.g. ``{"test": 0.1, "valid": 0.05}``) to the share of
    files they get; the rest is ``train``. A file's split is a hash of (seed, relative path),
    so adding files never moves existing ones.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist")
    fractions = dict(fractions or {})
    if "train" in fractions:
        raise SourceError("split fractions name the held-out splits; 'train' gets the rest")
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1.0:
        raise SourceError(f"split fractions {fractions} must be >= 0 and sum to at most 1 "
                          f"(test=1.0 puts every image in test, e.g. for an OOD-only set)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SourceError(f"no images under {root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    name = name or root.resolve().name
    rels = [p.relative_to(root).as_posix() for p in files]
    by_split: dict[str, list] = {}
    for p, rel in zip(files, rels):
        by_split.setdefault(_split_of(rel, seed, fractions), []).append((str(p), rel, None))
    steps = ("resize_short", "center_crop")
    settings = {
        "resolution": int(resolution),
        "preprocessing": {"steps": list(steps), "crop": int(resolution), "resize": int(resolution),
                          "interpolation": INTERPOLATION},
        "source": {"kind": "folder", "description": f"image folder {root.resolve()}",
                   "root": str(root.resolve()), "split_fractions": fractions, "split_seed": seed},
    }
    process = functools.partial(_process_file, steps=steps, resolution=int(resolution), crop=None)
    out = []
    for split in sorted(by_split):
        items = by_split[split]
        out.append(Source(name, split, len(items), functools.partial(_list_payloads, items), process,
                          settings, digest_strings([r for _, r, _ in items])))
    return out
