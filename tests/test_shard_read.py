"""Bounded shard reads (glow.data.shard_read) and the evaluation/training fan-out over shards.

Each hostile file here is planted with a manifest that matches it (bytes and sha256), as
someone with write access to a shared shard root could do: the checks must not rest on the
sha256 alone.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import glow.data.manifest as M
import glow.data.streams as D
from glow.data import shards as S
from glow.data.shard_read import ImageSpec, member_cap
from glow.data.streams import (
    ShardReadError,
    fan_out_warning,
    load_images,
    make_eval_loader,
    make_train_loader,
    read_manifest,
)
from tests.helpers.fake_sources import build_small_shards
from tests.helpers.tars import Zeros, plant, tar_bytes


def read_all(root, dataset="gaussian", split="test", world_size=1):
    return [b for r in range(world_size) for b in make_eval_loader(root, dataset, split, batch_size=8, rank=r,
                                                                   world_size=world_size)]


@pytest.fixture
def shards(tmp_path):
    build_small_shards(tmp_path, n=40, samples_per_shard=20)
    return tmp_path


def test_gzip_bomb_refused_before_inflating(shards):
    size = 32 << 20  # 32 MB of zeros: ~32 KB compressed
    bomb = tar_bytes([("00000000.png", (size, Zeros())), ("00000000.json", b"{}")], mode="w:gz")
    assert len(bomb) < size // 100
    path = plant(shards, 1, bomb)
    tracemalloc.start()
    try:
        with pytest.raises(ShardReadError, match="gzip-compressed") as err:
            read_all(shards)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "rebuild" in str(err.value)
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB held while refusing a compressed shard"
    with pytest.raises(S.ShardError, match="gzip-compressed"):  # verify does not inflate it either
        S.verify(shards, "gaussian", "test")


def test_oversized_member_refused_before_reading(shards):
    cap = member_cap(ImageSpec(32, 3))
    big = np.random.default_rng(0).integers(0, 256, 4 * cap, dtype=np.uint8).tobytes()
    path = plant(shards, 0, tar_bytes([("00000000.png", big), ("00000000.json", b"{}")]))
    plant(shards, 1, tar_bytes([("00000020.png", big), ("00000020.json", b"{}")]))
    with pytest.raises(ShardReadError, match=f"00000000.png declares {len(big)} bytes, more than the {cap}") as err:
        read_all(shards)
    assert str(path) in str(err.value)
    with pytest.raises(ShardReadError, match="declares"):
        list(make_train_loader(shards, "gaussian", "test", batch_size=4, seed=0, epoch=0, rank=0, world_size=1,
                               batches_per_epoch=3, shuffle_buffer=1))


def test_png_declaring_a_huge_size_is_not_decoded(shards):
    d = shards / "gaussian" / "test"
    with tarfile.open(d / "gaussian-test-000000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # 25 MB of pixels in ~25 KB
    assert len(buf.getvalue()) < member_cap(ImageSpec(32, 3))
    members[0] = (members[0][0], buf.getvalue())
    path = plant(shards, 0, tar_bytes(members))
    with pytest.raises(ShardReadError, match="is 5000x5000 L, its manifest says 32x32 RGB: not decoded") as err:
        read_all(shards)
    assert str(path) in str(err.value)
    with pytest.raises(ShardReadError, match="not decoded"):
        load_images(shards, "gaussian", "test", ["0"])


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "gaussian-train-000000.tar",
                                  "gaussian-test-000000.tar/../../x.tar", "gaussian-test-1.tar"])
def test_hostile_shard_names_refused(shards, name):
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    man = json.loads(mpath.read_text())
    man["shards"][1]["name"] = name
    mpath.write_text(json.dumps(man))
    for read in (lambda: read_manifest(shards, "gaussian", "test"), lambda: read_all(shards),
                 lambda: load_images(shards, "gaussian", "test", ["1"])):
        with pytest.raises(S.ShardError, match="does not match the naming scheme") as err:
            read()
        assert repr(name) in str(err.value) and str(mpath) in str(err.value)
    with pytest.raises(S.ShardError, match="naming scheme"):
        S.verify(shards, "gaussian", "test")


def test_oversized_manifest_refused_unread(shards, monkeypatch):
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    monkeypatch.setattr(M, "MAX_MANIFEST_BYTES", mpath.stat().st_size - 1)
    with pytest.raises(S.ShardError, match=f"manifest {mpath} is .* bytes, more than"):
        read_manifest(shards, "gaussian", "test")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_evaluation_reads_each_shard_once(tmp_path, monkeypatch, world_size):
    build_small_shards(tmp_path, n=50, samples_per_shard=20)  # 3 shards
    opened = Counter()
    real = D.iter_shard

    def counting(url, *a, **kw):
        opened[Path(url).name] += 1
        return real(url, *a, **kw)

    monkeypatch.setattr(D, "iter_shard", counting)
    keys = [k for b in read_all(tmp_path, world_size=world_size) for k in b["key"]]
    assert sorted(keys) == ["%08d" % i for i in range(50)]
    assert sorted(opened.values()) == [1, 1, 1], opened  # once in total, whatever the world size


@pytest.mark.parametrize("n_shards", [1, 3, 8, 20])
def test_eval_readers_capped_by_shards_and_spread_over_ranks(n_shards):
    shards = [D._Shard(f"s{i}", 0, 1) for i in range(n_shards)]
    for world_size, workers in [(1, 1), (2, 2), (4, 2), (8, 4)]:
        got = {(r, w): D.EvalStream(shards, batch_size=1, rank=r, world_size=world_size, spec=ImageSpec(32),
                                    channels=3).my_shards(w, workers)
               for r in range(world_size) for w in range(workers)}
        flat = [s for v in got.values() for s in v]
        assert sorted(flat) == sorted(shards)  # every shard to exactly one reader
        busy_ranks = {r for (r, _), v in got.items() if v}
        assert len(busy_ranks) == min(world_size, n_shards)


def test_fan_out_warning_names_the_rebuild(tmp_path):
    build_small_shards(tmp_path, n=50, samples_per_shard=20)  # 3 shards
    assert fan_out_warning(tmp_path, "gaussian", "test", world_size=3, num_workers=0) is None
    assert fan_out_warning(tmp_path, "gaussian", "test", world_size=1, num_workers=3) is None
    msg = fan_out_warning(tmp_path, "gaussian", "test", world_size=2, num_workers=4)
    assert "8 training readers (2 ranks x 4 loader workers)" in msg and "3 shard(s)" in msg
    assert f"python shards/build.py gaussian ... --out {tmp_path} --samples-per-shard 6 --overwrite" in msg


def test_default_shard_size_feeds_256_readers_on_celeba32():
    assert math.ceil(162_770 / S.DEFAULT_SAMPLES_PER_SHARD) >= 256
