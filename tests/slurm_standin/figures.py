"""Stand-in for eval/figures.py: checks the dumps exist and writes figures/ood.md."""
import argparse
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--run", required=True)
p.add_argument("--in", dest="ind", required=True)
p.add_argument("--ood", action="append", default=[])
p.add_argument("--train-split", default="train")
p.add_argument("--data-root")
a = p.parse_args()
assert "/" in a.ind, a.ind  # submit.sh passes the in-distribution split itself
dumps = sorted(Path(a.run).glob("eval/step-*/dumps/*.npz"))
assert len(dumps) == 1 + len(a.ood) + (a.train_split != "none"), dumps
(Path(a.run) / "figures").mkdir(exist_ok=True)
(Path(a.run) / "figures" / "ood.md").write_text("\n".join(map(str, dumps)))
