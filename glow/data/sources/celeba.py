"""CelebA (aligned faces) with its official train/valid/test partition."""
from __future__ import annotations

import functools
import hashlib
import os
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
