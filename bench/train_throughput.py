"""Training images/s and peak memory per fast path, side by side (see docs/PERFORMANCE.md).

\b
Examples:
  python bench/train_throughput.py                       # CPU: demo + celeba32-reduced
  python bench/train_throughput.py --configs celeba32,celeba64 --device cuda
  python bench/train_throughput.py --variants eager,compile --configs demo --repeats 7

Each variant runs in its own process; on CPU the variants of a config are interleaved
round by round (the machine is shared), on CUDA they run one after another.
"""
from __future__ import annotations

import os
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
CPU_VARIANTS = "eager,channels_last,compile,bf16,checkpointing"
CUDA_VARIANTS = "eager,tf32,bf16,bf16+channels_last,bf16+compile,bf16+checkpointing"


@click.command(help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--configs", default=None, help="Comma list: demo, celeba32-reduced, celeba32, celeba64, ... "
              "[default: demo,celeba32-reduced; plus celeba32,celeba64 on CUDA]")
@click.option("--variants", default=None, help=f"Comma list of '+'-joined tokens. [default: CPU {CPU_VARIANTS}; CUDA {CUDA_VARIANTS}]")
@click.option("--device", default="auto", show_default=True, help="cpu | cuda | auto")
@click.option("--repeats", default=5, show_default=True, help="Timed repeats (rounds) per variant.")
@click.option("--steps", default=4, show_default=True, help="Training steps per timed repeat.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first (compilation happens here).")
@click.option("--batch-size", default=0, show_default=True, help="Override the config's batch size (0: the config's).")
@click.option("--threads", default=0, show_default=True, help="torch threads per worker (0: torch's default).")
@click.option("--interleave/--no-interleave", default=None, help="Interleave the variants round by round. [default: on CPU yes, on CUDA no]")
@click.option("--peak-tflops", default=0.0, show_default=True, help="Device bf16 dense peak for the conv-FLOP fraction (0: auto on H100/H200).")
@click.option("--out-dir", default=str(REPO / "bench" / "results"), show_default=True, type=click.Path(path_type=Path),
              help="Where the JSON and Markdown results go.")
@click.option("--tag", default="", help="Suffix of the output file names. [default: none]")
def main(configs, variants, device, repeats, steps, warmup, batch_size, threads, interleave, peak_tflops, out_dir, tag):
    from harness import (
        BenchSpec,
        conv_flops_per_image,
        preset,
        run_variants,
        write_report,
    )

    from glow.model import GlowConfig

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    configs = (configs or ("demo,celeba32-reduced,celeba32,celeba64" if cuda else "demo,celeba32-reduced")).split(",")
    variants = (variants or (CUDA_VARIANTS if cuda else CPU_VARIANTS)).split(",")
    interleave = (not cuda) if interleave is None else interleave
    if cuda and not peak_tflops and any(k in torch.cuda.get_device_name(0) for k in ("H100", "H200")):
        peak_tflops = 989.0  # dense bf16 tensor-core peak of an SXM H100/H200
    stem = f"train_throughput_{device.split(':')[0]}{'_' + tag if tag else ''}"
    all_results, flops = [], {}
    for name in configs:
        model, batch = preset(name, REPO)
        flops[name] = conv_flops_per_image(GlowConfig(**model))["train"]
        specs = [BenchSpec(name, model, batch_size or batch, v, device, threads, warmup, steps) for v in variants]

        def partial(done, prev=list(all_results)):
            write_report(prev + done, out_dir, stem, "Training throughput", device, flops, peak_tflops or None)

        all_results += run_variants(specs, repeats, interleave, on_result=partial)
        json_path, md_path = write_report(all_results, out_dir, stem, "Training throughput", device, flops,
                                          peak_tflops or None)
        click.echo(md_path.read_text().split("\n\n", 2)[-1])
    click.echo(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
