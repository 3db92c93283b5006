"""`make demo` end to end on a reduced budget: the path a newcomer runs cannot rot. It is also the
proof of the 2-process launch (`python -m glow.cli.launch` over gloo, training and evaluation): the
replicas stay identical and the global batch is split over both processes.

A second `make demo` (every step skips what is done) is not run here; each step's skip is tested on
its own: the shard build (tests/test_shards.py), a finished training started again
(tests/test_trainer.py::test_a_finished_run_started_again_writes_nothing) and evaluation results
(tests/test_evaluation.py::test_existing_results_are_skipped_unless_forced)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from glow.run import Run
from tests.helpers.repo import REPO, cpu_env

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_reduced(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / ".installed").exists():
        pytest.skip(f"{venv} was not made by `make install` (no .installed stamp)")
    args = [f"VENV={venv}", f"DEMO_DATA={tmp_path / 'shards'}", f"DEMO_RUNS={tmp_path / 'runs'}", "DEMO_NAME=demo",
            "DEMO_STEPS=12", "DEMO_N_TRAIN=400", "DEMO_N_TEST=100",
            "DEMO_OVERRIDES=train.checkpoint_every=6 train.sample_every=6 train.log_every=3 data.batches_per_epoch=20"]
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # the Makefile sets it itself
    env["TORCH_HOME"] = str(tmp_path / "torch")  # no Inception weights: FID must be skipped
    result = subprocess.run(["make", "-C", str(REPO), "demo", *args], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = tmp_path / "runs" / "demo"
    log = (run / "log.txt").read_text()
    assert "world size 2" in log  # the CPU launch trap would silently give 1
    assert "parameters identical on 2 ranks after initialization" in log
    assert "recipe: global batch 64 = 2 process(es) x 1 micro-batch(es) of 32" in log
    for checkpoint in Run(run).complete_checkpoints():
        meta = json.loads((checkpoint.path / "meta.json").read_text())
        assert meta["world_size"] == 2 and len(set(meta["replica_digests"])) == 1 == len(meta["replica_digests"]) - 1
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(v) < 1e3 for v in losses) and losses[-1] < losses[0]
    assert "FID skipped: no Inception weights" in result.stdout
    assert "log_likelihood" in result.stdout and "bits/dim" in result.stdout
    for name in ("distributions.png", "exp1.png", "exp2.png", "samples.png"):
        Image.open(run / "figures" / name).verify()
    table = json.loads((run / "figures" / "ood.json").read_text())
    assert set(table["ood"]["digits/test"]) >= {"log_likelihood", "complexity_corrected", "png_complexity"}
    assert table["bpd"]["demo/test"]["count"] == 100 and table["bpd"]["digits/test"]["count"] == 1797
