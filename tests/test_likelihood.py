"""Dequantization, evaluation noise and bits per dimension."""

import math

import numpy as np
import pytest
import torch

from glow.model.likelihood import (
    bits_per_dim,
    eval_noise,
    log_p_x,
    postprocess,
    preprocess,
    quantize,
)


def test_quantize_keeps_top_bits():
    x = torch.tensor([0, 7, 8, 255], dtype=torch.uint8)
    assert quantize(x, 5).tolist() == [0, 0, 1, 31]
    assert quantize(x, 8).tolist() == [0, 7, 8, 255]
    with pytest.raises(ValueError, match="uint8"):
        quantize(x.float(), 8)


@pytest.mark.parametrize("n_bits", [5, 8])
def test_preprocess_range_and_bin_centres(n_bits):
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    y = preprocess(x, n_bits, torch.rand(x.shape))
    assert y.min() >= -0.5 and y.max() < 0.5
    centred = preprocess(x, n_bits)
    assert torch.equal(quantize(postprocess(centred, n_bits), n_bits), quantize(x, n_bits))


def test_eval_noise_depends_only_on_seed_and_key():
    a = eval_noise(3, ["00000001", "00000002", "00000003"], (3, 4, 4))
    b = eval_noise(3, ["00000002"], (3, 4, 4))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(eval_noise(4, ["00000002"], (3, 4, 4)), b)
    assert a.min() >= 0 and a.max() < 1


@pytest.mark.parametrize("n_bits", [5, 8])
def test_bits_per_dim_by_hand(n_bits):
    n_dims = 3 * 32 * 32
    log_p_y = torch.tensor([1000.0, -2000.0])
    expected = [(-(v - n_dims * n_bits * math.log(2))) / (n_dims * math.log(2)) for v in (1000.0, -2000.0)]
    assert bits_per_dim(log_p_y, n_dims, n_bits).tolist() == pytest.approx(expected, rel=1e-6)
    # A uniform density over the cube (log p_y = 0) costs exactly n_bits per dimension.
    assert bits_per_dim(0.0, n_dims, n_bits) == pytest.approx(n_bits)
    assert bits_per_dim(np.zeros(3), n_dims, n_bits).tolist() == pytest.approx([n_bits] * 3)
    assert log_p_x(0.0, n_dims, n_bits) == pytest.approx(-n_dims * n_bits * math.log(2))
