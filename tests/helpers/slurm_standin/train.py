"""Stand-in for train/train.py with the contract's CLI, for testing the Slurm templates.

    accelerate launch ... tests/helpers/slurm_standin/train.py --config X.yaml [key=value ...] [--no-resume]

Keys: run.name, run.root (run dir = root/name), train.steps (20), train.step_seconds (0.2),
train.ckpt_every (5), train.save_on_stop (1; 0 stops without a checkpoint: an attempt that
makes no progress). A tiny DDP linear model trained on data drawn from (seed, step, rank),
so a resumed run ends with the same weights as an uninterrupted one. Checkpoints:
<run>/checkpoints/step-%08d/{state.pt, COMPLETE}. On SIGUSR1/SIGTERM or <run>/STOP it saves a
checkpoint, writes <run>/STOPPED ("<step> <reason>"), removes STOP and exits 0, as the real
trainer does. Rank r writes <run>/rank-r.json at the end. RUNNING and running-<restart> mark
that an attempt reached its training loop.
"""

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

STOP = {"flag": False, "reason": "STOP-file"}


def main(argv):
    assert argv[0] == "--config" and Path(argv[1]).is_file(), f"bad args {argv}"
    cfg = dict(a.split("=", 1) for a in argv[2:] if "=" in a)
    run_dir = Path(cfg.get("run.root", "runs")) / cfg["run.name"]
    steps, dt, every = int(cfg.get("train.steps", 20)), float(cfg.get("train.step_seconds", 0.2)), \
        int(cfg.get("train.ckpt_every", 5))
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda n, _: STOP.update(flag=True, reason=signal.Signals(n).name))
    acc = Accelerator()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    ckpts = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    start = 0
    if ckpts and "--no-resume" not in argv:
        state = torch.load(ckpts[-1].parent / "state.pt")
        acc.unwrap_model(model).load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]

    def save(step):
        d = run_dir / "checkpoints" / f"step-{step:08d}"
        if acc.is_main_process:
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"model": acc.unwrap_model(model).state_dict(), "opt": opt.state_dict(),
                        "step": step}, d / "state.pt")
            (d / "COMPLETE").touch()
        acc.wait_for_everyone()

    if acc.is_main_process:
        (run_dir / "STOPPED").unlink(missing_ok=True)
        stop = run_dir / "STOP"  # as the real trainer: a STOP older than this attempt is stale
        if stop.exists() and stop.stat().st_mtime < float(os.environ.get("GLOW_ATTEMPT_START", "0")):
            stop.unlink()
        (run_dir / "RUNNING").touch()
        (run_dir / f"running-{os.environ.get('SLURM_RESTART_COUNT', '0')}").touch()  # a gate per attempt
    save_on_stop = cfg.get("train.save_on_stop", "1") == "1"
    step = start
    while step < steps:
        g = torch.Generator().manual_seed(1000 * step + acc.process_index)
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
        step += 1
        time.sleep(dt)
        stop = torch.tensor([float(STOP["flag"] or (run_dir / "STOP").exists())])
        stop = acc.reduce(stop, reduction="sum").item() > 0
        if step % every == 0 or (stop and save_on_stop) or step == steps:
            save(step)
        if stop and step < steps:
            if acc.is_main_process:
                (run_dir / "STOPPED").write_text(f"{step} {STOP['reason']}\n")
                (run_dir / "STOP").unlink(missing_ok=True)
            sys.exit(0)
    w = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()])
    (run_dir / f"rank-{acc.process_index}.json").write_text(json.dumps({
        "world_size": acc.num_processes, "start": start, "weights": w.tolist(),
        "host": socket.gethostname(), "node_id": os.environ.get("SLURM_NODEID"),
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}))


if __name__ == "__main__":
    main(sys.argv[1:])
