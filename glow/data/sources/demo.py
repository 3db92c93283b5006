"""The embedded demo sets, built offline from images that ship inside installed packages.

demo
    32x32 crops of the colour photographs that ship inside scikit-image's wheel. Each photo
    is used at full and half scale, cut into a grid of ``cell`` x ``cell`` cells; ~15% of
    the cells of every (photo, scale) are held out for ``test`` and every crop lies inside
    one cell, so no test pixel is ever seen in training. Each (photo, scale) contributes the
    same number of crops. (This design reproduces Kirichenko et al.'s effect on a CPU:
    likelihood AUROC ~0.33, complexity-corrected AUROC ~0.9 against ``digits``; see README.)
digits
    scikit-learn's 1,797 8x8 digits (values 0..16), grey range mapped linearly to 64..191,
    upscaled bilinearly to 32x32 and replicated to RGB: a house-number stand-in.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from glow.data.shards import Source
from glow.data.sources.images import array_source

DEMO_PHOTOS = ("astronaut", "chelsea", "rocket", "stereo_motorcycle", "immunohistochemistry",
               "coffee", "hubble_deep_field", "retina", "colorwheel")
DEMO_SCALES = (1.0, 0.5)
DIGITS_GREY = (64, 191)


# --------------------------------------------------------------------------- demo
def load_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"skimage.data.{name} is not a colour photo: shape {img.shape}")
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _scaled(img: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def demo_crops(n_train: int = 20000, n_test: int = 2000, *, seed: int = 0, size: int = 32,
               cell: int = 64, test_fraction: float = 0.15,
               photos: tuple[str, ...] = DEMO_PHOTOS, with_positions: bool = False) -> dict[str, np.ndarray]:
    """Return {"train": (n_train,size,size,3), "test": (n_test,...)} uint8 crops; with
    ``with_positions`` also "<split>_pos": (n, 3) int arrays of (view, top, left), where
    view indexes (photo, scale) pairs in order."""
    rng = np.random.default_rng([seed, 1234])
    views = [(p, s, _scaled(load_photo(p), s)) for p in photos for s in DEMO_SCALES]
    cells = {"train": [], "test": []}  # per view: list of (y0, x0)
    for _, _, img in views:
        gh, gw = img.shape[0] // cell, img.shape[1] // cell
        all_cells = [(r * cell, c * cell) for r in range(gh) for c in range(gw)]
        if len(all_cells) < 2:
            raise ValueError(f"a {img.shape} photo has fewer than 2 cells of {cell} px")
        n_test_cells = min(len(all_cells) - 1, max(1, round(test_fraction * len(all_cells))))
        test_idx = set(rng.choice(len(all_cells), n_test_cells, replace=False).tolist())
        cells["test"].append([c for i, c in enumerate(all_cells) if i in test_idx])
        cells["train"].append([c for i, c in enumerate(all_cells) if i not in test_idx])
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        crops = np.empty((n, size, size, 3), np.uint8)
        pos = np.empty((n, 3), np.int64)
        view_of = np.arange(n) % len(views)  # equal share per (photo, scale)
        rng.shuffle(view_of)
        for k, v in enumerate(view_of):
            img = views[v][2]
            y0, x0 = cells[split][v][rng.integers(len(cells[split][v]))]
            dy, dx = rng.integers(0, cell - size + 1, size=2)
            crops[k] = img[y0 + dy:y0 + dy + size, x0 + dx:x0 + dx + size]
            pos[k] = (v, y0 + dy, x0 + dx)
        out[split] = crops
        if with_positions:
            out[split + "_pos"] = pos
    return out


def demo_sources(n_train: int = 20000, n_test: int = 2000, seed: int = 0) -> list[Source]:
    import skimage

    crops = demo_crops(n_train, n_test, seed=seed)
    settings = {
        "resolution": 32,
        "preprocessing": {"crop": "random 32x32 inside one 64x64 grid cell", "resize": "photos at scales 1 and 0.5",
                          "interpolation": "bilinear (Pillow) for the half-scale photos",
                          "test_cells_fraction": 0.15},
        "source": {"kind": "demo", "description": "crops of scikit-image's bundled colour photos",
                   "photos": list(DEMO_PHOTOS), "scales": list(DEMO_SCALES), "seed": seed,
                   "scikit_image": skimage.__version__},
    }
    return [array_source("demo", split, crops[split], None, 32, settings, "skimage-crop")
            for split in ("train", "test")]


def digits_images(size: int = 32, grey: tuple[int, int] = DIGITS_GREY) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    lo, hi = grey
    out = np.empty((len(d.images), size, size, 3), np.uint8)
    for i, im in enumerate(d.images):
        g = (lo + (hi - lo) * im / 16.0).astype(np.float32)
        up = np.asarray(Image.fromarray(g, "F").resize((size, size), Image.BILINEAR))
        out[i] = np.clip(np.rint(up), 0, 255).astype(np.uint8)[..., None]
    return out, d.target.astype(np.int64)


def digits_sources() -> list[Source]:
    import sklearn

    images, labels = digits_images()
    settings = {
        "resolution": 32,
        "preprocessing": {"crop": None, "resize": 32, "interpolation": "bilinear (Pillow, float mode 'F')",
                          "grey_range": list(DIGITS_GREY), "channels": "grey replicated to RGB",
                          "input_range": [0, 16]},
        "source": {"kind": "digits", "description": "scikit-learn load_digits (1,797 8x8 digits) as OOD",
                   "scikit_learn": sklearn.__version__},
    }
    return [array_source("digits", "test", images, labels, 32, settings, "sklearn-digits")]
