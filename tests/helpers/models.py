"""Small models and images for the numerics tests."""

from __future__ import annotations

import numpy as np
import torch

from glow.model.config import GlowConfig
from glow.model.glow import Glow

TINY = GlowConfig(image_size=8, in_channels=3, n_levels=2, steps_per_level=2, hidden_channels=8)


def randomize(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter away from its (often trivial) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def initialized_model(config=TINY, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = Glow(config).to(dtype)
    x = torch.rand(16, 3, config.image_size, config.image_size, dtype=dtype) - 0.5
    model.log_prob(x)  # ActNorm data-dependent init
    randomize(model, scale=0.05, seed=seed)
    return model.eval()


def smooth_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        c, f = rng.uniform(40, 200, 3), rng.uniform(0.5, 2.0, 2)
        img = c + 50 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy))[..., None]
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)
