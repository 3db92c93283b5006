"""CelebA (aligned faces) with its official train/valid/test partition.

``--root`` may hold CelebA as the official release lays it out (``Img/img_align_celeba/`` and
``Eval/list_eval_partition.txt``, also with the zip extracted one level deeper:
``Img/img_align_celeba/img_align_celeba/*.jpg``), as torchvision does (``celeba/img_align_celeba``,
``celeba/list_eval_partition.txt``), or flat (``img_align_celeba/`` beside the partition file):
every layout builds the same shards. The partition file is read with a size cap and every name
in it must be a CelebA file name (``NNNNNN.jpg``), so it cannot point the build at any other file.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

from glow.data.shards import Source
from glow.data.sources.images import (
    INTERPOLATION,
    SourceError,
    list_payloads,
    process_file,
)
from glow.digest import strings_digest

CELEBA_PRESETS = {
    # Kirichenko et al. 2020: torchvision Resize(32) then CenterCrop(32).
    "kirichenko32": {"resolution": 32, "order": ["resize_short", "center_crop"], "crop": None},
    # Glow / most PyTorch ports: CenterCrop(148) then Resize(64).
    "glow64": {"resolution": 64, "order": ["center_crop", "resize"], "crop": 148},
}


CELEBA_SPLITS = {0: "train", 1: "valid", 2: "test"}
IMAGES = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
# Where each layout keeps the images and the partition, relative to --root: flat, torchvision's
# celeba/ folder, and the official release's Img/ and Eval/ folders.
IMAGE_DIRS = (IMAGES, f"celeba/{IMAGES}", f"Img/{IMAGES}")
PARTITION_FILES = (PARTITION, f"celeba/{PARTITION}", f"Eval/{PARTITION}")
IMAGE_NAME = re.compile(r"[0-9]{6}\.jpg")
# The official partition file is 2.8 MB (202,599 lines).
MAX_PARTITION_BYTES = 16 << 20


def find_celeba(root: str | os.PathLike) -> tuple[Path, Path]:
    """(image dir, partition file) in the flat, torchvision or official layout (module docstring);
    the error lists every place looked at."""
    root = Path(root)
    img_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if img_dir is not None and (img_dir / IMAGES).is_dir():  # the zip extracted one level deeper
        img_dir = img_dir / IMAGES
    part = next((root / f for f in PARTITION_FILES if (root / f).is_file()), None)
    if img_dir is None:
        zips = [str(root / f"{d}.zip") for d in IMAGE_DIRS if (root / f"{d}.zip").is_file()]
        raise SourceError(f"no CelebA images under {root}: looked for the folder of *.jpg at "
                          f"{', '.join(str(root / d) for d in IMAGE_DIRS)} (each also one level deeper, "
                          f".../{IMAGES}/{IMAGES})" + (f"; found {zips[0]}: extract it first" if zips else ""))
    if part is None:
        looked = ", ".join(str(root / f) for f in PARTITION_FILES)
        raise SourceError(f"CelebA partition file missing: looked for {looked} (lines like '000001.jpg 0', "
                          f"0/1/2 = train/valid/test); the images are at {img_dir}")
    return img_dir, part


def read_partition_bytes(part: Path) -> bytes:
    """The partition file's bytes, at most :data:`MAX_PARTITION_BYTES`."""
    with open(part, "rb") as f:
        raw = f.read(MAX_PARTITION_BYTES + 1)
    if len(raw) > MAX_PARTITION_BYTES:
        raise SourceError(f"{part} is more than the {MAX_PARTITION_BYTES} bytes a CelebA partition file takes "
                          f"(the official one is 2.8 MB)")
    return raw


def read_partition(part: Path, raw: bytes | None = None) -> dict[str, list[str]]:
    """Image names per split; each must be a CelebA file name (``NNNNNN.jpg``)."""
    splits: dict[str, list[str]] = {s: [] for s in CELEBA_SPLITS.values()}
    text = (read_partition_bytes(part) if raw is None else raw).decode("utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise SourceError(f"{part}:{lineno}: expected '<file>.jpg <0|1|2>', got {line[:200]!r}")
        if not IMAGE_NAME.fullmatch(fields[0]):
            raise SourceError(f"{part}:{lineno}: {fields[0][:200]!r} is not a CelebA image name (NNNNNN.jpg); "
                              f"the partition file must name files of the image folder only")
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
    raw = read_partition_bytes(part)
    parts = read_partition(part, raw)
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
                   "partition_sha256": hashlib.sha256(raw).hexdigest()},
    }
    process = functools.partial(process_file, steps=steps, resolution=res, crop=crop)
    out = []
    for split, names in parts.items():
        if splits is not None and split not in splits:
            continue
        if not names:
            continue
        items = [(str(img_dir / n), n, None) for n in names]
        out.append(Source("celeba", split, len(items), functools.partial(list_payloads, items),
                          process, settings, strings_digest(names)))
    return out
