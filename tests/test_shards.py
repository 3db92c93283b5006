"""Shard building: sources, presets, manifests, resume, refusal, bad inputs, synthetic data."""
from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from glow.data import shards as S
from glow.data.sources.celeba import celeba_sources
from glow.data.sources.images import SourceError, center_crop, resize_short
from glow.data.sources.svhn import svhn_sources
from glow.data.streams import manifest_hash, read_manifest
from glow.errors import EXIT_DATA
from tests.helpers.fake_sources import (
    CELEBA_LAYOUTS,
    make_fake_celeba,
    make_fake_folder,
    make_fake_svhn,
    svhn_expected_labels,
)
from tests.helpers.repo import REPO, load_script

cli = load_script("shards/build.py").cli


def read_shards(d: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """All samples of a split dir: key -> (image, json)."""
    out: dict = {}
    for tar_path in sorted(d.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                data = tar.extractfile(m).read()
                img, meta = out.get(key, (None, None))
                if ext == "png":
                    img = np.asarray(Image.open(io.BytesIO(data)))
                else:
                    meta = json.loads(data)
                out[key] = (img, meta)
    return out


def run_cli(*args: str, ok: bool = True):
    res = CliRunner().invoke(cli, list(args))
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


@pytest.fixture(scope="module")
def fake_celeba(tmp_path_factory):
    return make_fake_celeba(tmp_path_factory.mktemp("celeba_src"), n_train=20, n_valid=6, n_test=8)


@pytest.fixture(scope="module")
def fake_svhn(tmp_path_factory):
    return make_fake_svhn(tmp_path_factory.mktemp("svhn_src"), n_train=30, n_test=12, extra=5)


# --------------------------------------------------------------------------- CelebA
@pytest.mark.parametrize("preset,res", [("kirichenko32", 32), ("glow64", 64)])
def test_celeba_presets(fake_celeba, tmp_path, preset, res):
    out = tmp_path / "out"
    run_cli("celeba", "--root", str(fake_celeba), "--preset", preset, "--out", str(out), "--samples-per-shard", "8")
    for split, n in (("train", 20), ("valid", 6), ("test", 8)):
        d = out / "celeba" / split
        man = read_manifest(out, "celeba", split)
        assert man["count"] == n and man["complete"] and man["resolution"] == res
        assert man["preprocessing"]["preset"] == preset
        assert "bilinear" in man["preprocessing"]["interpolation"]
        assert [s["count"] for s in man["shards"]] == [min(8, n - i) for i in range(0, n, 8)]
        for s in man["shards"]:
            assert S.sha256_file(d / s["name"]) == s["sha256"]
        samples = read_shards(d)
        assert len(samples) == n
        for key, (img, meta) in samples.items():
            assert img.shape == (res, res, 3) and img.dtype == np.uint8
            assert meta["dataset"] == "celeba" and meta["split"] == split and meta["label"] is None
            assert key == "%08d" % meta["index"] and meta["source"].endswith(".jpg")
        assert S.verify(out, "celeba", split)["count"] == n
    # the same build elsewhere gives the same manifest (and hash); the other preset differs
    out2 = tmp_path / "out2"
    run_cli("celeba", "--root", str(fake_celeba), "--preset", preset, "--out", str(out2), "--samples-per-shard", "8")
    m1, m2 = read_manifest(out, "celeba", "test"), read_manifest(out2, "celeba", "test")
    assert m1 == m2 and manifest_hash(m1) == manifest_hash(m2) and len(manifest_hash(m1)) == 16


def test_celeba_presets_differ_and_resolution_override(fake_celeba, tmp_path):
    a = celeba_sources(fake_celeba, "kirichenko32", splits=["test"])[0]
    b = celeba_sources(fake_celeba, "glow64", splits=["test"])[0]
    c = celeba_sources(fake_celeba, "glow64", resolution=48, splits=["test"])[0]
    ma = S.build(a, tmp_path / "a", progress=False)
    mb = S.build(b, tmp_path / "b", progress=False)
    mc = S.build(c, tmp_path / "c", progress=False)
    assert len({ma["fingerprint"], mb["fingerprint"], mc["fingerprint"]}) == 3
    assert mc["resolution"] == 48
    assert next(iter(read_shards(tmp_path / "c" / "celeba" / "test").values()))[0].shape == (48, 48, 3)


@pytest.mark.parametrize("preset", ["kirichenko32", "glow64"])
def test_celeba_transform_matches_torchvision(fake_celeba, preset):
    from torchvision import transforms as T

    img = Image.open(fake_celeba / "img_align_celeba" / "000001.jpg").convert("RGB")
    if preset == "kirichenko32":
        ref = T.Compose([T.Resize(32), T.CenterCrop(32)])(img)
        ours = center_crop(resize_short(img, 32), 32)
    else:
        ref = T.Compose([T.CenterCrop(148), T.Resize(64)])(img)
        ours = resize_short(center_crop(img, 148), 64)
    assert np.array_equal(np.asarray(ref), np.asarray(ours))
    src = celeba_sources(fake_celeba, preset, splits=["train"])[0]
    _, arr, meta = src.process(src.payloads(0, 1)[0])
    assert np.array_equal(arr, np.asarray(ref)) and meta["source"] == "000001.jpg"


def test_celeba_layouts_build_identical_shards(tmp_path):
    """CelebA as downloaded (official release, also with the zip extracted one level deeper),
    as torchvision lays it out, and flat: the same files build byte-identical shards."""
    sha = {}
    for layout in CELEBA_LAYOUTS:
        root = make_fake_celeba(tmp_path / layout, n_train=3, n_valid=1, n_test=2, layout=layout)
        run_cli("celeba", "--root", str(root), "--out", str(tmp_path / "out" / layout), "--samples-per-shard", "2")
        sha[layout] = {split: [s["sha256"] for s in read_manifest(tmp_path / "out" / layout, "celeba", split)["shards"]]
                       for split in ("train", "valid", "test")}
        images = read_manifest(tmp_path / "out" / layout, "celeba", "test")["source"]["images"]
        assert images == str((root / CELEBA_LAYOUTS[layout][0]).resolve())
    assert len(sha["flat"]["train"]) == 2
    assert all(s == sha["flat"] for s in sha.values()), sha


def test_celeba_missing_files_list_every_place_looked(tmp_path):
    res = run_cli("celeba", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA
    for images, _ in CELEBA_LAYOUTS.values():
        assert str(tmp_path / "empty" / images.removesuffix("/img_align_celeba/img_align_celeba")) in res.output
    root = make_fake_celeba(tmp_path / "src", n_train=1, n_valid=1, n_test=1, layout="official")
    (root / "Eval" / "list_eval_partition.txt").unlink()
    res = run_cli("celeba", "--root", str(root), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and "partition file missing" in res.output
    for _, partition in CELEBA_LAYOUTS.values():
        assert str(root / partition) in res.output
    assert f"the images are at {root / 'Img' / 'img_align_celeba'}" in res.output


# --------------------------------------------------------------------------- SVHN
def test_svhn_counts_labels_lossless(fake_svhn, tmp_path):
    from scipy.io import loadmat

    out = tmp_path / "out"
    run_cli("svhn", "--root", str(fake_svhn), "--out", str(out), "--samples-per-shard", "7")
    x = loadmat(str(fake_svhn / "train_32x32.mat"))["X"]
    for split, n in (("train", 30), ("test", 12), ("extra", 5)):
        man = read_manifest(out, "svhn", split)
        assert man["count"] == n and man["resolution"] == 32 and man["preprocessing"]["interpolation"] is None
        samples = read_shards(out / "svhn" / split)
        labels = [samples["%08d" % i][1]["label"] for i in range(n)]
        assert labels == svhn_expected_labels(n).tolist() and 10 not in labels
        assert n < 10 or 0 in labels
    img = read_shards(out / "svhn" / "train")["00000003"][0]
    assert np.array_equal(img, x[:, :, :, 3])  # lossless, HWC order


def test_svhn_resolution_64(fake_svhn, tmp_path):
    src = svhn_sources(fake_svhn, resolution=64, splits=["test"])[0]
    man = S.build(src, tmp_path, progress=False)
    assert man["resolution"] == 64 and "bilinear" in man["preprocessing"]["interpolation"]
    assert next(iter(read_shards(tmp_path / "svhn" / "test").values()))[0].shape == (64, 64, 3)


# --------------------------------------------------------------------------- folder
def test_folder_split_deterministic(tmp_path):
    src = make_fake_folder(tmp_path / "imgs", n=24)
    for out in ("o1", "o2"):
        run_cli("folder", "--root", str(src), "--name", "pics", "--split-fraction", "test=0.25",
                "--seed", "3", "--out", str(tmp_path / out), "--workers", "2" if out == "o2" else "0")
    n = {s: read_manifest(tmp_path / "o1", "pics", s)["count"] for s in ("train", "test")}
    assert n["train"] + n["test"] == 24 and n["test"] > 0
    for s in ("train", "test"):  # workers do not change the result
        assert read_manifest(tmp_path / "o1", "pics", s) == read_manifest(tmp_path / "o2", "pics", s)
    sources = {m["source"] for _, m in read_shards(tmp_path / "o1" / "pics" / "test").values()}
    assert all("/" in s for s in sources)  # recursive, relative paths recorded
    img = next(iter(read_shards(tmp_path / "o1" / "pics" / "train").values()))[0]
    assert img.shape == (32, 32, 3)
    run_cli("folder", "--root", str(src), "--name", "ood", "--split-fraction", "test=1.0", "--out", str(tmp_path / "o3"))
    assert read_manifest(tmp_path / "o3", "ood", "test")["count"] == 24 and not (tmp_path / "o3" / "ood" / "train").exists()


# --------------------------------------------------------------------------- resume / refusal
SLOW_BUILD = """
import functools, sys, time
from glow.data import shards as S
from glow.data.sources.celeba import celeba_sources
from tests.helpers.repo import REPO
def slow(process, payload):
    time.sleep(0.05)
    return process(payload)
for src in celeba_sources(sys.argv[1], splits=["train"]):
    src.process = functools.partial(slow, src.process)
    S.build(src, sys.argv[2], samples_per_shard=4, progress=False)
"""


def _listed_shards(d: Path) -> list:
    try:
        return json.loads((d / "manifest.json").read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _wait_for_shards(proc: subprocess.Popen, d: Path, n: int, too_soon: str) -> None:
    """Poll until the running build `proc` has listed `n` shards in `d`'s manifest."""
    deadline = time.monotonic() + 60
    while len(_listed_shards(d)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, too_soon
        time.sleep(0.005)


def test_killed_build_resumes_to_identical_manifest(fake_celeba, tmp_path):
    ref = celeba_sources(fake_celeba, splits=["train"])[0]
    S.build(ref, tmp_path / "ref", samples_per_shard=4, progress=False)
    out = tmp_path / "out"
    d = out / "celeba" / "train"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(fake_celeba), str(out)], cwd=REPO)
    try:
        _wait_for_shards(proc, d, 2, "build ended before it could be killed")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = json.loads((d / "manifest.json").read_text())
    assert not partial["complete"] and 2 <= len(partial["shards"]) < 5
    with pytest.raises(S.ShardError, match="incomplete"):
        read_manifest(out, "celeba", "train")
    kept_mtime = (d / "celeba-train-000000.tar").stat().st_mtime_ns
    man = S.build(celeba_sources(fake_celeba, splits=["train"])[0], out, samples_per_shard=4, progress=False)
    assert (d / "celeba-train-000000.tar").stat().st_mtime_ns == kept_mtime  # kept, not rewritten
    assert man == read_manifest(tmp_path / "ref", "celeba", "train")
    assert (d / "manifest.json").read_bytes() == (tmp_path / "ref" / "celeba" / "train" / "manifest.json").read_bytes()
    assert not list(d.glob("*.tmp"))


def test_concurrent_build_refused(fake_celeba, tmp_path):
    """Two builds on one output: the second refuses, naming the first; the first ends intact."""
    out = tmp_path / "out"
    d = out / "celeba" / "train"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(fake_celeba), str(out)], cwd=REPO)
    try:
        _wait_for_shards(proc, d, 1, "first build ended before the second started")
        with pytest.raises(S.BuildBusy, match=f"another shard build .*pid={proc.pid}"):
            S.build(celeba_sources(fake_celeba, splits=["train"])[0], out, samples_per_shard=4, progress=False)
        res = run_cli("celeba", "--root", str(fake_celeba), "--split", "train", "--out", str(out),
                      "--samples-per-shard", "4", ok=False)
        assert res.exit_code == EXIT_DATA and str(d) in res.output and "another shard build" in res.output
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proc.wait()
    assert S.verify(out, "celeba", "train")["count"] == 20
    assert not list(d.glob("*.tmp"))


def test_deleted_or_corrupt_shard_is_rebuilt(fake_svhn, tmp_path):
    src = svhn_sources(fake_svhn, splits=["train"])[0]
    ref = S.build(src, tmp_path, samples_per_shard=7, progress=False)
    d = tmp_path / "svhn" / "train"
    (d / "svhn-train-000001.tar").unlink()
    with open(d / "svhn-train-000002.tar", "r+b") as f:
        f.seek(700)
        f.write(b"garbage")
    (d / "svhn-train-000003.tar.tmp").write_bytes(b"half a shard")
    with pytest.raises(S.ShardError) as err:
        S.verify(tmp_path, "svhn", "train")
    assert "svhn-train-000001.tar: missing" in str(err.value) and "svhn-train-000002.tar: sha256" in str(err.value)
    built = []
    man = S.build(svhn_sources(fake_svhn, splits=["train"])[0], tmp_path, samples_per_shard=7,
                  progress=False, _after_shard=built.append)
    assert built == [1, 2] and man == ref and not (d / "svhn-train-000003.tar.tmp").exists()
    S.verify(tmp_path, "svhn", "train")


def test_other_settings_refused_unless_overwrite(fake_svhn, tmp_path):
    out = str(tmp_path)
    run_cli("svhn", "--root", str(fake_svhn), "--out", out, "--split", "test", "--samples-per-shard", "5")
    res = run_cli("svhn", "--root", str(fake_svhn), "--out", out, "--split", "test", "--samples-per-shard", "6", ok=False)
    assert res.exit_code == EXIT_DATA and "other settings" in res.output and "--overwrite" in res.output
    run_cli("svhn", "--root", str(fake_svhn), "--out", out, "--split", "test", "--samples-per-shard", "6", "--overwrite")
    man = read_manifest(tmp_path, "svhn", "test")
    assert man["samples_per_shard"] == 6 and len(list((tmp_path / "svhn" / "test").glob("*.tar"))) == 2


# --------------------------------------------------------------------------- bad input
def test_bad_image_named_or_skipped(tmp_path):
    root = make_fake_celeba(tmp_path / "src", n_train=6, n_valid=1, n_test=1)
    bad = root / "img_align_celeba" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:400])  # truncated JPEG
    res = run_cli("celeba", "--root", str(root), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and str(bad) in res.output and "--skip-bad" in res.output
    assert not list((tmp_path / "o" / "celeba" / "train").glob("*.tar"))  # no half-written shard under a final name
    run_cli("celeba", "--root", str(root), "--out", str(tmp_path / "o"), "--skip-bad", "--workers", "2")
    man = read_manifest(tmp_path / "o", "celeba", "train")
    assert man["count"] == 5 and [s["source"] for s in man["skipped"]] == [str(bad)]
    keys = set(read_shards(tmp_path / "o" / "celeba" / "train"))
    assert "00000002" not in keys and "00000005" in keys  # a gap, later items keep their keys


def test_bad_inputs_give_clear_errors(tmp_path):
    cel = make_fake_celeba(tmp_path / "cel", n_train=2, n_valid=1, n_test=1)
    (cel / "list_eval_partition.txt").unlink()
    res = run_cli("celeba", "--root", str(cel), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and "list_eval_partition.txt" in res.output and "partition file missing" in res.output
    res = run_cli("celeba", "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and "img_align_celeba" in res.output

    from scipy.io import savemat

    sv = tmp_path / "sv"
    sv.mkdir()
    savemat(str(sv / "test_32x32.mat"), {"images": np.zeros((2, 2))})
    res = run_cli("svhn", "--root", str(sv), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and "test_32x32.mat" in res.output and "'X'" in res.output and "'y'" in res.output
    (sv / "test_32x32.mat").unlink()
    res = run_cli("svhn", "--root", str(sv), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and "train_32x32.mat" in res.output

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    res = run_cli("folder", "--root", str(empty), "--out", str(tmp_path / "o"), ok=False)
    assert res.exit_code == EXIT_DATA and "no images under" in res.output and str(empty) in res.output

    res = run_cli("verify", "--out", str(tmp_path / "o"), "svhn/test", ok=False)
    assert res.exit_code == EXIT_DATA and "manifest" in res.output
    with pytest.raises(SourceError, match="unknown CelebA preset"):
        celeba_sources(cel, "glow128")


def test_help_has_examples():
    res = run_cli("--help")
    assert "python shards/build.py celeba --root" in res.output and "verify" in res.output


# --------------------------------------------------------------------------- synthetic
def test_gaussian_counts_and_log_density(tmp_path):
    n_train, n_test = 600, 300
    run_cli("gaussian", "--n-train", str(n_train), "--n-test", str(n_test), "--out", str(tmp_path),
            "--samples-per-shard", "250")
    counts = {(ds, s): read_manifest(tmp_path, ds, s)["count"]
              for ds, s in (("gaussian", "train"), ("gaussian", "test"), ("gaussian-smooth", "test"))}
    assert counts == {("gaussian", "train"): n_train, ("gaussian", "test"): n_test, ("gaussian-smooth", "test"): n_test}
    assert not (tmp_path / "gaussian-smooth" / "train").exists()
    dim = 32 * 32 * 3
    for ds in ("gaussian", "gaussian-smooth"):
        man = read_manifest(tmp_path, ds, "test")
        ex = man["extra"]
        assert ex["min_eigenvalue_bins2"] >= 9.0 and "Sigma + I/12" in ex["approximation"]
        samples = read_shards(tmp_path / ds / "test")
        lp = np.array([m["log_density_nats"] for _, m in samples.values()])
        # E[-log p] = entropy; per-sample sd of -log p is sqrt(D/2) nats (chi-square), so
        # 5 standard errors of the mean, plus the (negligible) approximation error, bound it.
        tol = 5 * math.sqrt(dim / 2) / math.sqrt(len(lp))
        assert abs(-lp.mean() - ex["analytic_entropy_nats"]) < tol
        assert man["stats"]["clipped_fraction"] < 1e-4
        assert man["stats"]["mean_log_density_nats"] == pytest.approx(lp.mean())
        # the stored uint8 image reproduces its recorded log-density
        from glow.data.sources.gaussian_field import GAUSSIAN_KINDS, GaussianField

        img, meta = samples["00000007"]
        field = GaussianField(GAUSSIAN_KINDS[ds])
        assert field.log_density(img[None].astype(np.float64))[0] == pytest.approx(meta["log_density_nats"])
    busy = read_manifest(tmp_path, "gaussian", "test")["extra"]["analytic_bits_per_dim"]
    smooth = read_manifest(tmp_path, "gaussian-smooth", "test")["extra"]["analytic_bits_per_dim"]
    assert busy == pytest.approx(4.792, abs=0.01) and smooth < busy - 0.5


def test_discrete_entropy_approximation_1d():
    from glow.data.sources.gaussian_field import discrete_entropy_1d

    for var in (9.0, 30.0):
        assert discrete_entropy_1d(var) == pytest.approx(0.5 * math.log(2 * math.pi * math.e * (var + 1 / 12)), abs=1e-8)


def test_demo_counts(tmp_path):
    run_cli("demo", "--n-train", "400", "--n-test", "60", "--out", str(tmp_path), "--samples-per-shard", "300")
    assert read_manifest(tmp_path, "demo", "train")["count"] == 400
    assert read_manifest(tmp_path, "demo", "test")["count"] == 60
    dig = read_manifest(tmp_path, "digits", "test")
    assert dig["count"] == 1797 and dig["preprocessing"]["grey_range"] == [64, 191]
    samples = read_shards(tmp_path / "digits" / "test")
    img, meta = samples["00000000"]
    assert img.shape == (32, 32, 3) and img.min() >= 64 and img.max() <= 191 and meta["label"] == 0
    assert np.array_equal(img[..., 0], img[..., 1])
    demo = read_shards(tmp_path / "demo" / "test")
    assert next(iter(demo.values()))[0].shape == (32, 32, 3)


def test_demo_default_counts_and_disjoint_cells():
    from glow.data.sources.demo import DEMO_PHOTOS, demo_crops

    crops = demo_crops()  # the defaults the CLI uses
    assert crops["train"].shape == (20000, 32, 32, 3) and crops["test"].shape == (2000, 32, 32, 3)
    assert len(DEMO_PHOTOS) == 9
    # every crop lies inside one 64-px cell, and no cell gives both train and test crops
    pos = demo_crops(3000, 600, with_positions=True)
    cells = {}
    for split in ("train", "test"):
        p = pos[split + "_pos"]
        assert np.all(p[:, 1] // 64 == (p[:, 1] + 31) // 64) and np.all(p[:, 2] // 64 == (p[:, 2] + 31) // 64)
        cells[split] = {(v, y // 64, x // 64) for v, y, x in p.tolist()}
        assert {v for v, _, _ in cells[split]} == set(range(2 * len(DEMO_PHOTOS)))  # every (photo, scale) used
    assert not cells["train"] & cells["test"]
    assert np.array_equal(pos["test"], demo_crops(3000, 600)["test"])  # deterministic
