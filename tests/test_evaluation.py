"""Evaluation jobs run for real on a tiny trained checkpoint (the session's ``tiny_run``, copied):
dumps, bpd, samples, FID, figures; in this process, and on 2 gloo ranks for the dumps' invariance."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glow.checkpoint import load_model
from glow.cli.evaluate import main as evaluate_main
from glow.cli.figures import main as figures_main
from glow.errors import EXIT_CHECKPOINT, EXIT_DATA
from glow.model.sampling import sample_seeded
from tests.helpers.gloo import join_process_group, spawn_gloo
from tests.helpers.repo import invoke
from tests.helpers.toy import build_toy_shards, train_in_process


def evaluate(run_dir: Path, *args: str, env: dict | None = None):
    """`eval/evaluate.py --checkpoint <run>/checkpoints/latest ARGS` in this process (one process)."""
    return invoke(evaluate_main, "--checkpoint", run_dir / "checkpoints" / "latest", *args, env=env)


def make_figures(run_dir: Path, *args: str):
    return invoke(figures_main, "--run", run_dir, *args)


def _eval_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of ``world``: the evaluation CLI of <out>/args.json on a real gloo group."""
    os.environ["ACCELERATE_USE_CPU"] = "1"
    join_process_group(rank, world, port)
    evaluate_main.main(json.loads(Path(out, "args.json").read_text()), standalone_mode=False)


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_dumps_are_bitwise_identical_for_one_and_two_processes(tiny_run_copy, tmp_path):
    run_dir = tiny_run_copy
    copies = {}
    # Batches of 7 split the 50 test samples unevenly over the shards, ranks and batches.
    for nproc, batch in ((1, 7), (2, 7), (1, 64)):
        args = ["--checkpoint", str(run_dir / "checkpoints" / "latest"), "--task", "dump", "--data", "toy/test",
                "--data", "toyood/test", "--batch-size", str(batch), "--force", "--logger", "none"]
        if nproc == 1:
            result = invoke(evaluate_main, *args)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        else:
            (tmp_path / "args.json").write_text(json.dumps(args))
            spawn_gloo(_eval_worker, nproc, tmp_path)
        copies[nproc, batch] = tmp_path / f"n{nproc}-b{batch}"
        shutil.copytree(run_dir / "eval", copies[nproc, batch])
    for name in ("toy-test.npz", "toyood-test.npz"):
        one, two, big = (load(next(copies[c].glob(f"step-*/dumps/{name}"))) for c in ((1, 7), (2, 7), (1, 64)))
        for key in ("key", "index", "label", "log_p", "bpd", "complexity_bpd"):
            assert np.array_equal(one[key], two[key]), (name, key)
        # Another batch size may pick other convolution kernels: equal to float rounding.
        assert np.allclose(one["log_p"], big["log_p"], rtol=1e-6, atol=0)
        assert len(one["key"]) == (50 if name.startswith("toy-") else 30)  # = the manifest count
        assert np.array_equal(one["index"], np.arange(len(one["index"])))
    dump = load(next(copies[1, 7].glob("step-*/dumps/toy-test.npz")))
    assert int(dump["step"]) == 10 and list(dump["label"][:4]) == [0, 1, 2, 0]
    assert np.allclose(dump["bpd"], -dump["log_p"] / (3 * 32 * 32 * np.log(2)))
    table = json.loads(next(copies[1, 7].glob("step-*/bpd.json")).read_text())
    assert table["toy/test"]["count"] == 50
    assert table["toy/test"]["mean"] == pytest.approx(dump["bpd"].mean())


def test_existing_results_are_skipped_unless_forced(tiny_run_copy):
    run_dir = tiny_run_copy
    assert evaluate(run_dir, "--task", "dump", "--data", "toy/test").returncode == 0
    path = next(run_dir.glob("eval/step-*/dumps/toy-test.npz"))
    before = path.stat().st_mtime_ns
    result = evaluate(run_dir, "--task", "dump", "--data", "toy/test")
    assert result.returncode == 0 and "skipped" in result.stdout
    assert path.stat().st_mtime_ns == before


