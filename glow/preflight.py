"""The checks slurm/submit.sh runs on the login node before it submits anything.

Every check is what a job would do first, run here so that a mistake surfaces in seconds, not
after the queue wait, and nothing is submitted or written under the run:

    run root        the run directory's parent is a writable directory (exit 2)
    config          the config file with every override, as `train.py --dry-run` resolves it (2)
    launcher        accelerate is importable by the jobs' Python (2)
    training data   the training split's manifest exists, is complete and fits the model's
                    resolution and channels: the trainer's own start-up check (4)
    time limit      --time against the time to the first checkpoint: refused when the preemption
                    signal (--signal-lead seconds before the limit) would come before training
                    can start; a warning when this run's measured speed (metrics.jsonl of an
                    earlier attempt) puts the first periodic checkpoint past the signal (2)
    checkpoint      evaluation without training: the run has a complete checkpoint (5)
    evaluation data every split a shape task scores (--split) exists, is complete and fits the
                    model (channels unless --convert-channels): evaluate.py's own check (4)
    FID weights     the Inception weights file, when FID is among the tasks (5)
    dumps           figures without evaluation: the dumps of --in and every --ood exist at the
                    newest evaluated step (4)

    python -m glow.preflight --run-dir runs/NAME --stages train,eval,figures --config YAML \\
        [--data-root DIR] [--split DATASET/SPLIT]... [--convert-channels] [--fid] [--time LIMIT] \\
        [--signal-lead S] [--in SPEC --ood SPEC...] [KEY=VALUE]...

Passed checks are listed on stderr (``preflight: ...``), warnings as ``warning: ...``; the first
failure ends with one line ``error (exit N): <message>; nothing submitted`` and the user error's
exit code N. Nothing is written. Torch is imported only by the data checks (the shard checks
live beside the streams).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from glow.errors import (
    BadArgument,
    CheckpointMismatch,
    CheckpointMissing,
    ResultsMissing,
    UserError,
)
from glow.files import open_nofollow
from glow.run import Run, resolve_checkpoint

__all__ = ["STARTUP_S", "main", "parse_slurm_time", "seconds_per_step", "time_limit_check"]

log = logging.getLogger(__name__)

STAGES = ("train", "eval", "figures")
STARTUP_S = 120  # assumed start-up of a training job (imports, process group, data, first step)
METRICS_TAIL_BYTES = 64 << 10  # the end of metrics.jsonl: the last records of the last attempt


def parse_slurm_time(value: str) -> int | None:
    """Seconds in a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``); None for an unlimited one. BadArgument when it is none of these."""
    text = value.strip()
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days, _, clock = text.rpartition("-") if "-" in text else ("", "", text)
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        raise BadArgument(f"time limit {value!r} (GLOW_TIME) is not a Slurm time: use MM, HH:MM:SS or D-HH:MM:SS")
    nums = [int(p) for p in parts]
    if days:
        hours, minutes, seconds = (nums + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(nums) == 3:
        return (nums[0] * 60 + nums[1]) * 60 + nums[2]
    return nums[0] * 60 + (nums[1] if len(nums) == 2 else 0)


def seconds_per_step(run: Run) -> float | None:
    """This run's measured seconds per optimizer step (the last record of metrics.jsonl with a
    speed: global batch = images_seen / step, over images_per_s); None when never trained."""
    try:
        fd = open_nofollow(run.metrics_path)
    except (FileNotFoundError, UserError):
        return None
    with os.fdopen(fd, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - METRICS_TAIL_BYTES))
        lines = handle.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
            step, seen, speed = int(record["step"]), float(record["images_seen"]), float(record["images_per_s"])
        except (ValueError, KeyError, TypeError):
            continue
        if step > 0 and seen > 0 and speed > 0:
            return seen / step / speed
    return None


def time_limit_check(limit_s: int | None, lead_s: int, checkpoint_every: int,
                     step_s: float | None) -> str | None:
    """A warning (or None) for a training job with a time limit of ``limit_s`` seconds whose
    preemption signal comes ``lead_s`` seconds before it; BadArgument when no training can happen."""
    if limit_s is None:
        return None
    usable = limit_s - lead_s
    if usable < STARTUP_S:
        raise BadArgument(
            f"time limit {limit_s} s (GLOW_TIME) leaves {usable} s before the preemption signal (USR1, "
            f"{lead_s} s before the limit), less than a training start-up (~{STARTUP_S} s): no attempt could "
            f"reach a checkpoint; ask for at least {lead_s + STARTUP_S + 60} s")
    if step_s is None:
        return None
    first = STARTUP_S + checkpoint_every * step_s
    if first > usable:
        return (f"at this run's measured {step_s:.2f} s a step, the first periodic checkpoint (train.checkpoint_every="
                f"{checkpoint_every}) comes after ~{first:.0f} s, past the preemption signal at {usable} s: every "
                "attempt will end on the signal's checkpoint; lower train.checkpoint_every or raise GLOW_TIME")
    return None


class Preflight:
    """The checks of one submission, run in order; the first failure raises its UserError."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run = Run(args.run_dir)
        self.stages = set(args.stages)
        self.passed: list[str] = []
        self.warnings: list[str] = []
        self.model = None  # the architecture config (GlowConfig | TabularFlowConfig) of the model to evaluate
        self.data_root: str | None = args.data_root

    def ok(self, what: str) -> None:
        self.passed.append(what)
        sys.stderr.write(f"{self.args.prefix}preflight: {what}\n")

    def run_all(self) -> None:
        self.run_root()
        if "train" in self.stages:
            self.training()
        if "eval" in self.stages:
            self.evaluation()
        elif "figures" in self.stages:
            self.dumps()

    def run_root(self) -> None:
        path = self.run.path
        if os.path.lexists(path):
            if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
                raise BadArgument(f"run directory {path} is not a directory this user can write")
            self.ok(f"run directory {path} exists and is writable")
            return
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise BadArgument(f"cannot create run directory {path}: {parent} is not a directory this user can write "
                              "(GLOW_RUN_ROOT in slurm/env.sh)")
        self.ok(f"run root writable ({parent})")

    def launcher(self) -> None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise BadArgument(f"accelerate is not installed for {sys.executable}, the Python the jobs run: "
                              "install the project into the venv of slurm/env.sh (README, On a cluster)")
        self.ok("accelerate importable")

    def training(self) -> None:
        from glow.config import load_config

        a = self.args
        cfg = load_config(a.config, [*a.overrides, f"run.name={self.run.name}", f"run.root={self.run.path.parent}"])
        self.ok(f"config {a.config} with {len(a.overrides)} override(s)")
        self.launcher()
        self.time_limit(cfg.train.checkpoint_every)
        from glow.training.batches import training_data

        self.model = cfg.model
        self.data_root = self.data_root or cfg.data.root
        training_data(cfg).check()  # as the trainer checks: first the kind of data the split holds
        self.shards(cfg.data.root, f"{cfg.data.dataset}/{cfg.data.split}", convert=False, what="training")

    def time_limit(self, checkpoint_every: int) -> None:
        a = self.args
        limit = parse_slurm_time(a.time) if a.time else None
        warning = time_limit_check(limit, a.signal_lead, checkpoint_every, seconds_per_step(self.run))
        if warning:
            self.warnings.append(warning)
            sys.stderr.write(f"{a.prefix}warning: {warning}\n")
        if limit is not None:
            self.ok(f"time limit {a.time} ({limit} s) leaves room for start-up before the preemption signal")

    def shards(self, root: str, spec: str, *, convert: bool, what: str) -> None:
        from glow.data.streams import check_channels, read_manifest

        dataset, split = spec.split("/", 1)
        if self.model.kind == "tabular":  # a flow on feature vectors: vector shards of its dimension
            from glow.features.streams import vector_manifest

            manifest = vector_manifest(root, dataset, split, self.model.dim)
            self.ok(f"{what} vectors {spec} under {root} ({manifest['count']} of dimension {manifest['dim']})")
            return
        manifest = read_manifest(root, dataset, split)
        check_channels(manifest, Path(root) / dataset / split, self.model.in_channels, convert, self.model.image_size)
        self.ok(f"{what} shards {spec} under {root} ({manifest.get('count', '?')} images, fit the model)")

    def evaluation(self) -> None:
        a = self.args
        if "train" not in self.stages:
            self.launcher()
            checkpoint = resolve_checkpoint(self.run.path)
            meta = checkpoint.meta()
            from glow.model import model_config

            try:
                self.model = model_config(meta.get("model_config", {}))
            except (ValueError, TypeError) as err:
                raise CheckpointMismatch(f"{checkpoint.meta_path}: its model_config cannot be read ({err}); the "
                                         "checkpoint was written by an incompatible version") from None
            self.data_root = self.data_root or meta.get("data", {}).get("root")
            self.ok(f"checkpoint {checkpoint.path} is complete")
        for spec in a.split:
            if self.data_root is None:
                raise CheckpointMissing(f"{spec}: no data root (give --data-root)")
            self.shards(self.data_root, spec, convert=a.convert_channels, what="evaluation")
        if a.fid:
            from glow.evaluation.fid import inception_weights_path

            self.ok(f"FID Inception weights {inception_weights_path(a.inception_weights)}")

    def dumps(self) -> None:
        a = self.args
        step = self.run.eval_step()
        missing = [spec for spec in [a.in_spec, *a.ood] if spec and not self.run.dump_path(step, spec).is_file()]
        if missing:
            raise ResultsMissing(f"no dump of {', '.join(missing)} under {self.run.eval_dir(step)}: the figures need "
                                 "them; submit the evaluation too (--only eval,figures)")
        self.ok(f"dumps of {a.in_spec} and {len(a.ood)} OOD split(s) at step {step}")


