"""One evaluation job: resolve the checkpoint, decide what is left, run the tasks, report them.

`evaluate` is what `eval/evaluate.py` runs on every process of a job: rank 0 resolves the
checkpoint (``latest`` of a run that is still training moves) and reads its weights, every rank
builds the model from those same bytes and a digest check proves it; rank 0 then applies the
skip rule (`glow.evaluation.records`) and the others follow, so no rank takes a collective the
others skip. `check_done` applies the same rule without a model or a process group (for
schedulers: `eval/evaluate.py --check-done`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from glow.errors import CheckpointMismatch, CheckpointMissing
from glow.evaluation import tasks
from glow.evaluation.tasks import EvalContext, EvalOptions
from glow.run import Checkpoint, resolve_checkpoint

__all__ = ["check_done", "evaluate", "track_results"]

log = logging.getLogger(__name__)


def check_done(checkpoint: str | Path, options: EvalOptions) -> tuple[list[str], Path]:
    """(what is left to compute, the evaluation folder): empty when every requested result
    exists under the same settings. Loads no model and starts no process group."""
    ckpt = resolve_checkpoint(checkpoint)
    ckpt.run.check_trusted(options.allow_shared)
    ctx = EvalContext(checkpoint=ckpt, meta=ckpt.meta(), options=options)
    tasks.check_eval_data(ctx)
    if options.force:
        return ["everything (--force)"], ctx.out_dir
    return [r.what for r in tasks.requested_results(ctx) if not r.done()], ctx.out_dir


def _load_on_main(spec: str | Path, options: EvalOptions, accelerator):
    """(checkpoint, meta, model): rank 0 resolves ``spec``, checks the data against its model and
    reads the weights file once; every rank builds the model from those bytes, and the weights
    digests of all ranks must agree (exit 5)."""
    from safetensors.torch import load as weights_from_bytes

    from glow.checkpoint import MAX_WEIGHTS_BYTES, model_of
    from glow.distributed import on_main, replica_digests
    from glow.files import read_bytes

    def read() -> tuple[str, dict, bytes]:
        ckpt = resolve_checkpoint(spec)
        ckpt.run.check_trusted(options.allow_shared)  # glow.trust: before anything is read or written
        meta = ckpt.meta()
        tasks.check_eval_data(EvalContext(checkpoint=ckpt, meta=meta, options=options))
        try:
            return str(ckpt.path), meta, read_bytes(ckpt.model_path, MAX_WEIGHTS_BYTES)
        except FileNotFoundError:
            raise CheckpointMissing(f"{ckpt.model_path} is missing: the checkpoint is damaged; use an earlier one") \
                from None

    path, meta, blob = on_main(read, accelerator.num_processes, accelerator.process_index)
    model = model_of(meta, Checkpoint.at(path).meta_path)  # a Glow or a flow on vectors, by model.kind
    model.load_state_dict(weights_from_bytes(blob))
    digests = replica_digests(model.state_dict(), accelerator)  # in the model's own (fixed) order
    if len(set(digests)) != 1:
        raise CheckpointMismatch(f"the processes loaded different weights from {path} (digests {digests}); "
                                 "rerun the evaluation")
    return Checkpoint.at(path), {**meta, "weights_digest": digests[0]}, model


def evaluate(checkpoint: str | Path, options: EvalOptions) -> None:
    """Run the requested tasks on every process of the job, then report the results (rank 0)."""
    from glow.distributed import finish, launcher_precision, make_accelerator, on_main
    from glow.logs import setup_logging
    from glow.tracking import run_tracker

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    ckpt, meta, model = _load_on_main(checkpoint, options, accelerator)
    ctx = EvalContext(checkpoint=ckpt, meta=meta, options=options, model=model.to(accelerator.device).eval(),
                      rank=rank, world_size=world, device=accelerator.device)
    ctx.share_manifests()
    setup_logging(ctx.out_dir if ctx.is_main else None, ctx.is_main, rank)
    log.info("checkpoint %s (step %d, weights %s), %d process(es), tasks %s", ckpt.path, ctx.step,
             meta["weights_digest"], world, ", ".join(options.tasks))
    if launcher_precision() != "no":
        log.warning("the launcher asks for mixed precision %r: evaluation scores in fp32 regardless",
                    launcher_precision())

    def decide() -> set[str]:
        return {r.what for r in tasks.requested_results(ctx) if options.force or not r.done()}

    ctx.todo = on_main(decide, world, rank)
    for task in options.tasks:
        if task in ("dump", "bpd"):
            for dataset, split in options.specs:
                tasks.run_bpd(ctx, dataset, split, dump=task == "dump")
        elif task == "samples":
            tasks.run_samples(ctx)
        elif task == "fid":
            for dataset, split in options.specs:
                tasks.run_fid(ctx, dataset, split)
        elif task == "latents":
            tasks.run_latents(ctx)
    if ctx.is_main:
        detail = " ".join([*options.tasks, *(f"{d}/{s}" for d, s in options.specs)])
        tracker = run_tracker(ckpt.run.path, "eval", ctx.step, detail, logger=options.logger,
                              extra_config={"checkpoint": str(ckpt.path), "tasks": list(options.tasks)})
        kind = tracker.kind if tracker.run is not None else None
        try:
            logged = track_results(tracker, ctx)
        finally:
            tracker.close()
        if logged and kind:
            log.info("logged to %s: %s", kind, ", ".join(logged))
    finish(accelerator)


def track_results(tracker, ctx: EvalContext) -> list[str]:
    """Send this job's results, read back from the evaluation folder, to ``tracker``; returns the keys.

    Read from the files (not from the tasks' return values), so a job whose results were
    already there (skipped) still reports them: bits/dim per split into the run summary,
    per-sample bits/dim of each dump as a histogram, FID per split and temperature, and
    samples.png / latents.png as images.
    """
    from glow.evaluation.dumps import load_dump
    from glow.evaluation.result_tables import read_table

    out, step, tasks, specs = ctx.out_dir, ctx.step, ctx.options.tasks, ctx.options.specs
    logged: list[str] = []
    wanted = {f"{d}/{s}" for d, s in specs}
    if {"dump", "bpd"} & set(tasks):
        for spec, entry in read_table(out / "bpd.json", ctx.own_results).items():
            if spec in wanted:
                tracker.log_summary({f"bpd/{spec}": entry["mean"], f"bpd_std/{spec}": entry["std"]})
                logged.append(f"bpd/{spec}")
    if "dump" in tasks:
        for dataset, split in specs:
            path = ctx.checkpoint.run.dump_path(step, f"{dataset}/{split}")
            if path.is_file():
                tracker.log_histogram(f"bpd_per_sample/{dataset}/{split}", load_dump(path, ctx.own_results).bpd,
                                      step=step)
                logged.append(f"bpd_per_sample/{dataset}/{split}")
    if "fid" in tasks:
        for key, entry in read_table(out / "fid.json", ctx.own_results).items():
            if key.split("@")[0] in wanted:
                tracker.log_summary({f"fid/{key}": entry["fid"]})
                logged.append(f"fid/{key}")
    for task in ("samples", "latents"):
        if task in tasks and (out / f"{task}.png").is_file():
            tracker.log_image(task, out / f"{task}.png", step=step)
            logged.append(task)
    return logged
