"""`make demo` end to end on a reduced budget: the path a newcomer runs cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.repo import REPO, cpu_env

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_reduced(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / ".installed").exists():
        pytest.skip(f"{venv} was not made by `make install` (no .installed stamp)")
    args = [f"VENV={venv}", f"DEMO_DATA={tmp_path / 'shards'}", f"DEMO_RUNS={tmp_path / 'runs'}", "DEMO_NAME=demo",
            "DEMO_STEPS=12", "DEMO_N_TRAIN=600", "DEMO_N_TEST=200",
            "DEMO_OVERRIDES=train.checkpoint_every=6 train.sample_every=6 data.batches_per_epoch=20"]
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")  # the Makefile sets it itself
    env["TORCH_HOME"] = str(tmp_path / "torch")  # no Inception weights: FID must be skipped
    result = subprocess.run(["make", "-C", str(REPO), "demo", *args], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = tmp_path / "runs" / "demo"
    assert "world size 2" in (run / "log.txt").read_text()
    assert "FID skipped: no Inception weights" in result.stdout
    assert "log_likelihood" in result.stdout and "bits/dim" in result.stdout
    for name in ("distributions.png", "exp1.png", "exp2.png", "samples.png"):
        Image.open(run / "figures" / name).verify()
    table = json.loads((run / "figures" / "ood.json").read_text())
    assert set(table["ood"]["digits/test"]) >= {"log_likelihood", "complexity_corrected", "png_complexity"}
    assert table["bpd"]["demo/test"]["count"] == 200 and table["bpd"]["digits/test"]["count"] == 1797

    # A second run skips or resumes everything that is done: no new checkpoint, no dump rewritten.
    def state():
        files = [*run.glob("checkpoints/step-*/COMPLETE"), *run.glob("eval/step-*/dumps/*.npz")]
        return {str(p): p.stat().st_mtime_ns for p in files}

    before = state()
    assert len([p for p in before if p.endswith(".npz")]) == 3
    again = subprocess.run(["make", "-C", str(REPO), "demo", *args], env=env, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert state() == before
    output = again.stdout + again.stderr
    for spec in ("demo/train", "demo/test", "digits/test"):
        assert f"{spec}: result exists" in output, output[-4000:]
