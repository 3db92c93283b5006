"""How close does training get to the entropy of data whose density is known?

Builds the `gaussian` shards (a Gaussian random field whose discretized entropy is known
analytically, recorded in the manifest), trains a demo-size Glow on them, evaluates test
bits/dim with per-sample dumps and prints the gap to the analytic bound and the Spearman
rank correlation between each test image's model log-likelihood and its true log-density
(recorded in the shards). Not a test: it takes minutes.

Budget the training either by optimizer steps (--steps: compute-normalised, so machines
compare; the learning rate follows a cosine from a peak of 2e-3 to 0 over exactly those steps) or
by wall time (--minutes: constant rate, the run is stopped through its STOP file, i.e. the
preemption path). Trailing KEY=VALUE arguments are training config overrides; they come
last and win.

\b
Example:
  python bench/entropy_gap.py --steps 1612 --processes 2 --out bench-results/entropy_gap
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def true_log_density(split_dir: Path) -> dict[int, float]:
    """index -> the shard's recorded log-density (nats) of every sample of one split."""
    out = {}
    for tar in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(member).read())
                    out[int(member.name.split(".")[0])] = meta["log_density_nats"]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _train_command(py: str, processes: int, args: list[str]) -> tuple[list[str], dict]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // processes))))
    if processes == 1:
        return [py, str(REPO / "train/train.py"), *args], env
    env["ACCELERATE_USE_CPU"] = "1"
    return [str(Path(py).with_name("accelerate")), "launch", "--config_file",
            str(REPO / "train/accelerate/cpu_2proc.yaml"), "--num_processes", str(processes),
            str(REPO / "train/train.py"), *args], env


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Train exactly this many optimizer steps, cosine schedule from 2e-3 to 0 over them. "
                   "[default: none; --minutes of wall time at a constant rate]")
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Training wall time (without --steps).")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results/entropy_gap", show_default=True,
              help="Folder of the run, its evaluation and entropy_gap.json.")
@click.option("--data-root", type=click.Path(file_okay=False), default="data/shards", show_default=True,
              help="Shard root; the gaussian shards are built there if missing.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training processes (accelerate launch).")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def main(steps, minutes, out, data_root, processes, overrides):
    out = Path(out)
    py = sys.executable
    test_dir = Path(data_root) / "gaussian" / "test"
    if not (test_dir / "manifest.json").exists():
        subprocess.run([py, str(REPO / "shards/build.py"), "gaussian", "--out", data_root], check=True)
    bound = json.loads((test_dir / "manifest.json").read_text())["extra"]["analytic_bits_per_dim"]
    # The measured recipe (docs/PERFORMANCE.md): cosine from a peak rate of 2e-3 to 0 over the step
    # budget; a wall-time budget has no known length, so it keeps demo.yaml's constant rate after warm-up.
    if steps:
        budget = [f"train.max_steps={steps}", "optim.lr=2e-3", "optim.schedule=cosine", "optim.min_lr_ratio=0.0"]
    else:
        budget = ["train.max_steps=1000000", "optim.schedule=constant"]
    args = ["--config", str(REPO / "train/configs/demo.yaml"), "run.name=entropy_gap", f"run.root={out}",
            f"data.root={data_root}", "data.dataset=gaussian", *budget,
            "run.logger=none", "train.progress=false", *overrides]
    cmd, env = _train_command(py, processes, args)
    run_dir = out / "entropy_gap"
    proc = subprocess.Popen(cmd, env=env)
    start = time.monotonic()
    while proc.poll() is None and (steps or time.monotonic() - start < minutes * 60):
        time.sleep(1)
    if proc.poll() is None:
        run_dir.joinpath("STOP").touch()  # the trainer checkpoints, writes STOPPED and exits 0
    proc.wait()
    trained = time.monotonic() - start
    subprocess.run([py, str(REPO / "eval/evaluate.py"), "--checkpoint", str(run_dir / "checkpoints/latest"),
                    "--task", "dump", "--data", "gaussian/test", "--force"], check=True, env=env)
    table = json.loads(next(run_dir.glob("eval/step-*/bpd.json")).read_text())
    entry = table["gaussian/test"]
    dump = np.load(next(run_dir.glob("eval/step-*/dumps/gaussian-test.npz")))
    truth = true_log_density(test_dir)
    true_lp = np.array([truth[int(i)] for i in dump["index"]])
    result = {"minutes_trained": trained / 60, "step": entry["step"], "test_bpd": entry["mean"],
              "analytic_bpd": bound, "gap": entry["mean"] - bound,
              "spearman_log_p_vs_true": spearman(dump["log_p"], true_lp),
              "true_bpd_of_test_set": float(-true_lp.mean() / (3 * 32 * 32 * math.log(2))),
              "processes": processes, "overrides": list(overrides)}
    (out / "entropy_gap.json").write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
