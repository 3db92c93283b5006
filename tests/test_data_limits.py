"""Limits by constants, not by what a file declares: each hostile shard, manifest or lock a group
member could plant in a shard root is refused in one line naming it, with memory below a stated
bound (tracemalloc). Source files: ``tests/test_source_limits.py``.

Shards are planted with a manifest that matches them (bytes and sha256), as someone with write
access to a shared shard root could do (``tests/helpers/tars.py``'s ``plant``)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from glow.data import manifest as M
from glow.data import shards as S
from glow.data.shard_read import MAX_SHARD_BYTES
from glow.data.streams import (
    load_images,
    make_eval_loader,
    make_train_loader,
    read_manifest,
)
from glow.errors import EXIT_DATA
from tests.helpers.fake_sources import build_small_shards, make_fake_svhn
from tests.helpers.repo import REPO
from tests.helpers.tars import SMALL, one_line, plant, tar_bytes, traced_peak


@pytest.fixture
def shards(tmp_path):
    build_small_shards(tmp_path / "shards", n=40, samples_per_shard=20)
    return tmp_path / "shards"




@contextlib.contextmanager
def hang_guard(seconds: int = 60):
    """Turn a hang (a read blocked on a FIFO, a stream resampling empty shards forever) into a
    failure instead of a stuck test run. Not a timing assertion: every read here ends at once."""
    def stop(*_):
        raise TimeoutError(f"still running after {seconds} s: hung")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_eval(root):
    return [b for b in make_eval_loader(root, "gaussian", "test", batch_size=8, rank=0, world_size=1)]


def read_train(root, n=3):
    """Training batches of rank 1 of 2: its reader draws shard 1 alone (the one planted)."""
    return list(make_train_loader(root, "gaussian", "test", batch_size=4, seed=0, epoch=0, rank=1, world_size=2,
                                  batches_per_epoch=n, shuffle_buffer=1))


def readers(root):
    return {"eval": lambda: read_eval(root), "train": lambda: read_train(root),
            "verify": lambda: S.verify(root, "gaussian", "test"),
            "load_images": lambda: load_images(root, "gaussian", "test", ["25"])}




def set_entry(root: Path, index: int, path: Path, count: int | None = None) -> None:
    """Make shard ``index``'s manifest entry match the (possibly sparse) file at ``path``."""
    mpath = root / "gaussian" / "test" / S.MANIFEST
    man = json.loads(mpath.read_text())
    entry = man["shards"][index]
    entry["bytes"] = path.stat().st_size
    if count is not None:
        man["count"] += count - entry["count"]
        entry["count"] = count
    mpath.write_text(json.dumps(man))


# --------------------------------------------------------------------------- tar headers
def header(kind: bytes, size: int) -> bytes:
    """One tar header block of type ``kind`` declaring ``size`` bytes of payload."""
    info = tarfile.TarInfo("././@LongLink" if kind in (b"L", b"K") else "./PaxHeaders/00000000.png")
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT if kind in (b"L", b"K") else tarfile.USTAR_FORMAT)


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_extended_header_declaring_400mb_refused_before_read(shards, kind):
    """A 4 KB tar whose first header declares 400 MB of extended header: tarfile would read
    all of it (767 MB measured before the fix); the header walk refuses it unread."""
    data = header(kind, 400 << 20).ljust(4096, b"\0")
    path = plant(shards, 1, data)
    for name, read in readers(shards).items():
        exn, peak = traced_peak(read)
        assert isinstance(exn, S.ShardError), (name, exn)
        msg = one_line(exn, path)
        assert f"tar type {kind.decode()!r}" in msg and "extended headers" in msg
        assert peak < SMALL, f"{name}: {peak / 2**20:.0f} MB held while refusing"


def test_sparse_400mb_pax_shard_refused_in_train_mode(shards):
    """The same header on a 400 MB sparse file (the manifest declaring 400 MB): refused by the
    shard's size cap in every mode, training included (it had none)."""
    path = shards / "gaussian" / "test" / "gaussian-test-000001.tar"
    with open(path, "wb") as f:
        f.write(header(b"x", 400 << 20))
        f.truncate(400 << 20)
    set_entry(shards, 1, path)
    for name in ("train", "eval", "load_images"):
        exn, peak = traced_peak(readers(shards)[name])
        assert isinstance(exn, S.ShardError) and "such a shard can take" in one_line(exn, path), (name, exn)
        assert peak < SMALL, f"{name}: {peak / 2**20:.0f} MB"


