"""Model-independent evaluation metrics: OOD detection scores, input complexity, typicality, FID.

Conventions
-----------
* An OOD *score* is oriented so that HIGHER means "more in-distribution" (log-likelihood is
  the canonical example). In-distribution samples are the positive class. An AUROC below 0.5
  therefore means the OOD set looks *more* in-distribution than held-out in-distribution data
  (the failure Kirichenko et al. 2020 and Nalisnick et al. 2019 report for flows).
* Input complexity L(x) (Serra et al. 2020) is the size of the PNG encoding at maximum
  compression in bits per dimension. Their score S(x) = bpd(x) - L(x) is large for OOD data,
  so the in-distribution score is -S(x). -L(x) alone is the model-free baseline (a "likelihood"
  under the PNG code).
* The typicality test (Nalisnick et al. 2019) scores a batch of M inputs by
  |mean NLL of the batch - mean NLL of the training set|; lower is more typical, so the
  in-distribution score is minus that statistic.
* FID uses pytorch-fid's InceptionV3 (2048-d pool3 features) and a float64 Frechet distance
  computed here, because pytorch-fid's own passes `disp` to scipy's sqrtm (gone in scipy 1.18).
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image
from scipy import linalg
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

log = logging.getLogger(__name__)

TYPICALITY_BATCH_SIZES = (1, 2, 10, 25)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_DETECTOR = "pytorch-fid-inception-v3-pool3-2048"
FID_RESIZE = "bilinear-299"  # pytorch-fid resize_input: F.interpolate(299, bilinear)


# --------------------------------------------------------------------------- OOD metrics


def ood_metrics(scores_in, scores_out) -> dict:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR for scores where higher = in-distribution.

    In-distribution is the positive class. AUPR-in uses in-distribution as positive with the
    score as is; AUPR-out uses OOD as positive with the negated score. ``fpr_at_95_tpr`` is the
    fraction of OOD samples accepted when the threshold accepts 95% of in-distribution samples.
    AUROC < 0.5 means the OOD set looks more in-distribution than the in-distribution set.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"ood_metrics needs both sets non-empty, got n_in={s_in.size}, n_out={s_out.size}")
    for name, s in (("scores_in", s_in), ("scores_out", s_out)):
        if not np.isfinite(s).all():
            raise ValueError(f"{name} has {int((~np.isfinite(s)).sum())} non-finite values; fix the dump first")
    y = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    s = np.concatenate([s_in, s_out])
    fpr, tpr, _ = roc_curve(y, s)
    idx = int(np.searchsorted(tpr, 0.95, side="left"))
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr_at_95_tpr": float(fpr[idx]),
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
    }


# --------------------------------------------------------------------------- input complexity


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
    arr = _to_nhwc_uint8(images)
    return np.array([png_complexity_bpd(im) for im in arr], dtype=np.float64)


def complexity_corrected_score(bpd, complexity_bpd) -> np.ndarray:
    """In-distribution score -S(x) = L(x) - bpd(x) of Serra et al. 2020 (higher = more in-dist)."""
    return np.asarray(complexity_bpd, dtype=np.float64) - np.asarray(bpd, dtype=np.float64)


# --------------------------------------------------------------------------- typicality


def typicality_batches(n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices (n_batches, batch_size) of disjoint batches from a seeded permutation of range(n).

    The remainder (n mod batch_size) is dropped; batch_size 1 keeps every sample.
    """
    if batch_size < 1:
        raise ValueError(f"typicality batch size must be >= 1, got {batch_size}")
    n_batches = n // batch_size
    if n_batches == 0:
        raise ValueError(f"a set of {n} samples has no batch of size {batch_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n_batches * batch_size].reshape(n_batches, batch_size)


def typicality_statistic(nll, train_mean_nll: float, batch_size: int, seed: int = 0) -> np.ndarray:
    """Per-batch |mean NLL of the batch - training-set mean NLL| (lower = more typical)."""
    nll = np.asarray(nll, dtype=np.float64)
    idx = typicality_batches(nll.size, batch_size, seed)
    return np.abs(nll[idx].mean(axis=1) - float(train_mean_nll))


def typicality_scores(nll, train_mean_nll: float, batch_size: int, seed: int = 0) -> np.ndarray:
    """In-distribution score for the typicality test: minus `typicality_statistic`."""
    return -typicality_statistic(nll, train_mean_nll, batch_size, seed)


# --------------------------------------------------------------------------- Frechet distance


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of features (N, D); N must be >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs an (N >= 2, D) array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


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
        from pytorch_fid.inception import FID_WEIGHTS_URL

        raise FileNotFoundError(
            f"FID Inception weights not found at {where}. This machine cannot download them: "
            f"fetch {FID_WEIGHTS_URL} on a machine with internet access and copy it to {path} "
            f"(file name must be exactly {FID_WEIGHTS_FILE} in $TORCH_HOME/hub/checkpoints/), "
            "or pass its location explicitly (weights_path / --inception-weights)."
        )
    return path


def load_inception(device="cpu", weights_path: str | os.PathLike | None = None):
    """pytorch-fid's InceptionV3 returning 2048-d pool3 features, in eval mode on ``device``.

    Without ``weights_path`` the weights come through pytorch-fid's own loading path from the
    torch hub cache (checked to exist first, so nothing is downloaded); with it, that file is
    loaded instead of the URL.
    """
    import torch
    from pytorch_fid import inception as fid_inception

    path = inception_weights_path(weights_path)
    if weights_path is None:
        patch = nullcontext()
    else:

        def _load_local(url, *args, **kwargs):
            log.info("loading Inception weights from %s (instead of %s)", path, url)
            return torch.load(path, map_location="cpu", weights_only=True)

        patch = mock.patch.object(fid_inception, "load_state_dict_from_url", _load_local)
    block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
    with patch:
        model = fid_inception.InceptionV3([block], resize_input=True, normalize_input=True)
    return model.eval().to(device)


def _to_nhwc_uint8(images) -> np.ndarray:
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
    """2048-d pool3 features (float64, (N, 2048)) of uint8 RGB images.

    ``images``: one array/tensor or an iterable of batches. numpy batches are (B, H, W, 3)
    (image layout, as ``glow.data.load_images`` gives); torch batches are (B, 3, H, W) (as the
    eval loader yields). Pixels are scaled to [0, 1]; pytorch-fid resizes to 299x299 bilinearly
    and maps to [-1, 1]. Pass ``model`` (from `load_inception`) to reuse a loaded network.
    """
    import torch

    if model is None:
        model = load_inception(device, weights_path)
    chunks: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in _iter_batches(images):
            arr = _to_nhwc_uint8(batch)
            if arr.shape[-1] != 3:
                raise ValueError(f"inception_features expects RGB images, got {arr.shape[-1]} channels")
            for start in range(0, arr.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(arr[start : start + batch_size]))
                x = x.permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 255.0
                feat = model(x)[0]  # (B, 2048, 1, 1)
                chunks.append(feat.reshape(feat.shape[0], -1).double().cpu().numpy())
    if not chunks:
        raise ValueError("inception_features got no images")
    return np.concatenate(chunks, axis=0)


# --------------------------------------------------------------------------- reference statistics


def statistics_key(manifest_hash: str, resolution: int, detector: str = FID_DETECTOR, resize: str = FID_RESIZE) -> dict:
    """The fields that identify a reference-statistics file."""
    return {"manifest_hash": str(manifest_hash), "resolution": int(resolution), "detector": detector, "resize": resize}


def statistics_path(cache_dir, key: Mapping) -> Path:
    """File name encoding every field of ``key`` (so distinct settings never share a file)."""
    name = "fid-ref-{manifest_hash}-{resolution}px-{detector}-{resize}.npz".format(**key)
    return Path(cache_dir) / name


def save_statistics(path, mu, sigma, key: Mapping) -> None:
    """Write mu, sigma and the key to ``path`` atomically (temp file + os.replace)."""
    from glow.files import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             key=np.array(json.dumps(dict(key), sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())


def load_statistics(path, key: Mapping | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from ``path``; with ``key``, refuse a file written for other settings."""
    with np.load(path, allow_pickle=False) as z:
        if key is not None:
            stored = json.loads(str(z["key"]))
            if stored != json.loads(json.dumps(dict(key), sort_keys=True)):
                raise ValueError(f"{path} holds statistics for {stored}, not {dict(key)}; delete it or fix the key")
        return z["mu"], z["sigma"]


def cached_statistics(cache_dir, key: Mapping, compute: Callable[[], np.ndarray],
                      write: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reference (mu, sigma) from the cache, or from ``compute()`` (features (N, D)) then cached.

    ``write=False`` computes without writing: in a distributed job every rank computes (the
    features are gathered) and only rank 0 writes.
    """
    path = statistics_path(cache_dir, key)
    if path.is_file():
        log.info("FID reference statistics from cache %s", path)
        return load_statistics(path, key)
    mu, sigma = feature_statistics(compute())
    if write:
        save_statistics(path, mu, sigma, key)
        log.info("FID reference statistics written to %s", path)
    return mu, sigma