def _stages(value: str) -> list[str]:
    stages = [s for s in value.split(",") if s]
    if not stages or any(s not in STAGES for s in stages):
        raise argparse.ArgumentTypeError(f"stages are a comma list of {', '.join(STAGES)}")
    return stages


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glow.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--prefix", default="", help="put before every line (e.g. 'submit.sh: ')")
    parser.add_argument("--stages", type=_stages, default=list(STAGES))
    parser.add_argument("--config")
    parser.add_argument("--data-root")
    parser.add_argument("--split", action="append", default=[], metavar="DATASET/SPLIT",
                        help="a split a shape task (dump, bpd, fid, latents) scores, repeatable")
    parser.add_argument("--convert-channels", action="store_true")
    parser.add_argument("--fid", action="store_true", help="FID is among the tasks")
    parser.add_argument("--inception-weights")
    parser.add_argument("--time", default="", help="the training job's time limit (Slurm format; empty: none)")
    parser.add_argument("--signal-lead", type=int, default=300, help="seconds between USR1 and the time limit")
    parser.add_argument("--in", dest="in_spec")
    parser.add_argument("--ood", action="append", default=[])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if "train" in args.stages and not args.config:
        parser.error("--config is needed when training is among the stages")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checks = Preflight(args)
    started = time.perf_counter()
    try:
        checks.run_all()
    except UserError as err:
        sys.stderr.write(f"{args.prefix}error (exit {err.exit_code}): {' '.join(str(err).splitlines()).rstrip('.')}; "
                         "nothing submitted\n")
        return err.exit_code
    sys.stderr.write(f"{args.prefix}preflight: {len(checks.passed)} checks passed in "
                     f"{time.perf_counter() - started:.1f} s"
                     f"{f', {len(checks.warnings)} warning(s)' if checks.warnings else ''}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
