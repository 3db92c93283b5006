"""What the flow does to an image: per-level latents and coupling-layer s and t maps.

Kirichenko et al. (2020) show that the coupling networks' shift t and scale s reproduce the
local structure of the input (edges, the image itself at low resolution) whatever the image
is; an OOD image is "explained" by the same local copying. `plot_latents` draws, for chosen
in-distribution and OOD images, the input, each level's latent and the s / t outputs of
selected coupling layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from glow.files import atomic_save_figure  # noqa: E402
from glow.model import Glow  # noqa: E402
from glow.model.flows import split_shift_scale  # noqa: E402
from glow.model.likelihood import eval_noise, preprocess  # noqa: E402

__all__ = ["coupling_maps", "default_layers", "plot_latents"]


def default_layers(model: Glow) -> list[tuple[int, int]]:
    """(level, step) of the first and last coupling of level 0 and the last of the top level."""
    last_level = len(model.levels) - 1
    picks = [(0, 0), (0, len(model.levels[0]) - 1), (last_level, len(model.levels[last_level]) - 1)]
    return list(dict.fromkeys(picks))


@torch.inference_mode()
def coupling_maps(model: Glow, y: torch.Tensor, layers: Sequence[tuple[int, int]]):
    """Latents and, per selected coupling, (shift t, scale s) as (B, C, H, W) tensors."""
    captured: dict[tuple[int, int], torch.Tensor] = {}
    hooks = []
    for level, step in layers:
        net = model.levels[level][step].coupling.net
        hooks.append(net.register_forward_hook(lambda _m, _i, out, key=(level, step): captured.__setitem__(key, out)))
    try:
        latents = model.encode(y)
    finally:
        for hook in hooks:
            hook.remove()
    maps = {}
    for key, h in captured.items():
        h = h.float()
        if h.shape[1] % 2 == 0 and model.config.coupling == "affine":
            maps[key] = split_shift_scale(h)
        else:
            maps[key] = (h, torch.ones_like(h))
    return latents, maps


def _gray(t: torch.Tensor) -> np.ndarray:
    """Channel mean, normalized to [0, 1] per image for display."""
    a = t.float().mean(0).cpu().numpy()
    lo, hi = np.percentile(a, 1), np.percentile(a, 99)
    return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1)


def plot_latents(model: Glow, image_sets: Sequence[tuple[str, torch.Tensor]], path: str | Path,
                 layers: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> Path:
    """One row per image: input | latents per level | t and s of each selected coupling."""
    layers = list(layers or default_layers(model))
    rows = []
    for name, images in image_sets:
        keys = [f"latents-{name}-{i}" for i in range(len(images))]
        y = preprocess(images, model.config.n_bits, eval_noise(seed, keys, images.shape[1:]))
        latents, maps = coupling_maps(model, y.to(model.top_prior.device), layers)
        for i in range(len(images)):
            img = images[i].permute(1, 2, 0).numpy()
            row = [(f"{name}", img[:, :, 0], "gray") if img.shape[2] == 1 else (f"{name}", img, None)]
            row += [(f"z level {lv}", _gray(z[i]), "gray") for lv, z in enumerate(latents)]
            for key in layers:
                t, s = maps[key]
                row += [(f"t L{key[0]}K{key[1]}", _gray(t[i]), "viridis"), (f"s L{key[0]}K{key[1]}", _gray(s[i]), "magma")]
            rows.append(row)
    ncol = len(rows[0])
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.3 * ncol, 1.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (title, img, cmap) in enumerate(row):
            ax = axes[r][c]
            pixels = {"vmin": 0, "vmax": 255} if img.dtype == np.uint8 else {}  # a gray input keeps its levels
            ax.imshow(img, cmap=cmap, interpolation="nearest", **pixels)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle("Latents per level and coupling shift t / scale s (channel means)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return atomic_save_figure(fig, path)
