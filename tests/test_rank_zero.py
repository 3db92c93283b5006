"""Rank 0 decides, every rank follows (glow.distributed.on_main), on real gloo process groups: results
and cache files that appear on the shared filesystem between two ranks' looks change nothing, and an
evaluation of `latest` while a 2-rank training writes a checkpoint every step loads one step on both
ranks. A rank that took its own decision would enter other collectives than its peer: the short
process-group timeout turns that into a failure, not a hang."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from glow.run import Run
from tests.helpers.fake_sources import build_small_shards
from tests.helpers.gloo import (
    join_process_group,
    leave_process_group,
    spawn_gloo,
    train_on_gloo,
)
from tests.helpers.toy import build_toy_shards

N = 12  # samples in gaussian/test


def _wait_for(path: Path, timeout: float = 60) -> None:
    """A file gate: return once ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


def _on_main_worker(rank: int, world: int, port: int, out: str) -> None:
    from glow.config import ConfigError
    from glow.distributed import on_main

    join_process_group(rank, world, port)
    calls = []
    got = on_main(lambda: calls.append(rank) or {"rank": rank}, world, rank)
    try:
        on_main(lambda: (_ for _ in ()).throw(ConfigError("rank 0 refuses")), world, rank)
        raised = ""
    except ConfigError as err:
        raised = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"got": got, "calls": calls, "raised": raised}))
    leave_process_group()


def test_on_main_runs_once_and_every_rank_gets_its_answer_or_its_error(tmp_path):
    spawn_gloo(_on_main_worker, 2, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["got"] for r in ranks] == [{"rank": 0}, {"rank": 0}]
    assert [r["calls"] for r in ranks] == [[0], []]  # decided on rank 0 alone
    assert [r["raised"] for r in ranks] == ["rank 0 refuses", "rank 0 refuses"]


def _write_checkpoint(run_dir: Path, shards: Path) -> Path:
    """Step 1 of a run: a tiny random Glow's model.safetensors, meta.json and COMPLETE."""
    from glow.checkpoint import write_export
    from glow.model import Glow, GlowConfig

    torch.manual_seed(0)
    model = Glow(GlowConfig(image_size=32, n_levels=2, steps_per_level=1, hidden_channels=4))
    model.log_prob(torch.rand(4, 3, 32, 32) - 0.5)  # ActNorm init
    checkpoint = Run(run_dir).checkpoint(1)
    checkpoint.path.mkdir(parents=True)
    meta = {"step": 1, "model_config": model.config.to_dict(), "model_hash": model.config.hash(),
            "data": {"root": str(shards), "dataset": "gaussian"}, "seed": 0}
    write_export(checkpoint, model.state_dict(), meta)
    checkpoint.complete_marker.write_text("1\n")
    return checkpoint.path


def _appearing_results_worker(rank: int, world: int, port: int, out: str) -> None:
    """Evaluate bpd and FID of gaussian/test on 2 ranks. Test hooks: right after rank 0 looks for the
    bpd entry and the FID reference cache, a valid-looking entry and cache file appear (another job
    writing the shared run and cache); a rank that looked itself would look only then and skip."""
    from torch import nn

    from glow.evaluation import fid
    from glow.evaluation.job import evaluate
    from glow.evaluation.records import Result
    from glow.evaluation.result_tables import add_entries
    from glow.evaluation.tasks import EvalOptions

    plan = json.loads(Path(out, "plan.json").read_text())
    gates = Path(out)
    look_at_result, look_at_cache = Result.done, fid.read_cached_statistics

    def done(result: Result) -> bool:
        if rank != 0:
            _wait_for(gates / "bpd-planted")
        answer = look_at_result(result)
        if rank == 0 and result.what.startswith("bpd "):
            spec = result.what.split()[1]
            add_entries(Path(plan["eval_dir"]) / "bpd.json", {spec: {"mean": -1.0, "count": -1, **result.settings}})
            (gates / "bpd-planted").touch()
        return answer

    def cached(cache_dir, key):
        if rank != 0:
            _wait_for(gates / "cache-planted")
        answer = look_at_cache(cache_dir, key)
        if rank == 0:
            fid.save_statistics(fid.statistics_path(cache_dir, key), np.zeros(3), np.eye(3), key)
            (gates / "cache-planted").touch()
        return answer

    def features(images, device, model=None, **kwargs):  # 3 cheap statistics stand in for Inception's 2048
        arr = (images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)).astype(np.float64)
        flat = arr.reshape(arr.shape[0], -1)
        return np.stack([flat.mean(1), flat.std(1), flat[:, :10].mean(1)], 1)

    Result.done, fid.read_cached_statistics = done, cached
    fid.load_inception, fid.inception_features, fid.FID_DIM = (lambda *a, **k: nn.Identity()), features, 3
    join_process_group(rank, world, port, timeout_s=30)
    evaluate(plan["checkpoint"], EvalOptions(tasks=["bpd", "fid"], specs=[("gaussian", "test")], batch_size=5,
                                             fid_samples=4, fid_temperatures=[1.0], fid_cache=plan["cache"],
                                             logger="none"))
    Path(out, f"rank{rank}.done").touch()


