"""Stand-in for eval/evaluate.py: writes the contract's output file for one work item."""
import argparse
import json
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--checkpoint", required=True)
p.add_argument("--task", required=True)
p.add_argument("--data", required=True)
p.add_argument("--data-root")
p.add_argument("--force", action="store_true")
p.add_argument("--check-done", action="store_true")
a = p.parse_args()
run = Path(a.checkpoint.split("/checkpoints/")[0])
step = sorted(run.glob("checkpoints/step-*/COMPLETE"))[-1].parent.name
out = run / "eval" / step
if a.check_done:  # the contract: exit 0 when the item's result exists, 3 when there is work
    result = {"dump": out / "dumps" / (a.data.replace("/", "-") + ".npz"), "bpd": out / "bpd.json"}.get(
        a.task, out / f"{a.task}.png")
    raise SystemExit(0 if result.exists() and not a.force else 3)
out.mkdir(parents=True, exist_ok=True)
if a.task == "dump":
    (out / "dumps").mkdir(exist_ok=True)
    (out / "dumps" / (a.data.replace("/", "-") + ".npz")).write_text("stand-in")
elif a.task == "bpd":
    f = out / "bpd.json"   # array tasks may race; fine for a stand-in with one bpd item
    d = json.loads(f.read_text()) if f.exists() else {}
    d[a.data] = {"mean": 1.0}
    f.write_text(json.dumps(d))
else:
    (out / f"{a.task}.png").write_text("stand-in")
