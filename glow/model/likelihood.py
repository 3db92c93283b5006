"""From uint8 images to the model's input and from log-densities to bits per dimension.

The numerical conventions of the whole project:

    x_b = x >> (8 - n_bits),  y = (x_b + u) / 2**n_bits - 0.5,  u ~ U[0, 1)^D
    log p(x) = log p_y(y) - D * log(2**n_bits)
    bpd      = -log p(x) / (D * ln 2)

`log p(x)` is a (single-sample Monte-Carlo) lower bound on the log-probability of the
discrete image; its negative mean over a dataset bounds the data's entropy from above.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "bits_per_dim",
    "eval_noise",
    "log_p_x",
    "perturb_pixels",
    "postprocess",
    "preprocess",
    "quantize",
    "render_bins",
    "requantize",
    "to_nhwc_uint8",
]


def _check_n_bits(n_bits: int) -> None:
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")


def quantize(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Reduce uint8 pixels to `n_bits` bits: integer bins in [0, 2**n_bits)."""
    _check_n_bits(n_bits)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got dtype {x.dtype}")
    return x >> (8 - n_bits)


def preprocess(
    x: torch.Tensor, n_bits: int, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 images -> dequantized model input `y` in [-0.5, 0.5).

    `noise` is `u` in [0, 1) of the same shape (training: fresh `torch.rand`; evaluation:
    `eval_noise`). Without noise the bin centre (u = 0.5) is used.
    """
    bins = quantize(x, n_bits).float()
    if noise is None:
        u = 0.5
    else:
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != image shape {tuple(x.shape)}")
        u = noise.to(device=x.device, dtype=torch.float32)
    return (bins + u) / (2**n_bits) - 0.5


def render_bins(bins: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Integer bins in [0, 2**n_bits) -> uint8 spread over 0..255 (full contrast at 5 bits).

    How samples are rendered; the identity at 8 bits.
    """
    _check_n_bits(n_bits)
    return (bins.float() * (255.0 / (2**n_bits - 1))).round().to(torch.uint8)


def postprocess(y: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Model space -> uint8 images (the inverse of `preprocess` up to the noise)."""
    _check_n_bits(n_bits)
    n_bins = 2**n_bits
    return render_bins(torch.floor((y.float() + 0.5) * n_bins).clamp(0, n_bins - 1), n_bits)


def requantize(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 images reduced to `n_bits` and rendered as samples are (`render_bins`).

    What a data image looks like through an `n_bits` model: FID compares samples with
    references made this way, so the bit depth alone does not count as a difference.
    """
    return render_bins(quantize(x, n_bits), n_bits)


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def eval_noise(seed: int, keys: Sequence[str], shape: Sequence[int]) -> torch.Tensor:
    """Dequantization noise that depends on (seed, sample key) alone.

    Scores therefore do not depend on batch size, worker count or the number of
    processes. Returns float32 of shape (len(keys), *shape) on the CPU.
    """
    out = torch.empty((len(keys), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for i, key in enumerate(keys):
        generator.manual_seed(_key_seed(seed, str(key)))
        out[i] = torch.rand(tuple(shape), generator=generator)
    return out


def log_p_x(log_p_y, n_dims: int, n_bits: int):
    """Discrete log-likelihood (nats) from the model's continuous log p_y (nats)."""
    _check_n_bits(n_bits)
    return log_p_y - n_dims * math.log(2**n_bits)


def bits_per_dim(log_p_y, n_dims: int, n_bits: int):
    """Bits per dimension of each sample, from the model's per-sample log p_y (nats).

    Works on floats, NumPy arrays and tensors alike; never averages over the batch.
    """
    return -log_p_x(log_p_y, n_dims, n_bits) / (n_dims * math.log(2.0))



def perturb_pixels(x: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each uint8 value with a uniform random one with probability `prob`.

    The input perturbation of the background model of Ren et al. (2019): it keeps the
    local statistics a flow latches onto and destroys the semantics.
    """
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"perturbation probability must be in [0, 1), got {prob}")
    if prob == 0.0:
        return x
    device = generator.device if generator is not None else x.device
    mask = torch.rand(x.shape, generator=generator, device=device) < prob
    noise = torch.randint(0, 256, x.shape, generator=generator, device=device, dtype=torch.uint8)
    return torch.where(mask.to(x.device), noise.to(x.device), x)


def to_nhwc_uint8(images) -> np.ndarray:
    """numpy (N, H, W, C) stays; a torch tensor (N, C, H, W) is moved to numpy N, H, W, C."""
    if hasattr(images, "detach"):  # torch tensor, channels first
        arr = images.detach().cpu().numpy()
        if arr.ndim != 4:
            raise ValueError(f"expected a tensor (N, C, H, W), got shape {tuple(arr.shape)}")
        arr = arr.transpose(0, 2, 3, 1)
    else:
        arr = np.asarray(images)
        if arr.ndim != 4:
            raise ValueError(f"expected an array (N, H, W, C), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {arr.dtype}")
    return arr
