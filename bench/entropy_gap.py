"""How close does training get to the entropy of data whose density is known?

Builds the `gaussian` shards (a Gaussian random field whose discretized entropy is known
analytically, recorded in the manifest), trains a demo-size Glow on them for a fixed wall
time (stopped through the run's STOP file, i.e. the preemption path), evaluates test
bits/dim and prints the gap to the analytic bound. Not a test: it takes minutes.
Trailing KEY=VALUE arguments are training config overrides.

\b
Example:
  python bench/entropy_gap.py --minutes 10 --out bench-results/entropy_gap
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Training wall time.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results/entropy_gap", show_default=True,
              help="Folder of the run, its evaluation and result.json.")
@click.option("--data-root", type=click.Path(file_okay=False), default="data/shards", show_default=True,
              help="Shard root; the gaussian shards are built there if missing.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training processes (accelerate launch).")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def main(minutes, out, data_root, processes, overrides):
    out = Path(out)
    py = sys.executable
    manifest = Path(data_root) / "gaussian" / "test" / "manifest.json"
    if not manifest.exists():
        subprocess.run([py, str(REPO / "shards/build.py"), "gaussian", "--out", data_root], check=True)
    bound = json.loads(manifest.read_text())["extra"]["analytic_bits_per_dim"]
    args = ["--config", str(REPO / "train/configs/demo.yaml"), "run.name=entropy_gap", f"run.root={out}",
            f"data.root={data_root}", "data.dataset=gaussian", "train.max_steps=1000000",
            "optim.schedule=constant", "run.logger=none", "train.progress=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // processes))))
    if processes == 1:
        cmd = [py, str(REPO / "train/train.py"), *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(Path(py).with_name("accelerate")), "launch", "--config_file",
               str(REPO / "train/accelerate/cpu_2proc.yaml"), "--num_processes", str(processes),
               str(REPO / "train/train.py"), *args]
    run_dir = out / "entropy_gap"
    proc = subprocess.Popen(cmd, env=env)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < minutes * 60:
        time.sleep(1)
    run_dir.joinpath("STOP").touch()  # the trainer checkpoints, writes STOPPED and exits 0
    proc.wait()
    trained = time.monotonic() - start
    subprocess.run([py, str(REPO / "eval/evaluate.py"), "--checkpoint", str(run_dir / "checkpoints/latest"),
                    "--task", "bpd", "--data", "gaussian/test", "--force"], check=True, env=env)
    table = json.loads(next(run_dir.glob("eval/step-*/bpd.json")).read_text())
    test_bpd = table["gaussian/test"]["mean"]
    result = {"minutes_trained": trained / 60, "step": table["gaussian/test"]["step"], "test_bpd": test_bpd,
              "analytic_bpd": bound, "gap": test_bpd - bound, "overrides": list(overrides)}
    (out / "entropy_gap.json").write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
