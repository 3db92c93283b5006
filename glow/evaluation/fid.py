"""FID: Inception pool3 features, reference statistics and the Frechet distance.

The network is the FID Inception (`glow.evaluation.inception`: torchvision's trunk with the
TensorFlow graph's four blocks, features bitwise equal to pytorch-fid's). The Frechet
distance is computed here in float64 (scipy's sqrtm). The Inception weights are never
downloaded (compute nodes are offline): they come from a file, found as
`inception_weights_path` says, and are read as plain tensors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from scipy import linalg

from glow.errors import CheckpointMismatch, CheckpointMissing, DataError
from glow.model.likelihood import to_nhwc_uint8

log = logging.getLogger(__name__)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_DETECTOR = "pytorch-fid-inception-v3-pool3-2048"
FID_DIM = 2048
FID_RESIZE = "bilinear-299"  # pytorch-fid resize_input: F.interpolate(299, bilinear)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of features (N, D); N must be >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs an (N >= 2, D) array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class FeatureMoments:
    """Sufficient statistics of a feature set: count, sum and sum of outer products (float64).

    Adding moments merges sets, so a distributed FID reduces three arrays over the ranks
    (D + D*D numbers, ~34 MB at D = 2048) instead of gathering every feature vector onto
    every rank (50,000 x 2,048 float64 is ~820 MB per rank).
    """

    def __init__(self, dim: int):
        self.n = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features) -> "FeatureMoments":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
            raise ValueError(f"FeatureMoments({self.total.shape[0]}) got features of shape {f.shape}")
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def packed(self) -> np.ndarray:
        """One flat float64 array [n, sum, outer] (what a single all-reduce sums)."""
        return np.concatenate([[float(self.n)], self.total, self.outer.ravel()])

    @classmethod
    def from_packed(cls, flat: np.ndarray, dim: int) -> "FeatureMoments":
        m = cls(dim)
        m.n = int(round(float(flat[0])))
        m.total = np.array(flat[1 : dim + 1], np.float64)
        m.outer = np.array(flat[dim + 1 :], np.float64).reshape(dim, dim)
        return m

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance, as `feature_statistics` gives for the same features."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matrix is singular": handled by the caller
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)). As in pytorch-fid, a
    non-finite square root is retried with eps added to both diagonals, and a negligible
    imaginary part (numerical noise) is dropped; a large one raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: singular product; adding %g to the covariance diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}; "
                "too few samples for the feature dimension?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------- Inception features


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to use: ``weights_path`` or the torch hub cache file.

    Raises FileNotFoundError saying where to put the file when it is missing (we never
    download: compute nodes are offline).
    """
    import torch.hub

    if weights_path is not None:
        path = Path(weights_path)
        where = f"the path given ({path})"
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
        where = f"the torch hub cache ({path}; set by $TORCH_HOME, default ~/.cache/torch)"
    if not path.is_file():
        from glow.evaluation.inception import FID_WEIGHTS_URL

        raise CheckpointMissing(
            f"FID Inception weights not found at {where}. This machine cannot download them: "
            f"fetch {FID_WEIGHTS_URL} on a machine with internet access and copy it to {path} "
            f"(file name must be exactly {FID_WEIGHTS_FILE} in $TORCH_HOME/hub/checkpoints/), "
            "or pass its location explicitly (weights_path / --inception-weights)."
        )
    return path


