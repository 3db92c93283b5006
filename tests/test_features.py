"""glow.features: extractors (weights checked, never unpickled), vector shards, and the extraction job
(deterministic, the same on 1 and 2 processes, resumable, refusing other settings)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from glow.errors import (
    EXIT_CHECKPOINT,
    EXIT_DATA,
    CheckpointMismatch,
    CheckpointMissing,
)
from glow.evaluation import fid
from glow.features.extract import DONE_SUFFIX, extract_features
from glow.features.extractors import EXTRACTORS, WeightsMismatch, load_extractor
from glow.features.vector_shards import (
    VectorShardError,
    encode_vector_shard,
    load_vectors,
    read_vector_manifest,
    read_vector_shard,
    record_dtype,
)
from glow.files import UnsafeFile
from tests.helpers.features import LINEAR, build_pictures, sha256
from tests.helpers.gloo import spawn_gloo
from tests.helpers.models import smooth_images

# --------------------------------------------------------------------------- a cheap extractor for the job's logic






@pytest.fixture
def linear_extractor(tmp_path, monkeypatch):
    monkeypatch.setitem(EXTRACTORS, LINEAR.name, LINEAR)
    torch.manual_seed(0)
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    return load_extractor(LINEAR.name, path, expected_sha256=sha256(path))


def counting(extractor, fail_after: int | None = None):
    """The extractor, counting the images it is given (and failing after ``fail_after`` calls)."""
    calls = {"images": 0, "calls": 0}

    def features(net, images, device):
        if fail_after is not None and calls["calls"] >= fail_after:
            raise RuntimeError("interrupted")
        calls["calls"] += 1
        calls["images"] += images.shape[0]
        return LINEAR.features(net, images, device)

    extractor.spec = dataclasses.replace(extractor.spec, features=features)
    return calls


# --------------------------------------------------------------------------- weights
def test_weights_with_another_sha256_or_code_are_refused(tmp_path, random_inception_home):
    weights = random_inception_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE
    with pytest.raises(WeightsMismatch) as err:  # random weights are not the published file
        load_extractor("inception", weights)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message and "expected 6726825d" in message
    assert err.value.exit_code == EXIT_CHECKPOINT
    with pytest.raises(WeightsMismatch, match="expected 00000000"):
        load_extractor("inception", weights, expected_sha256="00000000")

    class Payload:
        def __reduce__(self):  # unpickling would create the marker file
            return (open, (str(tmp_path / "ran"), "w"))

    planted = tmp_path / "planted.pth"
    torch.save({"w": Payload()}, planted)  # a real torch file with a code payload
    with pytest.raises(CheckpointMismatch, match="as plain tensors") as err:
        load_extractor("inception", planted, expected_sha256=sha256(planted))  # its sha is even the one asked for
    assert "\n" not in str(err.value) and err.value.exit_code == EXIT_CHECKPOINT
    assert not (tmp_path / "ran").exists()

    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    with pytest.raises(CheckpointMismatch, match="does not hold efficientnet_b4 weights"):
        load_extractor("efficientnet_b4", other, expected_sha256=sha256(other))
    with pytest.raises(CheckpointMissing, match="does not download"):
        load_extractor("efficientnet_b4", tmp_path / "absent.pth")
    link = tmp_path / "link.pth"
    link.symlink_to(weights)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        load_extractor("inception", link, expected_sha256=sha256(weights))
    with pytest.raises(ValueError, match="unknown extractor"):
        load_extractor("resnet", weights)


def test_efficientnet_b4_gives_its_pooled_1792_features(tmp_path):
    from torchvision.models import EfficientNet_B4_Weights, efficientnet_b4

    torch.manual_seed(0)
    net = efficientnet_b4(weights=None).eval()
    path = tmp_path / "b4.pth"
    torch.save(net.state_dict(), path)
    extractor = load_extractor("efficientnet_b4", path, expected_sha256=sha256(path)[:12])
    assert not extractor.official and extractor.weights_sha256 == sha256(path)
    images = torch.from_numpy(smooth_images(1, seed=3)).permute(0, 3, 1, 2).contiguous()
    feats = extractor(images)
    assert feats.shape == (1, 1792) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    net.classifier = torch.nn.Identity()  # torchvision's network without its head, on its own preprocessing
    with torch.inference_mode():
        expected = net(EfficientNet_B4_Weights.IMAGENET1K_V1.transforms()(images))
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    gray = extractor(images[:, :1])
    assert torch.equal(gray, extractor(images[:, :1].expand(-1, 3, -1, -1)))  # gray is replicated to RGB


# --------------------------------------------------------------------------- the extraction job
def _extract_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    args = json.loads((Path(out) / "args.json").read_text())
    EXTRACTORS[LINEAR.name] = LINEAR  # this process's registry (spawned: the test's monkeypatch is not here)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    extractor = load_extractor(args["extractor"], args["weights"], expected_sha256=args["sha256"])
    extract_features(args["source"], "pics", "test", args["out_root"], extractor, rank=rank, world_size=world,
                     batch_size=2, progress=False)
    dist.barrier()  # leave together: a rank tearing gloo down while its peer is busy can abort (SIGABRT)
    dist.destroy_process_group()


def _extract_on_one_and_two_processes(tmp_path: Path, extractor: str, weights: Path) -> dict[int, Path]:
    """5 images in shards of 2, 2, 1 (two ranks read 2 + 1 shards), extracted by 1 and by 2
    gloo processes; returns the split directory each wrote."""
    source = tmp_path / "images"
    build_pictures(source, 5, per_shard=2)
    out = {}
    for world in (1, 2):
        work = tmp_path / f"ws{world}"
        work.mkdir()
        (work / "args.json").write_text(json.dumps({"extractor": extractor, "weights": str(weights),
                                                    "sha256": sha256(weights), "source": str(source),
                                                    "out_root": str(tmp_path / f"features{world}")}))
        spawn_gloo(_extract_worker, world, work)
        out[world] = tmp_path / f"features{world}" / "pics" / "test"
    names = sorted(p.name for p in out[1].iterdir())
    assert names == ["BUILD.lock", "manifest.json"] + [f"pics-test-{i:06d}.npy" for i in range(3)]
    assert sorted(p.name for p in out[2].iterdir()) == names  # done records removed once complete
    for name in names[1:]:
        assert (out[1] / name).read_bytes() == (out[2] / name).read_bytes(), name
    return out


def test_vectors_are_the_same_on_one_and_two_processes(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), weights)
    out = _extract_on_one_and_two_processes(tmp_path, LINEAR.name, weights)
    vectors = load_vectors(out[2].parent.parent, "pics", "test")
    assert vectors.keys.tolist() == [f"{i:08d}" for i in range(5)]
    assert vectors.label.tolist() == [i % 3 for i in range(5)]


def test_inception_vectors_are_the_fid_networks_features(tmp_path, random_inception_home):
    """The inception extractor's vectors (in this process) are the FID network's pool3 features, with
    the manifest's provenance; that any number of processes writes the same bytes is
    test_vectors_are_the_same_on_one_and_two_processes (the extraction does not depend on the network)."""
    weights = random_inception_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE
    source = tmp_path / "images"
    build_pictures(source, 5, per_shard=2)
    extractor = load_extractor("inception", weights, expected_sha256=sha256(weights))
    extract_features(source, "pics", "test", tmp_path / "features", extractor, batch_size=2, progress=False)
    vectors = load_vectors(tmp_path / "features", "pics", "test")
    assert vectors.keys.tolist() == [f"{i:08d}" for i in range(5)]
    assert vectors.vectors.shape == (5, 2048) and vectors.vectors.dtype == np.float32
    manifest = vectors.manifest
    assert (manifest["extractor"], manifest["dim"], manifest["count"], manifest["complete"]) == ("inception", 2048, 5,
                                                                                               True)
    assert manifest["weights_sha256"] == sha256(weights) and manifest["extractor_weights"]["official"] is False
    assert manifest["source"]["count"] == 5 and len(manifest["source_manifest_hash"]) == 16
    model = fid.load_inception("cpu", weights_path=weights)
    reference = fid.inception_features(smooth_images(2, seed=0), "cpu", batch_size=2, model=model)  # shard 0
    scale = np.abs(reference).max()  # random weights give tiny features: compare relative to their size
    np.testing.assert_allclose(vectors.vectors[:2], reference, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(vectors.vectors[0] - vectors.vectors[1]).max() > 0.1 * scale  # images differ, so do vectors


def test_extraction_resumes_after_an_interruption(tmp_path, linear_extractor):
    source = tmp_path / "images"
    build_pictures(source, 10, per_shard=3)  # shards of 3, 3, 3, 1
    reference = tmp_path / "reference"
    extract_features(source, "pics", "test", reference, linear_extractor, batch_size=2, progress=False)

    out = tmp_path / "features"
    counting(linear_extractor, fail_after=3)  # shard 0 takes 2 calls (chunks of 2 + 1): dies inside shard 1
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_features(source, "pics", "test", out, linear_extractor, batch_size=2, progress=False)
    d = out / "pics" / "test"
    assert (d / f"pics-test-000000.npy{DONE_SUFFIX}").is_file()
    assert read_vector_manifest(out, "pics", "test", require_complete=False)["complete"] is False
    with pytest.raises(VectorShardError, match="incomplete"):
        load_vectors(out, "pics", "test")

    calls = counting(linear_extractor)
    manifest = extract_features(source, "pics", "test", out, linear_extractor, batch_size=2, progress=False)
    assert calls["images"] == 7  # shard 0 kept, shards 1-3 computed
    assert manifest["complete"] and manifest["count"] == 10
    assert not list(d.glob(f"*{DONE_SUFFIX}"))
    for i in range(4):
        name = f"pics-test-{i:06d}.npy"
        assert (d / name).read_bytes() == (reference / "pics" / "test" / name).read_bytes()

    calls = counting(linear_extractor)  # complete: nothing to do
    extract_features(source, "pics", "test", out, linear_extractor, batch_size=2, progress=False)
    assert calls["images"] == 0
    data = bytearray((d / "pics-test-000002.npy").read_bytes())
    data[-1] ^= 1  # one flipped bit
    (d / "pics-test-000002.npy").write_bytes(bytes(data))
    with pytest.raises(VectorShardError, match="sha256"):
        load_vectors(out, "pics", "test")
    extract_features(source, "pics", "test", out, linear_extractor, batch_size=2, progress=False)
    assert calls["images"] == 3  # only the corrupt shard again
    assert load_vectors(out, "pics", "test").vectors.shape == (10, 4)


def test_other_settings_are_refused_unless_overwritten(tmp_path, linear_extractor):
    source = tmp_path / "images"
    build_pictures(source, 4, per_shard=2)
    out = tmp_path / "features"
    extract_features(source, "pics", "test", out, linear_extractor, batch_size=2, progress=False)
    with pytest.raises(Exception, match="other settings") as err:
        extract_features(source, "pics", "test", out, linear_extractor, batch_size=3, progress=False)
    assert err.value.exit_code == EXIT_DATA
    calls = counting(linear_extractor)
    manifest = extract_features(source, "pics", "test", out, linear_extractor, batch_size=3, overwrite=True,
                                progress=False)
    assert calls["images"] == 4 and manifest["batch_size"] == 3


# --------------------------------------------------------------------------- vector shards on disk
def _one_shard_set(root: Path, data: bytes, dim: int = 4, count: int = 3) -> None:
    d = root / "v" / "test"
    d.mkdir(parents=True)
    (d / "v-test-000000.npy").write_bytes(data)
    entry = {"shard": 0, "name": "v-test-000000.npy", "count": count, "first_index": 0, "last_index": count - 1,
             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": 1, "kind": "vectors", "dim": dim, "record_format": f"index <i8, label <i8, vector <f4 x {dim}",
                "complete": True, "count": count, "shards": [entry]}
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_vector_shards_hold_plain_numbers_only(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = encode_vector_shard([5, 3, 4], [1, -1, 0], vectors)
    records = np.load(io.BytesIO(data), allow_pickle=False)
    assert records.dtype == record_dtype(4) and records["index"].tolist() == [3, 4, 5]  # sorted by index
    np.testing.assert_array_equal(records["vector"][2], vectors[0])
    assert encode_vector_shard([5, 3, 4], [1, -1, 0], vectors) == data  # deterministic bytes

    ok = tmp_path / "ok"
    _one_shard_set(ok, encode_vector_shard([0, 1, 2], [0, 0, 0], vectors))
    assert load_vectors(ok, "v", "test").keys.tolist() == ["00000000", "00000001", "00000002"]

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    buf = io.BytesIO()  # an object array: loading it would unpickle the payload
    np.save(buf, np.array([Payload()] * 3, dtype=object), allow_pickle=True)
    planted = tmp_path / "planted"
    _one_shard_set(planted, buf.getvalue())
    with pytest.raises(VectorShardError, match="not a readable .npy"):
        load_vectors(planted, "v", "test")
    assert not (tmp_path / "ran").exists()

    wrong = tmp_path / "wrong"
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4)))  # float64 matrix, not records
    _one_shard_set(wrong, buf.getvalue())
    with pytest.raises(VectorShardError, match="the manifest says 3 records"):
        load_vectors(wrong, "v", "test")

    hostile = tmp_path / "hostile"
    _one_shard_set(hostile, data)
    man = json.loads((hostile / "v" / "test" / "manifest.json").read_text())
    man["shards"][0]["name"] = "../../../etc/passwd"
    (hostile / "v" / "test" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(VectorShardError, match="does not match v-test-NNNNNN.npy"):
        read_vector_manifest(hostile, "v", "test")
    entry = {**man["shards"][0], "name": "v-test-000000.npy", "bytes": len(data) - 1}
    with pytest.raises(UnsafeFile, match="more than"):  # a file larger than its entry says is not read
        read_vector_shard(hostile / "v" / "test" / "v-test-000000.npy", entry, 4)
    images_root = tmp_path / "img" / "v" / "test"  # an image manifest is not a vector manifest
    images_root.mkdir(parents=True)
    (images_root / "manifest.json").write_text(json.dumps({"complete": True, "resolution": 32, "shards": []}))
    with pytest.raises(VectorShardError, match="not a vector manifest"):
        read_vector_manifest(tmp_path / "img", "v", "test")