def test_results_are_reused_only_under_the_same_settings(tiny_run_copy, toy_shards, tmp_path):
    """The one skip rule: --check-done (what eval.sbatch asks) and the task agree; another seed or
    shard root recomputes instead of silently reusing; bpd.json entries live one file each."""
    run_dir, shards = tiny_run_copy, toy_shards
    args = ("--task", "dump", "--data", "toyood/test")
    assert evaluate(run_dir, *args, "--force").returncode == 0
    done = evaluate(run_dir, *args, "--check-done")
    assert done.returncode == 0 and "done" in done.stdout
    for other in (("--seed", "1"), ("--data-root", str(shutil.copytree(shards, tmp_path / "moved")))):
        check = evaluate(run_dir, *args, *other, "--check-done")
        assert check.returncode == 3 and "dump toyood/test" in check.stdout, check.stdout + check.stderr
    path = next(run_dir.glob("eval/step-*/dumps/toyood-test.npz"))
    before = path.stat().st_mtime_ns
    result = evaluate(run_dir, *args, "--seed", "1")
    assert result.returncode == 0 and "skipped" not in result.stdout and path.stat().st_mtime_ns != before
    assert int(load(path)["seed"]) == 1
    entry = json.loads(next(run_dir.glob("eval/step-*/bpd.d/toyood%2Ftest.json")).read_text())
    assert entry["seed"] == 1 and entry["count"] == 30
    assert evaluate(run_dir, "--task", "samples", "--check-done").returncode in (0, 3)
    assert evaluate(run_dir, *args, "--seed", "1", "--check-done").returncode == 0


def test_a_split_shorter_than_its_manifest_fails_loudly(tiny_run_copy, toy_shards, tmp_path):
    run_dir, shards = tiny_run_copy, toy_shards
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    manifest_path = broken / "toy" / "test" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["count"] += 5  # the manifest says more than the shards hold
    manifest_path.write_text(json.dumps(manifest))
    result = evaluate(run_dir, "--task", "dump", "--data", "toy/test", "--data-root", str(broken), "--force")
    assert result.returncode == EXIT_DATA and "Traceback" not in result.stderr
    assert "55" in result.stderr and "no dump written" in result.stderr


