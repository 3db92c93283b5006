"""glow.model.sampling: sample grids people can read (upscaled, one labelled row per temperature)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from glow.model import Glow, GlowConfig
from glow.model.sampling import grid_image, save_sample_grid


def test_grid_upscales_by_nearest_neighbour_and_labels_every_row():
    colours = [(250, 0, 0), (0, 250, 0)]
    rows = [torch.tensor(c, dtype=torch.uint8).view(1, 3, 1, 1).expand(3, 3, 8, 8).clone() for c in colours]
    rows[0][1, :, 0, 0] = 0  # one black pixel: must become a black scale x scale block
    grid = np.asarray(grid_image(rows, ["T=0", "T=0.7"], scale=4, pad=2, label_width=50))
    assert grid.shape == (2 * (32 + 2) + 2, 50 + 3 * (32 + 2) + 2, 3)
    for r, colour in enumerate(colours):
        top = 2 + r * 34
        for c in range(3):
            left = 50 + 2 + c * 34
            tile = grid[top:top + 32, left:left + 32]
            if (r, c) == (0, 1):
                assert (tile[:4, :4] == 0).all() and (tile[4:, 4:] == colour).all()
            else:
                assert (tile == colour).all()
        label = grid[top:top + 32, :50]
        assert (label.sum(-1) < 300).any()  # dark text on white in the label column of every row
    assert (grid[:, :50] == 255).all(-1).mean() > 0.8  # and nothing else there


def test_saved_grid_is_four_times_larger_than_the_samples(tmp_path):
    model = Glow(GlowConfig(image_size=8, n_levels=2, hidden_channels=4)).eval()
    path = save_sample_grid(model, tmp_path / "samples.png", [0.0, 1.0], 3, seed=0)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.height >= 2 * 8 * 4 and im.width >= 3 * 8 * 4
