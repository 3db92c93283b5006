"""Input complexity L(x) (Serra et al. 2020): the PNG code length of an image in bits per dimension.

Computed by the evaluation jobs for every sample they score (the dump's ``complexity_bpd``), of
the image the model scored (at ``n_bits < 8`` the quantized bins); the reports only read it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["png_complexity_bpd", "png_complexity_bpd_batch"]


def png_complexity_bpd(image) -> float:
    """PNG size at maximum compression (Pillow, compress_level=9, optimize) in bits/dim.

    ``image``: uint8 array H x W x C (C = 1 or 3) or H x W. The size includes the PNG headers,
    as the encoders Serra et al. (2020) used do; that is ~0.2 bits/dim at 32x32x3.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"png_complexity_bpd expects uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"png_complexity_bpd expects H x W x C, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=9, optimize=True)
    return 8.0 * buf.tell() / arr.size


def png_complexity_bpd_batch(images) -> np.ndarray:
    """`png_complexity_bpd` for a batch: numpy (N, H, W, C) or a torch tensor (N, C, H, W)."""
    from glow.model.likelihood import (
        to_nhwc_uint8,  # torch, only for the evaluation jobs
    )

    arr = to_nhwc_uint8(images)
    return np.array([png_complexity_bpd(im) for im in arr], dtype=np.float64)
