"""Any folder of images (notMNIST, LSUN crops, ...), split by a hash of each file's path.

The source stays inside its folder: subfolders that are symlinks are not entered, and an image
that is a symlink must resolve to a file inside the folder (a link out of it is refused, naming
it), so a planted link cannot put another file into the shards.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from glow.data.shards import Source
from glow.data.sources.images import (
    IMAGE_EXTENSIONS,
    INTERPOLATION,
    SourceError,
    list_payloads,
    process_file,
)
from glow.digest import strings_digest


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


def _check_inside(root: Path, files: list[Path]) -> None:
    """Every file resolves to a file inside ``root`` (path.rglob enters no symlinked folder, but
    lists symlinked files)."""
    real_root = root.resolve()
    for p in files:
        if p.is_symlink() and not p.resolve().is_relative_to(real_root):
            raise SourceError(f"{p} is a symlink to {p.resolve()}, outside the image folder {root}: refused (the "
                              f"folder source reads only files inside its folder); copy the file in, or remove "
                              f"the link")


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
    _check_inside(root, files)
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
    process = functools.partial(process_file, steps=steps, resolution=int(resolution), crop=None)
    out = []
    for split in sorted(by_split):
        items = by_split[split]
        out.append(Source(name, split, len(items), functools.partial(list_payloads, items), process,
                          settings, strings_digest([r for _, r, _ in items])))
    return out
