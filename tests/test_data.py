"""Train/eval streams over shards: coverage, determinism, rank splits, corrupt shards."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from glow.data.shards import ShardError
from glow.data.streams import (
    ShardReadError,
    load_images,
    make_eval_loader,
    make_train_loader,
    manifest_hash,
    read_manifest,
)
from tests.helpers.fake_sources import (
    build_small_shards,
    make_fake_svhn,
    svhn_expected_labels,
)


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """gaussian/test with 60 samples in 3 shards of 20."""
    root = tmp_path_factory.mktemp("shards3")
    man = build_small_shards(root, n=60, samples_per_shard=20)
    assert len(man["shards"]) == 3
    return root


def eval_keys(root, world_size, num_workers, dataset="gaussian", split="test", batch_size=7):
    keys, per_rank = [], []
    for rank in range(world_size):
        n = 0
        for b in make_eval_loader(root, dataset, split, batch_size=batch_size, rank=rank,
                                  world_size=world_size, num_workers=num_workers):
            assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 32, 32)
            assert len(b["key"]) == len(b["index"]) == len(b["label"]) == b["image"].shape[0] <= batch_size
            assert [int(k) for k in b["key"]] == b["index"].tolist()
            keys += b["key"]
            n += len(b["key"])
        per_rank.append(n)
    return keys, per_rank


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (2, 0), (3, 1)])
def test_eval_every_key_exactly_once(three_shards, world_size, num_workers):
    keys, per_rank = eval_keys(three_shards, world_size, num_workers)
    assert Counter(keys) == Counter("%08d" % i for i in range(60))
    assert sum(per_rank) == read_manifest(three_shards, "gaussian", "test")["count"]


def test_eval_fewer_shards_than_splits(tmp_path):
    build_small_shards(tmp_path, n=25, samples_per_shard=20)  # 2 shards, 2 ranks x 2 workers = 4 splits
    keys, per_rank = eval_keys(tmp_path, 2, 2)
    assert sorted(keys) == ["%08d" % i for i in range(25)] and min(per_rank) > 0


def test_eval_labels_and_images(tmp_path):
    from scipy.io import loadmat

    from glow.data.shards import build
    from glow.data.sources.svhn import svhn_sources

    src = make_fake_svhn(tmp_path / "src", n_train=3, n_test=23)
    build(svhn_sources(src, splits=["test"])[0], tmp_path / "out", samples_per_shard=10, progress=False)
    batches = list(make_eval_loader(tmp_path / "out", "svhn", "test", batch_size=8, rank=0, world_size=1))
    labels = torch.cat([b["label"] for b in batches])
    assert labels.tolist() == svhn_expected_labels(23).tolist()
    x = loadmat(str(src / "test_32x32.mat"))["X"]
    assert np.array_equal(batches[0]["image"][5].permute(1, 2, 0).numpy(), x[:, :, :, 5])
    got = load_images(tmp_path / "out", "svhn", "test", ["00000021", "4"])
    assert np.array_equal(got["00000021"], x[:, :, :, 21]) and np.array_equal(got["4"], x[:, :, :, 4])
    # a dataset without labels gives -1
    build_small_shards(tmp_path / "g", n=5, samples_per_shard=5)
    b = next(iter(make_eval_loader(tmp_path / "g", "gaussian", "test", batch_size=8, rank=0, world_size=1)))
    assert b["label"].tolist() == [-1] * 5


def train_batches(root, n=4, **kw):
    args = dict(batch_size=8, seed=1, epoch=0, rank=0, world_size=2, num_workers=0,
                batches_per_epoch=n, shuffle_buffer=50)
    args.update(kw)
    return list(make_train_loader(root, "gaussian", "test", **args))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_deterministic_and_rank_dependent(three_shards, num_workers):
    a = train_batches(three_shards, num_workers=num_workers)
    b = train_batches(three_shards, num_workers=num_workers)
    assert len(a) == 4 and all(x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_rank = train_batches(three_shards, num_workers=num_workers, rank=1)
    other_epoch = train_batches(three_shards, num_workers=num_workers, epoch=1)
    other_seed = train_batches(three_shards, num_workers=num_workers, seed=2)
    for c in (other_rank, other_epoch, other_seed):
        assert not torch.equal(a[0], c[0])


def test_train_exact_length_and_resume_skip(three_shards):
    full = train_batches(three_shards, n=7, num_workers=2)
    assert len(full) == 7  # 7 batches split 4 + 3 over two workers, exactly
    resumed = train_batches(three_shards, n=7, num_workers=2, skip_batches=3)
    assert len(resumed) == 4 and all(torch.equal(x, y) for x, y in zip(full[3:], resumed))
    assert len(train_batches(three_shards, n=1, num_workers=2)) == 1  # a worker with no share ends at once
    # resampling: more batches than one pass over the data
    assert len(train_batches(three_shards, n=20, batch_size=16)) == 20


def test_train_hflip(tmp_path):
    build_small_shards(tmp_path, n=8, samples_per_shard=8)
    kw = dict(batch_size=8, world_size=1, batches_per_epoch=1, shuffle_buffer=1)
    plain = train_batches(tmp_path, **kw)[0]
    flipped = train_batches(tmp_path, hflip=True, **kw)[0]
    assert torch.equal(flipped, train_batches(tmp_path, hflip=True, **kw)[0])
    same = [torch.equal(p, f) for p, f in zip(plain, flipped)]
    mirrored = [torch.equal(p.flip(-1), f) for p, f in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored)


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    build_small_shards(tmp_path, n=40, samples_per_shard=20)
    d = tmp_path / "gaussian" / "test"
    shard = d / "gaussian-test-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    with pytest.raises(ShardReadError, match="gaussian-test-000001.tar"):
        eval_keys(tmp_path, 1, 0)
    shard.write_bytes(data[:4096])  # truncated at a member boundary: too few samples
    with pytest.raises(ShardReadError, match="gaussian-test-000001.tar.*the manifest says"):
        eval_keys(tmp_path, 1, 0)
    with pytest.raises(ShardReadError, match="gaussian-test-000001.tar"):
        eval_keys(tmp_path, 1, 2)  # also through DataLoader workers
    # a corrupt PNG inside an intact tar
    bad = bytearray(data)
    i = bad.index(b"IDAT")
    bad[i + 8:i + 40] = b"\0" * 32
    shard.write_bytes(bytes(bad))
    with pytest.raises(ShardReadError, match="gaussian-test-000001.tar"):
        eval_keys(tmp_path, 1, 0)
    with pytest.raises(ShardReadError, match="gaussian-test-000001.tar"):
        train_batches(tmp_path, world_size=1, n=10, shuffle_buffer=1)


def test_manifest_helpers(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "celeba" / "test" / "manifest.json")):
        read_manifest(tmp_path, "celeba", "test")
    man = build_small_shards(tmp_path, n=5, samples_per_shard=5)
    h = manifest_hash(read_manifest(tmp_path, "gaussian", "test"))
    assert h == manifest_hash(man) and len(h) == 16 and int(h, 16) >= 0
    path = tmp_path / "gaussian" / "test" / "manifest.json"
    m = json.loads(path.read_text())
    m["complete"] = False
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="incomplete"):
        read_manifest(tmp_path, "gaussian", "test")
