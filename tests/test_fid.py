"""glow.evaluation.fid: the Frechet distance, reference statistics, Inception features and weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from glow.evaluation import fid
from tests.helpers.gloo import spawn_gloo
from tests.helpers.models import smooth_images

# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    # diagonal Gaussians: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # full covariances that commute (same eigenvectors): the trace term is sum (sqrt(l1) - sqrt(l2))^2
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    c1, c2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    assert fid.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    s1 = fid.feature_statistics(rng.normal(size=(200, 12)))
    assert fid.frechet_distance(*s1, *s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_equals_pytorch_fid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 12)), rng.normal(size=(150, 12)) @ rng.normal(size=(12, 12)) + 0.5
    s1, s2 = fid.feature_statistics(a), fid.feature_statistics(b)
    ours = fid.frechet_distance(*s1, *s2)
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...)
        try:
            theirs = fid_score.calculate_frechet_distance(*s1, *s2)
        except TypeError:
            pytest.skip("this scipy no longer takes sqrtm(disp=...)")
    assert ours == pytest.approx(theirs, rel=1e-10)


def test_statistics_cache_atomic_and_keyed(tmp_path):
    key = fid.statistics_key("celeba", "train", 32, 8, 10, "abcd1234")
    assert fid.read_cached_statistics(tmp_path, key) is None
    mu, sigma = fid.feature_statistics(np.random.default_rng(0).normal(size=(10, 4)))
    fid.save_statistics(fid.statistics_path(tmp_path, key), mu, sigma, key)
    mu2, sigma2 = fid.read_cached_statistics(tmp_path, key)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert [p.name for p in tmp_path.iterdir()] == [fid.statistics_path(tmp_path, key).name]
    other = fid.statistics_key("celeba", "train", 64, 8, 10, "abcd1234")
    for changed in (other, fid.statistics_key("celeba", "train", 32, 5, 10, "abcd1234"),
                    fid.statistics_key("celeba", "test", 32, 8, 10, "abcd1234"),
                    fid.statistics_key("svhn", "train", 32, 8, 10, "abcd1234"),
                    fid.statistics_key("celeba", "train", 32, 8, 11, "abcd1234"),
                    fid.statistics_key("celeba", "train", 32, 8, 10, "ffff0000")):
        assert fid.statistics_path(tmp_path, changed) != fid.statistics_path(tmp_path, key), changed
    five_bit = fid.statistics_key("celeba", "train", 32, 5, 10, "abcd1234")
    with pytest.raises(ValueError, match="holds statistics for"):
        fid.load_statistics(fid.statistics_path(tmp_path, key), five_bit)
    with pytest.raises(ValueError, match="holds statistics for"):
        fid.load_statistics(fid.statistics_path(tmp_path, key), other)


def test_a_planted_cache_entry_is_not_used(tmp_path):
    """A statistics file that is a link (to a colleague's file) or not an npz is recomputed, never read."""
    key = fid.statistics_key("celeba", "train", 32, 8, 10, "abcd1234")
    elsewhere = tmp_path / "elsewhere.npz"
    fid.save_statistics(elsewhere, np.zeros(4), np.eye(4), key)
    cache = tmp_path / "cache"
    cache.mkdir()
    fid.statistics_path(cache, key).symlink_to(elsewhere)
    assert fid.read_cached_statistics(cache, key) is None
    fid.statistics_path(cache, key).unlink()
    fid.statistics_path(cache, key).write_bytes(b"not a zip file")
    assert fid.read_cached_statistics(cache, key) is None


def test_default_statistics_cache_is_writable_and_outside_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("GLOW_FID_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fid.default_statistics_cache() == tmp_path / "xdg" / "glow-ood" / "fid-stats"
    monkeypatch.setenv("GLOW_FID_CACHE", str(tmp_path / "mine"))
    assert fid.default_statistics_cache() == tmp_path / "mine"


def test_feature_moments_merge_to_the_statistics_of_the_union():
    rng = np.random.default_rng(3)
    parts = [rng.normal(2.0, 3.0, size=(n, 6)) for n in (7, 0, 12)]  # uneven, one rank empty
    merged = fid.FeatureMoments(6)
    for part in parts:
        one = fid.FeatureMoments(6).add(part)
        merged = fid.FeatureMoments.from_packed(merged.packed() + one.packed(), 6)
    mu, sigma = merged.statistics()
    mu_ref, sigma_ref = fid.feature_statistics(np.concatenate(parts))
    assert merged.n == 19
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureMoments(6).add(parts[0][:1]).statistics()


def _fid_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: FID of its share of the features by moment reduction and by gathering."""
    import torch.distributed as dist

    from glow.distributed import all_reduce_sum, gather_objects

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rng = np.random.default_rng(11)
    fake = rng.gamma(2.0, 1.0, size=(301, 64)) @ rng.normal(size=(64, 64))  # correlated, non-zero mean
    real = rng.gamma(2.2, 1.0, size=(257, 64)) @ rng.normal(size=(64, 64))
    results = {}
    for name, how in (("reduce", "reduce"), ("gather", "gather")):
        stats = []
        for feats in (real, fake):
            mine = feats[rank::world]  # unequal shares
            if how == "reduce":
                flat = all_reduce_sum(fid.FeatureMoments(64).add(mine).packed(), world)
                stats.append(fid.FeatureMoments.from_packed(flat, 64).statistics())
            else:
                stats.append(fid.feature_statistics(np.concatenate(gather_objects(mine, world))))
        results[name] = fid.frechet_distance(*stats[1], *stats[0])
    np.save(f"{out}/rank{rank}.npy", np.array([results["reduce"], results["gather"]]))
    dist.destroy_process_group()


def test_fid_by_reduced_moments_equals_the_gather_path_on_two_ranks(tmp_path):
    spawn_gloo(_fid_worker, 2, tmp_path)
    a, b = (np.load(tmp_path / f"rank{r}.npy") for r in range(2))
    assert a[0] == b[0] and a[1] == b[1]  # every rank holds the same FID
    assert a[0] > 1.0  # two different distributions
    assert a[0] == pytest.approx(a[1], rel=1e-6)


# --------------------------------------------------------------------------- FID end to end


def test_missing_inception_weights_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception("cpu")
    msg = str(e.value)
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE) in msg
    assert "cannot download" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fid.load_inception("cpu", weights_path=tmp_path / "nope.pth")




def test_fid_end_to_end_with_random_weights(random_inception_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(random_inception_home))
    model = fid.load_inception("cpu")  # from the hub cache (read as plain tensors)
    real = smooth_images(6, seed=0)
    noise = np.random.default_rng(1).integers(0, 256, real.shape, dtype=np.uint8)
    # batches of both layouts: numpy NHWC and torch NCHW
    batches = [real[:3], torch.from_numpy(real[3:]).permute(0, 3, 1, 2)]
    f_real = fid.inception_features(batches, "cpu", batch_size=2, model=model)
    assert f_real.shape == (6, 2048) and f_real.dtype == np.float64
    f_noise = fid.inception_features(noise, "cpu", batch_size=6, model=model)
    # the layouts and batchings give the same features; noise lands elsewhere (the distance of the
    # statistics, a 2048x2048 matrix square root, is computed once end to end: test_evaluation.py)
    np.testing.assert_allclose(fid.inception_features(real, "cpu", batch_size=6, model=model), f_real,
                               rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(f_real.mean(0) - f_noise.mean(0)) > 1e-3 * np.linalg.norm(f_real.mean(0))

    # an explicit weights file gives the same network
    explicit = fid.load_inception(
        "cpu", weights_path=random_inception_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE
    )
    a, b = model.state_dict(), explicit.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_our_inception_equals_pytorch_fids(random_inception_home, monkeypatch):
    """The network built from pytorch-fid's pieces gives pytorch-fid's InceptionV3 features
    exactly (same modules, same order, same resize and scaling)."""
    from pytorch_fid import inception as fid_inception

    weights = random_inception_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE
    ours = fid.load_inception("cpu", weights_path=weights)
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url",
                        lambda *a, **k: torch.load(weights, weights_only=True))
    block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
    theirs = fid_inception.InceptionV3([block], resize_input=True, normalize_input=True).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(ours(x)[0], theirs(x)[0])

