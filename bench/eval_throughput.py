"""Per-sample log-likelihood images/s: the evaluation fast path against the training forward.

\b
Examples:
  python bench/eval_throughput.py                       # CPU: demo + celeba32-reduced
  python bench/eval_throughput.py --device cuda --configs celeba32,celeba64

Variants (first = reference): train_forward (train mode, autograd recording, forward only),
train_step (forward + backward + Adam), eval_no_grad (eval mode, torch.no_grad),
eval_fast (glow.model.performance.fast_eval: inference mode + cached 1x1-conv weights),
eval_fast+compile (the same, torch.compile'd).
"""
from __future__ import annotations

import os
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = "train_forward,train_step,eval_no_grad,eval_fast,eval_fast+compile"


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--configs", default=None, help="Comma list. [default: demo,celeba32-reduced; on CUDA celeba32,celeba64]")
@click.option("--variants", default=VARIANTS, show_default=True, help="Comma list; the first is the reference.")
@click.option("--device", default="auto", show_default=True, help="cpu | cuda | auto")
@click.option("--repeats", default=5, show_default=True, help="Timed repeats per variant.")
@click.option("--steps", default=4, show_default=True, help="Batches per timed repeat.")
@click.option("--warmup", default=3, show_default=True, help="Untimed batches first (compilation happens here).")
@click.option("--batch-size", default=0, show_default=True, help="Override the config's batch size (same for every variant; 0: the config's).")
@click.option("--threads", default=0, show_default=True, help="torch threads (0: default).")
@click.option("--interleave/--no-interleave", default=None, help="Interleave variants round by round. [default: on CPU yes, on CUDA no]")
@click.option("--out-dir", default=str(REPO / "bench" / "results"), show_default=True, type=click.Path(path_type=Path),
              help="Where the JSON and Markdown results go.")
@click.option("--tag", default="", help="Suffix of the output file names. [default: none]")
def main(configs, variants, device, repeats, steps, warmup, batch_size, threads, interleave, out_dir, tag):
    from harness import BenchSpec, preset, run_variants, write_report

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    configs = (configs or ("celeba32,celeba64" if cuda else "demo,celeba32-reduced")).split(",")
    interleave = (not cuda) if interleave is None else interleave
    stem = f"eval_throughput_{device.split(':')[0]}{'_' + tag if tag else ''}"
    all_results = []
    for name in configs:
        model, batch = preset(name, REPO)
        specs = [BenchSpec(name, model, batch_size or batch, v, device, threads, warmup, steps)
                 for v in variants.split(",")]
        all_results += run_variants(specs, repeats, interleave)
        json_path, md_path = write_report(all_results, out_dir, stem, "Evaluation throughput", device)
        click.echo(md_path.read_text().split("\n\n", 2)[-1])
    click.echo(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