def load_inception(device="cpu", weights_path: str | os.PathLike | None = None):
    """The FID InceptionV3 returning 2048-d pool3 features, in eval mode on ``device``.

    The weights file (``weights_path``, or the torch hub cache file; see
    `inception_weights_path`) is always read with ``torch.load(weights_only=True)``: a file
    in a shared cache can hold tensors, never code.
    """
    import torch

    path = inception_weights_path(weights_path)
    log.info("loading Inception weights from %s", path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling refusal or a corrupt file: say which file
        raise CheckpointMismatch(f"cannot load the Inception weights {path} as plain tensors ({err}); "
                         f"replace it with the original {FID_WEIGHTS_FILE}") from None
    from glow.evaluation.inception import Pool3, fid_inception_v3

    net = fid_inception_v3()
    net.load_state_dict(state_dict)
    return Pool3(net).eval().to(device)


def _iter_batches(images) -> Iterable:
    if isinstance(images, np.ndarray) or (hasattr(images, "detach") and images.ndim == 4):
        yield images
    else:
        yield from images


def inception_features(
    images,
    device="cpu",
    batch_size: int = 50,
    *,
    weights_path: str | os.PathLike | None = None,
    model=None,
) -> np.ndarray:
    """2048-d pool3 features (float64, (N, 2048)) of uint8 RGB or grayscale images.

    ``images``: one array/tensor or an iterable of batches. numpy batches are (B, H, W, C)
    (image layout, as ``glow.data.streams.load_images`` gives); torch batches are (B, C, H, W) (as the
    eval loader yields). Grayscale (C = 1) is replicated to 3 channels, as Inception takes RGB
    (the usual practice for FID on MNIST-like sets). Pixels are scaled to [0, 1]; pytorch-fid
    resizes to 299x299 bilinearly and maps to [-1, 1]. Pass ``model`` (from `load_inception`)
    to reuse a loaded network.
    """
    import torch

    if model is None:
        model = load_inception(device, weights_path)
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in _iter_batches(images):
            arr = to_nhwc_uint8(batch)
            if arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            if arr.shape[-1] != 3:
                raise ValueError(f"inception_features expects RGB or grayscale images, got {arr.shape[-1]} channels")
            for start in range(0, arr.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(arr[start : start + batch_size]))
                x = x.permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 255.0
                feat = model(x)[0]  # (B, 2048, 1, 1)
                chunks.append(feat.reshape(feat.shape[0], -1).double().cpu().numpy())
    if not chunks:
        raise ValueError("inception_features got no images")
    return np.concatenate(chunks, axis=0)


# --------------------------------------------------------------------------- reference statistics


def statistics_key(dataset: str, split: str, resolution: int, n_bits: int, count: int, manifest_hash: str,
                   detector: str = FID_DETECTOR, resize: str = FID_RESIZE) -> dict:
    """The fields that identify a reference-statistics file (the real images are reduced to
    the model's `n_bits` levels, as its samples are, so the bit depth is part of the key)."""
    return {"dataset": str(dataset), "split": str(split), "resolution": int(resolution), "n_bits": int(n_bits),
            "count": int(count), "manifest_hash": str(manifest_hash), "detector": detector, "resize": resize}


def statistics_path(cache_dir, key: Mapping) -> Path:
    """File name encoding every field of ``key`` (so distinct settings never share a file)."""
    name = "fid-ref-{dataset}-{split}-{resolution}px-{n_bits}bit-{count}-{manifest_hash}-{detector}-{resize}.npz"
    return Path(cache_dir) / name.format(**key)


def default_statistics_cache() -> Path:
    """Where reference statistics are cached unless told otherwise: `$GLOW_FID_CACHE`, else
    `$XDG_CACHE_HOME/glow-ood/fid-stats` (default `~/.cache/glow-ood/fid-stats`).

    Never inside the data root, which is often read-only on clusters; the key in the file
    name keeps datasets, splits, resolutions and bit depths apart in one shared directory.
    """
    if os.environ.get("GLOW_FID_CACHE"):
        return Path(os.environ["GLOW_FID_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glow-ood" / "fid-stats"


def save_statistics(path, mu, sigma, key: Mapping) -> None:
    """Write mu, sigma and the key to ``path`` atomically (temp file + os.replace)."""
    from glow.files import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             key=np.array(json.dumps(dict(key), sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())


class StatisticsMismatch(DataError, ValueError):
    """A cached statistics file written for other settings than those asked for."""


MAX_STATISTICS_BYTES = 256 << 20  # mu and sigma of 2048-d features: ~32 MB


def load_statistics(path, key: Mapping | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from ``path`` (no link followed, size capped, never unpickled); with
    ``key``, refuse a file written for other settings."""
    from glow.files import read_bytes

    try:
        with np.load(io.BytesIO(read_bytes(path, MAX_STATISTICS_BYTES)), allow_pickle=False) as z:
            stored = json.loads(str(z["key"]))
            mu, sigma = z["mu"], z["sigma"]
    except (KeyError, ValueError, zipfile.BadZipFile) as err:
        raise StatisticsMismatch(f"{path} is not a statistics file ({err}); delete it") from None
    if key is not None and stored != json.loads(json.dumps(dict(key), sort_keys=True)):
        raise StatisticsMismatch(f"{path} holds statistics for {stored}, not {dict(key)}; delete it or fix the key")
    return mu, sigma


def read_cached_statistics(cache_dir, key: Mapping) -> tuple[np.ndarray, np.ndarray] | None:
    """Reference (mu, sigma) from the cache, or None when it has none usable (then they are
    computed and written with `save_statistics`). In a distributed job rank 0 asks and tells
    the others (`glow.distributed.on_main`), so every rank takes the same path."""
    path = statistics_path(cache_dir, key)
    if not os.path.lexists(path):
        return None
    try:
        stats = load_statistics(path, key)
    except (OSError, StatisticsMismatch) as err:  # UnsafeFile (a link, too large) is an OSError
        log.warning("FID reference statistics %s not used (%s): recomputing them", path, err)
        return None
    log.info("FID reference statistics from cache %s", path)
    return stats