def test_results_appearing_between_the_ranks_looks_change_nothing(tmp_path):
    shards = tmp_path / "shards"
    build_small_shards(shards, n=N, samples_per_shard=5, dataset="gaussian", split="test")
    checkpoint = _write_checkpoint(tmp_path / "run", shards)
    eval_dir, cache = Run(tmp_path / "run").eval_dir(1), tmp_path / "cache"
    (tmp_path / "plan.json").write_text(json.dumps({"checkpoint": str(checkpoint), "cache": str(cache),
                                                    "eval_dir": str(eval_dir)}))
    spawn_gloo(_appearing_results_worker, 2, tmp_path)
    assert (tmp_path / "rank0.done").exists() and (tmp_path / "rank1.done").exists()
    assert (tmp_path / "bpd-planted").exists() and (tmp_path / "cache-planted").exists()  # the hooks ran
    entry = json.loads((eval_dir / "bpd.json").read_text())["gaussian/test"]
    assert entry["count"] == N and entry["mean"] > 0  # computed by both ranks, as rank 0 decided
    [cached] = cache.iterdir()
    from glow.evaluation.fid import load_statistics

    mu, _ = load_statistics(cached)
    assert np.all(mu > 0)  # recomputed by both ranks (the planted file held zeros) and written by rank 0
    assert "gaussian/test@T=1.0" in json.loads((eval_dir / "fid.json").read_text())


def _eval_while_training_worker(rank: int, world: int, port: int, out: str) -> None:
    """`evaluate` of <run>/checkpoints/latest on 2 ranks; each rank records what it loaded. Test hook:
    a rank other than 0 that resolved `latest` itself would do so only once training has written a
    newer checkpoint than the one rank 0 found."""
    from glow.evaluation import job
    from glow.evaluation.tasks import EvalOptions

    plan = json.loads(Path(out, "plan.json").read_text())
    load, resolve = job._load_on_main, job.resolve_checkpoint
    found = Path(out, "rank0-resolved")

    def resolving(spec):
        if rank != 0:
            _wait_for(found)
            while resolve(spec).step <= int(found.read_text()):
                time.sleep(0.02)
        checkpoint = resolve(spec)
        if rank == 0:
            found.write_text(str(checkpoint.step))
        return checkpoint

    def recording(spec, options, accelerator):
        checkpoint, meta, model = load(spec, options, accelerator)
        Path(out, f"loaded{rank}.json").write_text(json.dumps([meta["step"], meta["weights_digest"]]))
        return checkpoint, meta, model

    job._load_on_main, job.resolve_checkpoint = recording, resolving
    join_process_group(rank, world, port)
    job.evaluate(plan["latest"], EvalOptions(tasks=["dump"], specs=[("toy", "test")], batch_size=25, logger="none"))


@pytest.mark.slow  # 4 spawned ranks training and evaluating side by side, ~10 s
def test_an_evaluation_of_latest_during_training_loads_one_step_on_every_rank(tmp_path):
    from glow.checkpoint import load_model
    from glow.distributed import state_digest
    from glow.evaluation.dumps import load_dump

    shards = build_toy_shards(tmp_path / "shards", n_train=100, n_test=50, n_ood=10)
    run = Run(tmp_path / "runs" / "tiny")
    training = train_on_gloo(2, tmp_path / "train", [[
        f"run.root={tmp_path / 'runs'}", f"data.root={shards}", "data.dataset=toy", "model.steps_per_level=1",
        "model.hidden_channels=4", "train.max_steps=100000", "train.checkpoint_every=1",
        "train.keep_checkpoints=100000", "train.log_every=100000", "train.sample_every=100000"]],
        join=False, GLOW_TEST_STEP_SECONDS="0.05")
    try:
        while run.latest() is None:  # the first complete checkpoint: the run is writing one a step now
            assert all(p.is_alive() for p in training.processes), "training ended early"
            time.sleep(0.05)
        out = tmp_path / "eval"
        out.mkdir()
        (out / "plan.json").write_text(json.dumps({"latest": str(run.checkpoints_dir / "latest")}))
        spawn_gloo(_eval_while_training_worker, 2, out)
    finally:
        run.stop_path.touch()  # the trainer stops at its next step (a complete checkpoint, exit 0)
        training.join()
    loaded = [json.loads((out / f"loaded{r}.json").read_text()) for r in range(2)]
    assert loaded[0] == loaded[1]  # one step, the same weights, on both ranks
    step, digest = loaded[0]
    dump = load_dump(run.dump_path(step, "toy/test"))
    assert (dump.step, dump.weights_digest) == (step, digest)
    assert state_digest(load_model(run.checkpoint(step))[0].state_dict()) == digest
    assert run.latest().step > step  # training went on writing checkpoints meanwhile