def test_shard_over_the_constant_cap_refused_unread(shards):
    """A manifest can declare any count (and so any size); MAX_SHARD_BYTES bounds every reader
    and verify, which refuses before hashing."""
    path = shards / "gaussian" / "test" / "gaussian-test-000001.tar"
    with open(path, "wb") as f:
        f.write(header(b"x", 400 << 20))
        f.truncate(MAX_SHARD_BYTES + 512)
    set_entry(shards, 1, path, count=10_000_000)
    for name, read in readers(shards).items():
        exn, peak = traced_peak(read)
        assert isinstance(exn, S.ShardError), (name, exn)
        assert str(MAX_SHARD_BYTES) in one_line(exn, path) and peak < SMALL, (name, peak)


@pytest.mark.parametrize("kind,name", [(tarfile.SYMTYPE, "00000020.png"), (tarfile.LNKTYPE, "00000020.png"),
                                       (tarfile.DIRTYPE, "00000020"), (tarfile.FIFOTYPE, "00000020.png"),
                                       (tarfile.CHRTYPE, "00000020.png"), (tarfile.CONTTYPE, "00000020.png"),
                                       (tarfile.GNUTYPE_SPARSE, "00000020.png")])
def test_non_regular_members_refused(shards, kind, name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        tar.addfile(info)
        json_info = tarfile.TarInfo("00000020.json")
        json_info.size = 2
        tar.addfile(json_info, io.BytesIO(b"{}"))
    path = plant(shards, 1, buf.getvalue())
    for reader, read in readers(shards).items():
        with pytest.raises(S.ShardError, match="unexpected member") as err:
            read()
        one_line(err.value, path, name)


# --------------------------------------------------------------------------- shard files
def test_fifo_symlink_and_device_shards_refused_without_blocking(shards, tmp_path):
    d = shards / "gaussian" / "test"
    path = d / "gaussian-test-000001.tar"
    secret = tmp_path / "secret.tar"
    secret.write_bytes(path.read_bytes())  # a file the manifest would accept, outside the split
    plants = {"symbolic link": lambda: path.symlink_to(secret), "not a regular file": lambda: os.mkfifo(path)}
    if os.geteuid() == 0:  # /dev/zero's numbers: a device node as a shard
        plants["device"] = lambda: os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    for what, make in plants.items():
        path.unlink()
        make()
        for name, read in readers(shards).items():
            with hang_guard():
                exn, peak = traced_peak(read)
            assert isinstance(exn, S.ShardError), (what, name, exn)
            msg = one_line(exn, path)
            assert ("symbolic link" if what == "symbolic link" else "not a regular file") in msg, (what, msg)
            assert peak < SMALL
        with hang_guard():  # a rerun of the build neither follows nor reads it: the shard is rebuilt in its place
            assert S.build(_gaussian_source(), shards, samples_per_shard=20, progress=False)["count"] == 40
        assert stat.S_ISREG(path.lstat().st_mode) and S.verify(shards, "gaussian", "test")["count"] == 40
    assert secret.read_bytes() == path.read_bytes()  # untouched


def _gaussian_source():
    from glow.data.sources.gaussian_field import gaussian_sources

    return [s for s in gaussian_sources("gaussian", n_train=40, n_test=40, seed=0) if s.split == "test"][0]


def test_shard_without_samples_is_an_error_not_a_loop(shards):
    empty = tar_bytes([])  # end-of-archive blocks only
    path = plant(shards, 1, empty)
    for name in ("train", "eval", "verify"):
        with hang_guard():
            exn, _ = traced_peak(readers(shards)[name])
        assert isinstance(exn, S.ShardError) and "holds 0 samples but its manifest says 20" in one_line(exn, path)
    # every shard declared empty: the split itself holds nothing
    plant(shards, 0, empty)
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    man = json.loads(mpath.read_text())
    for e in man["shards"]:
        e["count"] = 0
    man["count"] = 0
    mpath.write_text(json.dumps(man))
    with hang_guard(), pytest.raises(S.ShardError, match="holds 0 samples; a split holds at least one") as err:
        read_train(shards)
    one_line(err.value, mpath)
    man["count"] = 40  # the total left as it was: training still finds no shard to draw from
    mpath.write_text(json.dumps(man))
    with hang_guard(), pytest.raises(S.ShardError, match="no shard holds a sample") as err:
        read_train(shards)
    one_line(err.value, mpath)


def test_shard_declared_empty_is_left_out_of_training(shards):
    """A shard whose every item was skipped at build time holds nothing: training draws from
    the others (it would otherwise yield nothing from it), evaluation reads it as empty."""
    path = plant(shards, 1, tar_bytes([]))
    set_entry(shards, 1, path, count=0)
    with hang_guard():
        batches = read_train(shards, n=8)
        keys = [k for b in read_eval(shards) for k in b["key"]]
    assert len(batches) == 8 and sorted(keys) == ["%08d" % i for i in range(20)]


# --------------------------------------------------------------------------- manifests
def test_82mb_manifest_refused_unread(shards):
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    with open(mpath, "r+b") as f:
        f.truncate(82 << 20)  # 82 MB took verify to 880 MB before the cap
    build = lambda: S.build(_gaussian_source(), shards, samples_per_shard=20, progress=False)  # noqa: E731
    for name, read in {**readers(shards), "build": build}.items():
        exn, peak = traced_peak(read)
        assert isinstance(exn, S.ShardError), (name, exn)
        assert f"more than the {M.MAX_MANIFEST_BYTES}" in one_line(exn, mpath) and peak < 1 << 20, (name, peak)


@pytest.mark.parametrize("item", [b"{},", b'"ab",'])
def test_manifest_within_the_cap_parses_in_bounded_memory(shards, item):
    """The worst a file under MAX_MANIFEST_BYTES can do: many empty objects (refused by the
    container cap before parsing) or many short strings (~110 MB to parse, then refused)."""
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    n = (M.MAX_MANIFEST_BYTES - 16) // len(item)
    mpath.write_bytes(b'{"shards": [' + item * n + b"0]}")
    exn, peak = traced_peak(lambda: read_manifest(shards, "gaussian", "test"))
    assert isinstance(exn, S.ShardError)
    one_line(exn, mpath)
    assert peak < 128 << 20, f"{peak / 2**20:.0f} MB to refuse a {M.MAX_MANIFEST_BYTES}-byte manifest"


def test_manifest_symlink_and_fifo_refused(shards, tmp_path):
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    real = tmp_path / "elsewhere.json"
    real.write_bytes(mpath.read_bytes())
    for what, make in {"symbolic link": lambda: mpath.symlink_to(real),
                       "not a regular file": lambda: os.mkfifo(mpath)}.items():
        mpath.unlink()
        make()
        with hang_guard(), pytest.raises(S.ShardError, match=what) as err:
            read_manifest(shards, "gaussian", "test")
        one_line(err.value, mpath)


@pytest.mark.parametrize("field,value,match", [
    ("count", -1, "non-negative integers"), ("bytes", "30720", "non-negative integers"),
    ("shard", 7, "under shard number 7"), ("sha256", "../x", "sha256"),
])
def test_manifest_entries_checked(shards, field, value, match):
    mpath = shards / "gaussian" / "test" / S.MANIFEST
    man = json.loads(mpath.read_text())
    man["shards"][1][field] = value
    mpath.write_text(json.dumps(man))
    with pytest.raises(S.ShardError, match=match) as err:
        read_manifest(shards, "gaussian", "test")
    one_line(err.value, mpath)


def test_build_lock_symlink_leaves_the_target_untouched(tmp_path):
    """BUILD.lock planted as a symlink to a file standing for the builder's ~/.profile: the
    build refuses (exit 4), the target keeps its content and mode."""
    profile = tmp_path / "home" / ".profile"
    profile.parent.mkdir()
    profile.write_text("export PATH=$HOME/bin:$PATH\n")
    profile.chmod(0o644)
    src = make_fake_svhn(tmp_path / "svhn", n_train=3, n_test=3)
    out = tmp_path / "shards"
    split = out / "svhn" / "test"
    split.mkdir(parents=True)
    (split / S.LOCK).symlink_to(profile)
    res = subprocess.run([sys.executable, "shards/build.py", "svhn", "--root", str(src), "--split", "test",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == EXIT_DATA, res.stderr
    assert "Traceback" not in res.stderr and str(split / S.LOCK) in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "symbolic link" in res.stderr
    assert profile.read_text() == "export PATH=$HOME/bin:$PATH\n"
    assert stat.S_IMODE(profile.stat().st_mode) == 0o644