def test_a_truncated_shard_is_one_clear_message(tiny_run_copy, toy_shards, tmp_path):
    run_dir, shards = tiny_run_copy, toy_shards
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    shard = sorted((broken / "toy" / "test").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    result = evaluate(run_dir, "--task", "dump", "--data", "toy/test", "--data-root", str(broken), "--force")
    assert result.returncode == EXIT_DATA, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and str(shard) in result.stderr and "rebuild" in result.stderr


def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(tiny_run):
    model, _ = load_model(tiny_run)
    batch = sample_seeded(model, range(6), 0.7, seed=3)
    alone = sample_seeded(model, [4], 0.7, seed=3)
    assert batch.dtype == torch.uint8 and batch.shape == (6, 3, 32, 32)
    assert torch.equal(batch[4], alone[0])
    assert not torch.equal(batch[0], batch[1])


def test_samples_latents_and_figures(tiny_run_copy):
    run_dir = tiny_run_copy
    result = evaluate(run_dir, "--task", "dump", "--task", "samples", "--task", "latents",
                      "--data", "toy/train", "--data", "toy/test", "--data", "toyood/test")
    assert result.returncode == 0, result.stderr[-3000:]
    step_dir = next(run_dir.glob("eval/step-*"))
    for name in ("samples.png", "latents.png"):
        Image.open(step_dir / name).verify()
    result = make_figures(run_dir, "--in", "toy", "--ood", "toyood/test")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = run_dir / "figures"
    for name in ("distributions.png", "exp1.png", "exp2.png", "samples.png"):
        Image.open(figures / name).verify()
    table = json.loads((figures / "ood.json").read_text())
    assert "| OOD set | score | AUROC |" in (figures / "ood.md").read_text()
    # every score has a row for the OOD set (the values are pinned by tests/test_ood_table.py)
    assert set(table["ood"]["toyood/test"]) == {"log_likelihood", "complexity_corrected", "png_complexity",
                                                "typicality_m1", "typicality_m2", "typicality_m10", "typicality_m25"}
    assert table["bpd"]["toy/test"]["count"] == 50 and table["bpd"]["toyood/test"]["count"] == 30
    assert set(table["typicality_test"]["ood"]["toyood/test"]) == {"m1", "m2", "m10", "m25"}
    assert "<table>" in (figures / "index.html").read_text()  # the one page (checked by test_figures)


def test_fid_without_weights_says_where_to_put_them(tiny_run_copy, toy_shards, tmp_path):
    run_dir = tiny_run_copy
    result = evaluate(run_dir, "--task", "fid", "--data", "toy/test", "--fid-samples", "4", "--force",
                      env={"TORCH_HOME": str(tmp_path / "empty")})
    assert result.returncode == EXIT_CHECKPOINT and "Traceback" not in result.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in result.stderr and "hub/checkpoints" in result.stderr


def test_fid_and_five_bit_end_to_end(tmp_path, random_inception_home):
    """The one FID end to end with the real Inception network (random weights), at n_bits=5 through
    train, dump, FID and figures: the fid.json entry and the cached reference statistics; L(x) is the
    PNG length of the 5-bit image the model scored, and the FID references are the split's images
    quantized like the samples."""
    from glow.data.streams import load_images
    from glow.evaluation import fid
    from glow.evaluation.complexity import png_complexity_bpd
    from glow.model.likelihood import requantize

    shards = build_toy_shards(tmp_path / "shards", n_train=100, n_test=6, n_ood=12)
    assert train_in_process(tmp_path / "runs", shards, "train.max_steps=4", "model.n_bits=5") == 0
    run_dir = tmp_path / "runs" / "tiny"
    env = {"TORCH_HOME": str(random_inception_home)}
    cache = tmp_path / "cache"
    result = evaluate(run_dir, "--task", "dump", "--data", "toy/test", "--data", "toyood/test")
    assert result.returncode == 0, result.stderr[-3000:]
    result = evaluate(run_dir, "--task", "fid", "--data", "toy/test", "--fid-samples", "4", "--fid-cache", str(cache),
                      env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    dump = load(next(run_dir.glob("eval/step-*/dumps/toyood-test.npz")))
    assert int(dump["n_bits"]) == 5
    images = load_images(shards, "toyood", "test", list(dump["key"]))
    for key, value in zip(dump["key"][:5], dump["complexity_bpd"][:5]):
        assert value == png_complexity_bpd(images[str(key)] >> 3)
        assert value != png_complexity_bpd(images[str(key)])
    # the cached reference statistics are those of the 5-bit rendered test images
    [ref] = cache.glob("fid-ref-*.npz")
    assert "-5bit-" in ref.name
    test_images = load_images(shards, "toy", "test", [f"{i:08d}" for i in range(6)])
    x = torch.from_numpy(np.stack(list(test_images.values()))).permute(0, 3, 1, 2)
    model = fid.load_inception("cpu", random_inception_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE)
    mu, _ = fid.feature_statistics(fid.inception_features(requantize(x, 5), "cpu", model=model))
    with np.load(ref) as z:
        np.testing.assert_allclose(z["mu"], mu, rtol=1e-4, atol=1e-5)
    entry = json.loads(next(run_dir.glob("eval/step-*/fid.json")).read_text())["toy/test@T=1.0"]
    assert entry["n_samples"] == 4 and entry["fid"] > 0 and entry["reference_count"] == 6
    result = make_figures(run_dir, "--in", "toy", "--ood", "toyood/test")
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((run_dir / "figures" / "ood.json").read_text())
    assert table["n_bits"] == 5 and "complexity_corrected" in table["ood"]["toyood/test"]
