"""CIFAR-10/100 pickle batches and MNIST/Fashion-MNIST IDX files, in their real on-disk
formats, built into shards: counts, labels, channels, resolution, padding, bad inputs."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from glow.data.sources.cifar import cifar_sources
from glow.data.sources.images import SourceError
from glow.data.sources.mnist import idx_sources, read_idx
from glow.data.streams import make_eval_loader, read_manifest
from glow.errors import EXIT_DATA
from tests.helpers.fake_sources import make_fake_cifar, make_fake_idx, write_idx
from tests.test_shards import read_shards, run_cli


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_build_counts_labels_pixels(tmp_path, name):
    src = make_fake_cifar(tmp_path / "src", name, per_batch=6, n_test=8)
    out = tmp_path / "out"
    run_cli(name, "--root", str(src), "--out", str(out), "--samples-per-shard", "7", "--valid", "4")
    layout = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    batches = [pickle.load(open(src / layout / f, "rb"), encoding="bytes") for f in files]
    data = np.concatenate([b[b"data"] for b in batches])
    key = b"labels" if name == "cifar10" else b"fine_labels"
    labels = sum((b[key] for b in batches), [])
    for split, n in (("train", 26), ("valid", 4), ("test", 8)):
        man = read_manifest(out, name, split)
        assert man["count"] == n and man["channels"] == 3 and man["resolution"] == 32
        assert [s["count"] for s in man["shards"]] == [min(7, n - i) for i in range(0, n, 7)]
    train = read_shards(out / name / "train")
    valid = read_shards(out / name / "valid")
    img, meta = train["00000003"]
    assert img.shape == (32, 32, 3) and meta["label"] == labels[3]
    # R, G, B planes, row-major: pixel (row 1, col 2) of channel c is data[3, c*1024 + 1*32 + 2]
    assert [img[1, 2, c] for c in range(3)] == [data[3, c * 1024 + 34] for c in range(3)]
    assert valid["00000000"][1]["label"] == labels[26]  # valid = the last train images
    assert np.array_equal(valid["00000001"][0].transpose(2, 0, 1).reshape(-1), data[27])


@pytest.mark.parametrize("layout,name,gz", [("MNIST", "mnist", False), ("FashionMNIST", "fashion-mnist", True)])
def test_idx_build_gray_padded(tmp_path, layout, name, gz):
    src = make_fake_idx(tmp_path / "src", layout, n_train=24, n_test=12, gz=gz)
    out = tmp_path / "out"
    run_cli(name, "--root", str(src), "--out", str(out), "--samples-per-shard", "10")
    ext = ".gz" if gz else ""
    x = read_idx(src / layout / "raw" / f"t10k-images-idx3-ubyte{ext}", 2051)
    for split, n in (("train", 24), ("test", 12)):
        man = read_manifest(out, name, split)
        assert man["count"] == n and man["channels"] == 1 and man["resolution"] == 32
        assert "no resize" in man["preprocessing"]["pad"]
    samples = read_shards(out / name / "test")
    img, meta = samples["00000005"]
    assert img.shape == (32, 32) and meta["label"] == 5  # stored as 1-channel PNG
    assert np.array_equal(img[2:30, 2:30], x[5])  # the 28x28 digit sits in the centre
    assert not img[:2].any() and not img[30:].any() and not img[:, :2].any() and not img[:, 30:].any()
    b = next(iter(make_eval_loader(out, name, "test", batch_size=4, rank=0, world_size=1)))
    assert b["image"].shape == (4, 1, 32, 32) and b["label"].tolist() == [0, 1, 2, 3]
    rgb = next(iter(make_eval_loader(out, name, "test", batch_size=4, rank=0, world_size=1, channels=3,
                                     convert_channels=True)))["image"]
    assert rgb.shape == (4, 3, 32, 32) and all(np.array_equal(rgb[:, c], b["image"][:, 0]) for c in range(3))


def test_idx_bad_inputs_named(tmp_path):
    src = make_fake_idx(tmp_path / "src", n_train=5, n_test=3)
    raw = src / "MNIST" / "raw"
    out = str(tmp_path / "out")
    imgs = raw / "t10k-images-idx3-ubyte"
    good = imgs.read_bytes()
    imgs.write_bytes(good[:-10])
    res = run_cli("mnist", "--root", str(src), "--out", out, ok=False)
    assert res.exit_code == EXIT_DATA and str(imgs) in res.output and "truncated" in res.output
    imgs.write_bytes((2049).to_bytes(4, "big") + good[4:])
    res = run_cli("mnist", "--root", str(src), "--out", out, ok=False)
    assert str(imgs) in res.output and "magic number 2049, expected 2051" in res.output
    imgs.write_bytes(good + b"\0")
    res = run_cli("mnist", "--root", str(src), "--out", out, ok=False)
    assert str(imgs) in res.output and "longer than its header" in res.output
    imgs.write_bytes(good)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), 2049)
    res = run_cli("mnist", "--root", str(src), "--out", out, ok=False)
    assert "holds 3 images but" in res.output and "4 labels" in res.output
    (raw / "t10k-labels-idx1-ubyte").unlink()
    res = run_cli("mnist", "--root", str(src), "--out", out, ok=False)
    assert "IDX file missing" in res.output and "t10k-labels-idx1-ubyte" in res.output
    res = run_cli("fashion-mnist", "--root", str(src), "--out", out, ok=False)
    assert "FashionMNIST/raw" in res.output


def test_cifar_bad_inputs_named(tmp_path):
    src = make_fake_cifar(tmp_path / "src", per_batch=3, n_test=2)
    d = src / "cifar-10-batches-py"
    out = str(tmp_path / "out")
    (d / "data_batch_4").unlink()
    res = run_cli("cifar10", "--root", str(src), "--out", out, ok=False)
    assert res.exit_code == EXIT_DATA and "batch file missing" in res.output and str(d / "data_batch_4") in res.output
    with open(d / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    res = run_cli("cifar10", "--root", str(src), "--out", out, ok=False)
    assert str(d / "data_batch_4") in res.output and "N x 3072" in res.output
    with open(d / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    res = run_cli("cifar10", "--root", str(src), "--out", out, ok=False)
    assert "has shape (2,)" in res.output and "3 integer labels" in res.output
    (d / "test_batch").write_bytes(pickle.dumps({b"data": 1})[:-5])
    res = run_cli("cifar10", "--root", str(src), "--split", "test", "--out", out, ok=False)
    assert str(d / "test_batch") in res.output and "CIFAR python batch" in res.output
    res = run_cli("cifar100", "--root", str(src), "--out", out, ok=False)
    assert "cifar-100-python" in res.output
    with pytest.raises(SourceError, match="--valid 100"):
        make_fake_cifar(tmp_path / "ok", per_batch=3, n_test=2)
        cifar_sources("cifar10", tmp_path / "ok", valid=100)


class _Plant:
    def __reduce__(self):
        return (os.system, ("touch PLANTED",))


def test_cifar_pickle_runs_no_code(tmp_path, monkeypatch):
    """A planted CIFAR batch whose unpickling would run a shell command is refused unrun."""
    src = make_fake_cifar(tmp_path / "src", per_batch=2, n_test=2)
    monkeypatch.chdir(tmp_path)
    (src / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Plant(), b"labels": []}))
    with pytest.raises(SourceError, match="posix.system is not allowed|os.system is not allowed"):
        cifar_sources("cifar10", src, splits=["test"])
    assert not (tmp_path / "PLANTED").exists()


def test_idx_wider_than_resolution_refused(tmp_path):
    src = make_fake_idx(tmp_path / "src", n_train=2, n_test=2)
    with pytest.raises(SourceError, match="padded, never resized"):
        idx_sources("mnist", src, resolution=28 - 1)
    assert len(idx_sources("mnist", src, resolution=28)) == 2
