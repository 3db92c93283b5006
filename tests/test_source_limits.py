"""Limits by constants in the source readers (CIFAR pickles, MNIST IDX files, CelebA's partition,
image folders, image decoding): each hostile source file is refused in one line naming it, with
memory below a stated bound (tracemalloc in this process, or the peak RSS of a child process)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from glow.data.sources.cifar import cifar_sources
from glow.data.sources.images import MAX_SOURCE_PIXELS, SourceError
from glow.data.sources.mnist import MAX_IDX_BYTES, read_idx
from glow.data.streams import read_manifest
from glow.errors import EXIT_DATA
from tests.helpers.fake_sources import make_fake_cifar, make_fake_folder, make_fake_idx
from tests.helpers.repo import REPO
from tests.helpers.tars import SMALL, one_line, traced_peak


class _ArrayPickle:
    """Pickles as numpy's ``_reconstruct(ndarray, shape, dtype)``, followed by the array state
    ``(1, state_shape, uint8, False, data)`` when ``data`` is given (what numpy itself writes)."""

    def __init__(self, shape, state_shape=None, data=None):
        self.shape, self.state_shape, self.data = shape, state_shape, data

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.empty(0, np.uint8))[0]
        if self.data is None:
            return reconstruct, (np.ndarray, self.shape, b"B")
        return reconstruct, (np.ndarray, self.shape, b"B"), (1, self.state_shape, np.dtype(np.uint8), False, self.data)


@pytest.mark.parametrize("shape", [(2_680_000_000,), (3, 3072)])
def test_cifar_array_without_its_bytes_refused(tmp_path, shape):
    """A 180-byte batch declaring 2.68 GB (allocated before the fix), and a small one whose
    uninitialised memory went into the shards: arrays come only from bytes the file holds."""
    src = make_fake_cifar(tmp_path / "src", per_batch=2, n_test=3)
    path = src / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _ArrayPickle(shape), b"labels": [0, 1, 2]}, protocol=2))
    assert path.stat().st_size < 200
    exn, peak = traced_peak(lambda: cifar_sources("cifar10", src, splits=["test"]))
    assert isinstance(exn, SourceError) and "without its data" in one_line(exn, path)
    assert peak < SMALL, f"{peak / 2**20:.0f} MB"


def test_cifar_array_bytes_must_fill_its_shape(tmp_path):
    src = make_fake_cifar(tmp_path / "src", per_batch=2, n_test=3)
    path = src / "cifar-10-batches-py" / "test_batch"
    good = pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}, protocol=2)
    for shape in ((30, 3072), (1, 3072)):  # the state declares 30 (or 1) images, the bytes hold 3
        path.write_bytes(pickle.dumps({b"data": _ArrayPickle((0,), shape, bytes(3 * 3072)), b"labels": [0, 1, 2]},
                                      protocol=2))
        with pytest.raises(SourceError, match=rf"shape \({shape[0]}, 3072\) x uint8 holds 9216 bytes, not "
                                              rf"{shape[0] * 3072}") as err:
            cifar_sources("cifar10", src, splits=["test"])
        one_line(err.value, path)
    path.write_bytes(good.replace(b"latin1", b"utf_32", 1))
    with pytest.raises(SourceError, match="'utf_32' is not allowed"):
        cifar_sources("cifar10", src, splits=["test"])
    path.write_bytes(good)  # the real thing still loads, protocol 2 and 5 alike
    assert cifar_sources("cifar10", src, splits=["test"])[0].n == 3
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": np.arange(3)}, protocol=5))
    assert cifar_sources("cifar10", src, splits=["test"])[0].n == 3


def test_idx_dimensions_overflowing_int64_refused_unread(tmp_path):
    """Dimensions whose product wraps int64 to -2 made the reader read(-1): a small .gz then
    inflated in full. math.prod and the constant cap refuse it before reading."""
    src = make_fake_idx(tmp_path / "src", n_train=2, n_test=2)
    path = src / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    (src / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
    dims = (306_184_046, 92_737, 649_657)  # product 2**64 - 2: int64 -2
    assert int(np.prod(np.array(dims, np.int64))) == -2
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = [z.compress((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims))]
    body += [z.compress(bytes(1 << 20)) for _ in range(32)]  # 32 MiB of zeros in ~32 KB
    path.write_bytes(b"".join(body) + z.flush())
    assert path.stat().st_size < 100_000
    exn, peak = traced_peak(lambda: read_idx(path, 2051))
    assert isinstance(exn, SourceError) and f"more than the {MAX_IDX_BYTES}" in one_line(exn, path)
    assert peak < SMALL, f"{peak / 2**20:.0f} MB"
    path.write_bytes(gzip.compress((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big")
                                                                        for d in (1 << 21, 32, 32))))
    with pytest.raises(SourceError, match=f"declare {1 << 31} bytes, more than"):
        read_idx(path, 2051)


@pytest.mark.parametrize("name", ["../../secret/x.png", "/etc/hostname", "000001.jpg/../../../secret/x.png",
                                  "1.jpg", "000001.png"])
def test_celeba_partition_names_must_be_celeba_files(tmp_path, name):
    from glow.data.sources.celeba import celeba_sources
    from tests.helpers.fake_sources import make_fake_celeba

    root = make_fake_celeba(tmp_path / "src", n_train=2, n_valid=1, n_test=1)
    part = root / "list_eval_partition.txt"
    part.write_text(part.read_text() + f"{name} 2\n")
    with pytest.raises(SourceError, match="is not a CelebA image name") as err:
        celeba_sources(root)
    assert f"{part}:5:" in one_line(err.value, part)


def test_folder_source_stays_inside_its_folder(tmp_path):
    from glow.data.sources.folder import folder_sources

    root = make_fake_folder(tmp_path / "imgs", n=6)
    secret = tmp_path / "secret" / "id.png"
    secret.parent.mkdir()
    secret.write_bytes((root / "sub1" / "deep" / "img001.png").read_bytes())
    link = root / "sub0" / "leak.png"
    link.symlink_to(secret)
    with pytest.raises(SourceError, match="outside the image folder") as err:
        folder_sources(root)
    one_line(err.value, link)
    link.unlink()
    (root / "sub0" / "inside.png").symlink_to(root / "sub1" / "deep" / "img001.png")  # a link inside is fine
    (root / "outdir").symlink_to(secret.parent, target_is_directory=True)  # a linked folder is not entered
    sources = folder_sources(root)
    assert sum(s.n for s in sources) == 7


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid grayscale PNG of width x height black pixels, compressed row by row (~1 KB a
    million pixels), without ever holding the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# The build command's own peak RSS (interpreter, numpy, Pillow, click) is ~45 MB here (measured);
# decoding the 13000 x 13000 image alone would take 169 MB (845 MB with the RGB conversions).
BUILD_RSS_BOUND = 160 << 20


def peak_rss_of(args: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``args`` in a child of a fresh child, so that RUSAGE_CHILDREN holds its peak alone (bytes)."""
    probe = ("import resource, subprocess, sys, json\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "print(json.dumps([r.returncode, r.stdout, r.stderr,"
             " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    res = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    code, out, err, rss_kib = json.loads(res.stdout)
    return subprocess.CompletedProcess(args, code, out, err), rss_kib * 1024


def test_decompression_bomb_in_an_image_folder_refused(tmp_path):
    root = make_fake_folder(tmp_path / "imgs", n=4)
    bomb = root / "sub0" / "bomb.png"
    _png_declaring(bomb, 13000, 13000)  # 169 million pixels
    assert bomb.stat().st_size < 400_000 and 13000 * 13000 > MAX_SOURCE_PIXELS
    res, rss = peak_rss_of([sys.executable, "shards/build.py", "folder", "--root", str(root), "--out",
                            str(tmp_path / "out"), "--split-fraction", "test=1.0"])
    assert res.returncode == EXIT_DATA, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bomb) in last and "Traceback" not in res.stderr
    assert rss < BUILD_RSS_BOUND, f"peak RSS {rss / 2**20:.0f} MB"
    # a bomb under Pillow's own limit (89 M pixels) but over ours, skipped with --skip-bad and named
    _png_declaring(bomb, 8000, 8000)
    res = subprocess.run([sys.executable, "shards/build.py", "folder", "--root", str(root), "--out",
                          str(tmp_path / "out"), "--split-fraction", "test=1.0", "--skip-bad"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    man = read_manifest(tmp_path / "out", "imgs", "test")
    assert man["count"] == 4 and [s["source"] for s in man["skipped"]] == [str(bomb)]
    assert f"more than the {MAX_SOURCE_PIXELS}" in man["skipped"][0]["error"]

