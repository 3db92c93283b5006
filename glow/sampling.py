"""Sample grids at several temperatures from fixed noise."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from glow.likelihood import postprocess
from glow.model import Glow

__all__ = ["sample_images", "save_sample_grid"]


@torch.no_grad()
def sample_images(model: Glow, n: int, temperature: float, seed: int) -> torch.Tensor:
    """n uint8 images (n, C, H, W) at `temperature`, a function of `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    y = model.sample(n, temperature, generator=generator)
    return postprocess(y, model.config.n_bits).cpu()


@torch.no_grad()
def save_sample_grid(
    model: Glow, path: str | Path, temperatures: Sequence[float], per_temperature: int, seed: int = 0
) -> Path:
    """One row per temperature (the same noise in every row), written atomically as PNG."""
    rows = [sample_images(model, per_temperature, float(t), seed) for t in temperatures]
    grid = make_grid(torch.cat(rows).float() / 255.0, nrow=per_temperature, padding=1, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(grid, tmp)
    tmp.replace(path)
    return path
