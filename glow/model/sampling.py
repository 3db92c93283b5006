"""Sample grids at several temperatures; every sample's noise depends on (seed, index) alone."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from glow.files import atomic_write_bytes
from glow.model import Glow
from glow.model.likelihood import postprocess

__all__ = ["GRID_SCALE", "grid_image", "sample_seeded", "save_sample_grid"]

GRID_SCALE = 4  # 32x32 samples become 128x128: readable on screen and in wandb


def _sample_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sample:{seed}:{index}".encode()).digest()[:8], "little") >> 1


@torch.inference_mode()
def sample_seeded(model: Glow, indices: Iterable[int], temperature: float, seed: int) -> torch.Tensor:
    """uint8 samples (n, C, H, W) whose noise depends on (seed, sample index) alone.

    A sample is therefore the same whatever batch, rank or number of processes draws it.
    """
    noise: list[list[torch.Tensor]] = [[] for _ in model.latent_shapes]
    for index in indices:
        generator = torch.Generator().manual_seed(_sample_seed(seed, int(index)))
        for level, shape in enumerate(model.latent_shapes):
            noise[level].append(torch.randn(shape, generator=generator))
    y = model.sample_from_noise([torch.stack(n) for n in noise], temperature)
    return postprocess(y, model.config.n_bits).cpu()


def save_sample_grid(
    model: Glow, path: str | Path, temperatures: Sequence[float], per_temperature: int, seed: int = 0,
    scale: int = GRID_SCALE,
) -> Path:
    """One row per temperature (the same noise in every row), labelled ``T=...``, upscaled
    ``scale`` times (nearest neighbour, so pixels stay sharp), written atomically as PNG."""
    rows = [sample_seeded(model, range(per_temperature), float(t), seed) for t in temperatures]
    image = grid_image(rows, [f"T={float(t):g}" for t in temperatures], scale=scale)
    buf = io.BytesIO()
    image.save(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def grid_image(rows: Sequence[torch.Tensor], labels: Sequence[str], scale: int = GRID_SCALE,
               pad: int = 2, label_width: int = 56) -> Image.Image:
    """uint8 image rows ((n, C, H, W) each) -> one RGB grid, each row labelled on the left.

    Every image is upscaled ``scale`` times by nearest neighbour and framed by ``pad``
    white pixels; labels are black on white in a left column ``label_width`` pixels wide.
    """
    n = max(len(r) for r in rows)
    h, w = (int(rows[0].shape[2]) * scale, int(rows[0].shape[3]) * scale)
    grid = Image.new("RGB", (label_width + n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = pad + r * (h + pad)
        draw.text((4, top + h // 2 - 6), label, fill="black")
        for c, img in enumerate(row):
            arr = img.permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
            grid.paste(tile.resize((w, h), Image.NEAREST), (label_width + pad + c * (w + pad), top))
    return grid
