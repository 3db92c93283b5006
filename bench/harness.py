"""Throughput and memory of Glow training steps and evaluation passes (bench/*.py drive it).

It lives beside the benchmark scripts because nothing in `glow/` uses it.

Every variant runs in its own fresh process (spawned), so that its peak memory is its own
and compile caches, thread pools and TF32 switches do not leak between variants. With
`interleave=True` all workers are alive at once and the driver asks each in turn for one
timed repeat, round after round: on a shared, noisy machine the variants see the same
load, and ratios are taken within a round (median over rounds). Warm-up (and compilation)
happens before the first round and is reported separately.

Memory, honestly stated:
- CUDA: `torch.cuda.max_memory_allocated` during one extra step after the timed repeats
  (peak) and `memory_allocated` before that step (baseline: parameters, gradients,
  optimizer state).
- CPU: the process's resident set during one extra step after the timed repeats. glibc
  is then told (mallopt) to serve every block >= 128 KiB by mmap and to unmap it on free,
  and the heap is trimmed, so the resident set follows the live tensors rather than the
  allocator's cache; the high-water mark is reset (`/proc/self/clear_refs` = 5), the
  baseline is VmRSS before the step, the peak VmHWM after it. (Not during the timed
  repeats: an mmap per allocation costs page faults.)
"delta" = peak - baseline = the step's transient memory: activations kept for backward,
gradients, temporaries, workspaces.

Variant names are '+'-joined tokens: eager (plain fp32), tf32, bf16 (autocast of the
coupling networks), channels_last, compile, checkpointing; for evaluation also
train_step, train_forward, eval_no_grad, eval_fast (inference mode + cached weights).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glow.files import atomic_write_json, atomic_write_text
from glow.model import Glow, GlowConfig

__all__ = ["BenchSpec", "conv_flops_per_image", "markdown_table", "preset", "run_variants"]

TOKENS = {"eager", "tf32", "bf16", "channels_last", "compile", "checkpointing",
          "train_step", "train_forward", "eval_no_grad", "eval_fast"}


@dataclass
class BenchSpec:
    name: str
    model: dict
    batch_size: int
    variant: str = "eager"
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    warmup: int = 3
    steps: int = 3  # per timed repeat
    extra: dict = field(default_factory=dict)


def preset(name: str, repo: Path) -> tuple[dict, int]:
    """(GlowConfig fields, images per forward on one process) of a named benchmark configuration.

    demo, celeba32, celeba64 come from train/configs/*.yaml; celeba32-reduced is celeba32
    with hidden_channels=128 and steps_per_level=8 (a CPU-sized model of the same shape).
    """
    import yaml

    base = {"celeba32-reduced": "celeba32"}.get(name, name)
    path = repo / "train" / "configs" / f"{base}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown benchmark config {name!r}: {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    model = dict(raw.get("model", {}))
    if name == "celeba32-reduced":
        model.update(hidden_channels=128, steps_per_level=8)
    train = raw.get("train", {})  # one process's batch: the micro-batch cap, else the whole global batch
    return model, int(train.get("micro_batch_size") or train.get("global_batch_size", 64))


def conv_flops_per_image(config: GlowConfig) -> dict[str, float]:
    """Analytic FLOPs (2 x multiply-adds) of the coupling convolutions for one image.

    Forward: conv3x3 (C/2 -> h), conv1x1 (h -> h), zero conv3x3 (h -> C or C/2) per step.
    A training step costs 3x forward (forward, grad of inputs, grad of weights).
    """
    c, size, h = config.in_channels, config.image_size, config.hidden_channels
    out_factor = 2 if config.coupling == "affine" else 1
    total = 0.0
    for level in range(config.n_levels):
        c, size = c * 4, size // 2
        n_a, n_b = c // 2, c - c // 2
        per_pixel = n_a * h * 9 + h * h + h * out_factor * n_b * 9
        total += config.steps_per_level * 2.0 * per_pixel * size * size
        if level < config.n_levels - 1:
            c = c // 2
    return {"forward": total, "train": 3.0 * total}


# -- worker side --------------------------------------------------------------------------
def _mem_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


class _Runner:
    def __init__(self, spec: BenchSpec):
        from glow.model.performance import apply_fast_paths, fast_eval

        tokens = set(spec.variant.split("+"))
        unknown = tokens - TOKENS
        if unknown:
            raise ValueError(f"unknown variant tokens {sorted(unknown)} in {spec.variant!r}; known: {sorted(TOKENS)}")
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec, self.tokens = spec, tokens
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            tf32 = "tf32" in tokens
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        config = GlowConfig(**spec.model)
        self.config = config
        model = Glow(config).to(self.device)
        shape = (spec.batch_size, config.in_channels, config.image_size, config.image_size)
        self.x = torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device)
        with torch.no_grad():
            model.log_prob(self._y())  # ActNorm init
        self.model = apply_fast_paths(model, channels_last="channels_last" in tokens,
                                      checkpointing="checkpointing" in tokens, compile="compile" in tokens)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.mode = next((t for t in ("train_forward", "eval_no_grad", "eval_fast") if t in tokens), "train_step")
        self._eval_ctx = None
        if self.mode == "eval_fast":
            self._eval_ctx = fast_eval(model)
            self._eval_ctx.__enter__()
        elif self.mode == "eval_no_grad":
            model.eval()

    def _y(self) -> torch.Tensor:
        from glow.model.likelihood import preprocess

        return preprocess(self.x, self.config.n_bits, torch.rand(self.x.shape, device=self.device))

    def step(self) -> None:
        from glow.model.likelihood import bits_per_dim

        y = self._y()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled="bf16" in self.tokens)
        if self.mode == "eval_fast":
            with autocast:
                self.model(y)
            return
        if self.mode == "eval_no_grad":
            with torch.no_grad(), autocast:
                self.model(y)
            return
        with autocast:
            log_p = self.model(y)
        loss = bits_per_dim(log_p.float(), self.config.n_dims, self.config.n_bits).mean()
        if self.mode == "train_forward":
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 50.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.spec.warmup):
            self.step()
        self._sync()
        return time.perf_counter() - t0

    def timed(self) -> dict:
        t0 = time.perf_counter()
        for _ in range(self.spec.steps):
            self.step()
        self._sync()
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "images_per_s": self.spec.steps * self.spec.batch_size / seconds}

    def memory(self) -> dict:
        """Peak memory of one step, measured after (and apart from) the timed repeats."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
            self.step()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            _malloc_follow_live_memory()
            Path("/proc/self/clear_refs").write_text("5")
            baseline = _mem_status()["VmRSS"] * 1024
            self.step()
            peak = _mem_status()["VmHWM"] * 1024
        return {"baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20, "delta_mb": (peak - baseline) / 2**20}


def _malloc_follow_live_memory() -> None:
    """glibc: serve blocks >= 128 KiB by mmap and unmap them on free, then trim the heap.

    Makes the resident set follow live tensors. Only for the memory step: mmap per
    allocation costs page faults, so it is switched on after the timed repeats.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)
    libc.malloc_trim(0)


def _worker(conn, spec_dict: dict) -> None:
    try:
        runner = _Runner(BenchSpec(**spec_dict))
        conn.send({"ready": True, "warmup_s": runner.warmup()})
        while True:
            command = conn.recv()
            if command == "stop":
                break
            conn.send(runner.memory() if command == "memory" else runner.timed())
    except BaseException as err:  # report, do not hang the driver
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


# -- driver side --------------------------------------------------------------------------
class _Worker:
    def __init__(self, ctx, spec: BenchSpec):
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, asdict(spec)), daemon=True)
        self.proc.start()
        child.close()
        self.ready = self._recv()

    def _recv(self) -> dict:
        message = self.conn.recv()
        if "error" in message:
            self.stop()
            raise RuntimeError(f"benchmark variant {self.spec.variant!r} ({self.spec.name}) failed: {message['error']}")
        return message

    def repeat(self) -> dict:
        self.conn.send("run")
        return self._recv()

    def memory(self) -> dict:
        self.conn.send("memory")
        return self._recv()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()


def _summary(spec: BenchSpec, warmup_s: float, rounds: list[dict], memory: dict) -> dict:
    ips = [r["images_per_s"] for r in rounds]
    return {
        "config": spec.name, "variant": spec.variant, "device": spec.device, "batch_size": spec.batch_size,
        "model": spec.model, "warmup_s": warmup_s, "repeats": len(rounds), "steps_per_repeat": spec.steps,
        "images_per_s": statistics.median(ips), "images_per_s_all": ips,
        **memory,
    }


def run_variants(specs: list[BenchSpec], repeats: int, interleave: bool = True, on_result=None) -> list[dict]:
    """Median images/s and memory of each spec; with a paired ratio to the first spec."""
    ctx = mp.get_context("spawn")
    results: list[dict] = []
    if interleave:
        workers = []
        try:
            for spec in specs:  # warm up one at a time: compile does not compete with anything
                workers.append(_Worker(ctx, spec))
            rounds: list[list[dict]] = [[] for _ in specs]
            for r in range(repeats):
                order = list(range(len(specs)))
                order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
                for i in order:
                    rounds[i].append(workers[i].repeat())
            memories = [w.memory() for w in workers]
        finally:
            for w in workers:
                w.stop()
        results = [_summary(s, w.ready["warmup_s"], rs, m) for s, w, rs, m in zip(specs, workers, rounds, memories)]
    else:
        for spec in specs:
            worker = _Worker(ctx, spec)
            try:
                rs = [worker.repeat() for _ in range(repeats)]
                memory = worker.memory()
            finally:
                worker.stop()
            results.append(_summary(spec, worker.ready["warmup_s"], rs, memory))
            if on_result is not None:
                on_result(results)
    base = results[0]
    for res in results:
        paired = [a / b for a, b in zip(res["images_per_s_all"], base["images_per_s_all"])]
        res["speed_vs_first"] = statistics.median(paired)
        res["memory_delta_vs_first"] = res["delta_mb"] / base["delta_mb"] if base["delta_mb"] > 0 else math.nan
        res["reference_variant"] = base["variant"]
    return results


def markdown_table(results: list[dict], flops: dict[str, float] | None = None, peak_tflops: float | None = None) -> str:
    head = "| config | variant | batch | images/s (median) | x first | peak MB | delta MB | delta x first | warm-up s |"
    sep = "|" + "---|" * 9
    lines = [head, sep]
    if flops and peak_tflops:
        lines[0] += " conv TFLOP/s | of bf16 peak |"
        lines[1] += "---|---|"
    for r in results:
        row = (f"| {r['config']} | {r['variant']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
               f"{r['speed_vs_first']:.2f} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} | "
               f"{r['memory_delta_vs_first']:.2f} | {r['warmup_s']:.1f} |")
        if flops and peak_tflops and r["config"] in flops:
            tflops = flops[r["config"]] * r["images_per_s"] / 1e12
            row += f" {tflops:.1f} | {tflops / peak_tflops:.1%} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def machine_info(device: str) -> dict:
    import platform

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", flags)
    info["cpu"] = model.group(1) if model else platform.processor()
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx_bf16"] = "amx_bf16" in flags
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_report(results: list[dict], out_dir: Path, stem: str, title: str, device: str,
                 flops: dict[str, float] | None = None, peak_tflops: float | None = None) -> tuple[Path, Path]:
    """`<out_dir>/<stem>.json` and `<stem>.md`; returns both paths."""

    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    payload = {"machine": info, "conv_flops_per_image": flops, "peak_tflops": peak_tflops, "results": results}
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_json(json_path, payload)
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores)"
    text = (f"# {title}\n\n{info['date']}, {where}, torch {info['torch']}. Medians over repeats; "
            "'x first' = median of per-round ratios to the first row of the same config; memory: see "
            "bench/harness.py (one extra step after the timed repeats; CPU: resident-set growth; CUDA: "
            "max_memory_allocated).\n\n"
            + markdown_table(results, flops, peak_tflops))
    atomic_write_text(md_path, text)
    return json_path, md_path
