"""glow.features.streams and `glow-shards features`: vector shards as a training stream (seeded,
deterministic) and an evaluation stream (every record once over the readers), built by the command."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from glow.cli.shards import cli as shards_cli
from glow.errors import EXIT_DATA, EXIT_USAGE
from glow.features.extract import extract_features
from glow.features.extractors import EXTRACTORS, load_extractor, write_random_weights
from glow.features.streams import make_vector_eval_loader, make_vector_train_loader
from glow.features.vector_shards import (
    VectorShardError,
    load_vectors,
    read_vector_manifest,
)
from tests.helpers.features import LINEAR, build_pictures, sha256

LINEAR_FRESH = dataclasses.replace(LINEAR, fresh=lambda: torch.nn.Linear(3, 4))


@pytest.fixture
def vectors(tmp_path, monkeypatch):
    """pics/test: 7 images in shards of 2, 2, 2, 1, turned into 4-d vectors by a linear extractor."""
    monkeypatch.setitem(EXTRACTORS, LINEAR.name, LINEAR_FRESH)
    build_pictures(tmp_path / "images", 7, per_shard=2)
    weights = tmp_path / "linear.pth"
    extractor = load_extractor(LINEAR.name, weights, expected_sha256=write_random_weights(LINEAR.name, weights, 0))
    extract_features(tmp_path / "images", "pics", "test", tmp_path / "features", extractor, batch_size=3,
                     progress=False)
    return tmp_path / "features"


def test_eval_stream_gives_every_vector_once_over_the_readers(vectors):
    expected = load_vectors(vectors, "pics", "test")
    for world in (1, 2, 3, 5):
        seen = [b for rank in range(world)
                for b in make_vector_eval_loader(vectors, "pics", "test", batch_size=2, rank=rank, world_size=world)]
        keys = [k for b in seen for k in b["key"]]
        assert sorted(keys) == expected.keys.tolist(), world  # each once, whatever the world size
        order = np.argsort(keys)
        got = torch.cat([b["vector"] for b in seen]).numpy()[order]
        assert got.dtype == np.float32 and np.array_equal(got, expected.vectors)
        assert torch.cat([b["label"] for b in seen]).numpy()[order].tolist() == expected.label.tolist()
        assert torch.cat([b["index"] for b in seen]).numpy()[order].tolist() == expected.index.tolist()


def test_train_stream_is_a_seeded_function_of_its_arguments(vectors):
    def batches(**kw):
        args = dict(batch_size=3, seed=1, epoch=0, rank=0, world_size=2, batches_per_epoch=5, shuffle_buffer=4)
        args.update(kw)
        return [b.clone() for b in make_vector_train_loader(vectors, "pics", "test", **args)]

    first = batches()
    assert len(first) == 5 and all(b.shape == (3, 4) and b.dtype == torch.float32 for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, batches()))  # the same arguments, the same batches
    for other in (dict(seed=2), dict(epoch=1), dict(rank=1)):
        assert not all(torch.equal(a, b) for a, b in zip(first, batches(**other))), other
    tail = batches(skip_batches=2)
    assert len(tail) == 3 and all(torch.equal(a, b) for a, b in zip(first[2:], tail))  # exact resume mid-epoch
    rows = {tuple(v) for v in load_vectors(vectors, "pics", "test").vectors.tolist()}
    assert all(tuple(row) in rows for b in first for row in b.tolist())  # drawn from the set, unchanged


def test_a_model_of_another_dimension_or_an_image_root_is_refused(vectors, tmp_path):
    with pytest.raises(VectorShardError, match="dimension 4 .* model.dim=8") as err:
        make_vector_eval_loader(vectors, "pics", "test", batch_size=2, rank=0, world_size=1, dim=8)
    assert err.value.exit_code == EXIT_DATA
    with pytest.raises(VectorShardError, match="not a vector manifest"):
        make_vector_train_loader(tmp_path / "images", "pics", "test", batch_size=2, seed=0, epoch=0, rank=0,
                                 world_size=1, batches_per_epoch=1)


def test_features_command_writes_vectors_with_random_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(EXTRACTORS, LINEAR.name, LINEAR_FRESH)
    build_pictures(tmp_path / "images", 5, per_shard=2)
    weights = tmp_path / "random.pth"
    args = ["features", "--from", str(tmp_path / "images"), "--split", "pics/test", "--extractor", LINEAR.name,
            "--random-init", "3", "--weights", str(weights), "--out", str(tmp_path / "features"), "--batch-size", "2"]
    result = CliRunner().invoke(shards_cli, args)
    assert result.exit_code == 0, result.output
    man = read_vector_manifest(tmp_path / "features", "pics", "test")
    assert man["count"] == 5 and man["weights_sha256"] == sha256(weights)
    assert not man["extractor_weights"]["official"]
    assert "pics/test: 5 vectors of 4 (pixel_linear, NOT the published weights" in result.output
    again = CliRunner().invoke(shards_cli, args)  # the same seed writes the same bytes: a rerun resumes
    assert again.exit_code == 0 and read_vector_manifest(tmp_path / "features", "pics", "test") == man
    other_seed = CliRunner().invoke(shards_cli, [*args[:8], "4", *args[9:]])  # never replaces another file
    assert other_seed.exit_code == EXIT_USAGE and "is not the random initialisation" in other_seed.output
    bad = CliRunner().invoke(shards_cli, [*args[:6], "resnet", *args[7:]])
    assert bad.exit_code == EXIT_USAGE and "'resnet' is not one of" in bad.output
