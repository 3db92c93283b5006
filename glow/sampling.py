"""Sample grids at several temperatures; every sample's noise depends on (seed, index) alone."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from glow.files import atomic_write_bytes
from glow.likelihood import postprocess
from glow.model import Glow

__all__ = ["sample_seeded", "save_sample_grid"]


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
    model: Glow, path: str | Path, temperatures: Sequence[float], per_temperature: int, seed: int = 0
) -> Path:
    """One row per temperature (the same noise in every row), written atomically as PNG."""
    rows = [sample_seeded(model, range(per_temperature), float(t), seed) for t in temperatures]
    grid = make_grid(torch.cat(rows).float() / 255.0, nrow=per_temperature, padding=1, pad_value=1.0)
    buf = io.BytesIO()
    save_image(grid, buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
