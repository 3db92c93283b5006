"""What every image source shares: torchvision-exact transforms, decoding a file, arrays as a source.

Image transforms follow torchvision's semantics exactly (``Resize(n)`` resizes the short side to
``n`` with the long side ``int(n * long / short)``; ``CenterCrop`` rounds the offset), but are
written on Pillow so that pool workers need not import torch; ``tests/test_shards.py`` checks
the equality against torchvision.

A source image is decoded only when its header declares at most :data:`MAX_SOURCE_PIXELS`
(Pillow's own limit, ~89 million pixels, only warns below twice that): a small PNG or JPEG that
declares a huge canvas (a decompression bomb) is refused, naming the file, before its pixels
are allocated.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

from glow.data.shards import BadSourceImage, Source
from glow.errors import DataError

INTERPOLATION = "bilinear, antialiased (Pillow Image.resize, as torchvision Resize(antialias=True))"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# 50 megapixels (e.g. 8660 x 5773, a full-frame camera photo): ~150 MB decoded as RGB.
MAX_SOURCE_PIXELS = 50_000_000


class SourceError(DataError, ValueError):
    """The user pointed a builder at something that is not the expected source."""


def resize_short(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` (bilinear, antialiased) on a PIL image."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` for an image at least ``size`` on each side."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image of size {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def open_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as RGB; any failure names the file. An image whose header
    declares more than :data:`MAX_SOURCE_PIXELS` is refused before it is decoded (Pillow's
    decompression-bomb warning is an error here too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_SOURCE_PIXELS:
                    raise BadSourceImage(path, f"its header declares {width}x{height} pixels, more than the "
                                               f"{MAX_SOURCE_PIXELS} a source image may have (a decompression bomb?)")
                im.load()
                return im.convert("RGB")
    except BadSourceImage:
        raise
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb*, ...
        raise BadSourceImage(path, f"{type(exn).__name__}: {exn}") from None


def transform_pil(img: Image.Image, steps: Sequence[str], resolution: int, crop: int | None) -> np.ndarray:
    for step in steps:
        if step == "resize_short":
            img = resize_short(img, resolution)
        elif step == "resize":
            if img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.BILINEAR)
        elif step == "center_crop":
            img = center_crop(img, crop or resolution)
        else:  # pragma: no cover
            raise ValueError(f"unknown transform step {step!r}")
    return np.asarray(img, dtype=np.uint8)


def process_file(payload: tuple, *, steps: tuple, resolution: int, crop: int | None) -> tuple:
    index, path, rel, label = payload
    img = open_rgb(path)
    try:
        arr = transform_pil(img, steps, resolution, crop)
    except ValueError as exn:
        raise BadSourceImage(path, str(exn)) from None
    return index, arr, {"source": rel, "label": label}


def list_payloads(items: list, start: int, stop: int) -> list:
    return [(i, *items[i]) for i in range(start, stop)]


def _process_array(payload: tuple, *, resolution: int) -> tuple:
    index, arr, source, label = payload
    if arr.shape[0] != resolution or arr.shape[1] != resolution:
        arr = np.asarray(Image.fromarray(arr, "RGB").resize((resolution, resolution), Image.BILINEAR))
    return index, arr, {"source": source, "label": label}


class _ArrayPayloads:
    def __init__(self, images: np.ndarray, labels: np.ndarray | None, source: str):
        self.images, self.labels, self.source = images, labels, source

    def __call__(self, start: int, stop: int) -> list:
        lab = self.labels
        return [(i, self.images[i], f"{self.source}[{i}]", None if lab is None else int(lab[i]))
                for i in range(start, stop)]


def array_source(dataset: str, split: str, images: np.ndarray, labels: np.ndarray | None,
                 resolution: int, settings: dict, source_name: str, extra: dict | None = None) -> Source:
    h = hashlib.sha256(images.tobytes())
    if labels is not None:
        h.update(np.asarray(labels, np.int64).tobytes())
    return Source(dataset, split, len(images), _ArrayPayloads(images, labels, source_name),
                  functools.partial(_process_array, resolution=resolution), {**settings, "resolution": int(resolution)},
                  h.hexdigest()[:16], extra or {})
