"""glow.report.matrix and `eval/report.py matrix`: the benchmark table of several runs from their dumps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from glow.cli.report import main as report_cli
from glow.evaluation import dumps
from glow.report import matrix
from glow.report import scores as ood
from glow.run import Run
from tests.helpers.fake_runs import STEP, point, write_dump


def make_run(root: Path, name: str, in_dataset: str, sets: dict[str, float], seed: int) -> Path:
    """A run trained on ``in_dataset`` with test dumps of mean bits/dim per set (and a train dump)."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"run:\n  name: {name}\ndata:\n  dataset: {in_dataset}\n  split: train\n")
    step_dir = run / "eval" / f"step-{STEP:08d}"
    ckpt = str(run / "checkpoints" / f"step-{STEP:08d}")
    write_dump(step_dir, in_dataset, "train", rng.normal(sets[in_dataset], 0.2, 80), model_hash=name, checkpoint=ckpt)
    for ds, mean in sets.items():
        write_dump(step_dir, ds, "test", rng.normal(mean, 0.25, 30 + len(ds)), model_hash=name, checkpoint=ckpt)
    return run


@pytest.fixture
def two_runs(tmp_path):
    gray = make_run(tmp_path / "runs", "fmnist", "fashion-mnist", {"fashion-mnist": 2.9, "mnist": 2.0}, 0)
    rgb = make_run(tmp_path / "runs", "cifar", "cifar10", {"cifar10": 3.4, "svhn": 2.2, "mnist": 1.5}, 1)
    return gray, rgb


def _cli(args: list[str]):
    return CliRunner().invoke(report_cli, args)


def load(run: Path, spec: str) -> dumps.Dump:
    return dumps.load_dump(Run(run).dump_path(STEP, spec))


def test_matrix_cli_gives_the_aurocs_of_glow_ood(two_runs, tmp_path):
    gray, rgb = two_runs
    specs = ["mnist/test", "svhn/test", "cifar10/test", "fashion-mnist/test"]
    res = _cli(["matrix", "--run", str(gray), "--run", str(rgb), *sum((["--ood", s] for s in specs), []),
                "--out", str(tmp_path / "m"), "--bootstrap", "40"])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert table["ood_sets"] == specs and [r["label"] for r in table["rows"]] == ["fmnist", "cifar"]
    assert [r["in_distribution"] for r in table["rows"]] == ["fashion-mnist/test", "cifar10/test"]
    for row, run in zip(table["rows"], (gray, rgb)):
        d_in = load(run, row["in_distribution"])
        for spec in specs:
            cell = row["cells"][spec]
            if spec == row["in_distribution"] or not Run(run).dump_path(STEP, spec).is_file():
                assert cell is None
                continue
            d_out = load(run, spec)
            assert point(cell["log_likelihood"]) == ood.ood_metrics(d_in.log_p, d_out.log_p)
            assert cell["complexity_corrected"]["auroc"] == ood.ood_metrics(
                ood.complexity_corrected_score(d_in.bpd, d_in.complexity_bpd),
                ood.complexity_corrected_score(d_out.bpd, d_out.complexity_bpd))["auroc"]
            assert "png_complexity" in cell and "typicality_m25" in cell  # every score of ood.json
    grid = matrix.auroc_grid(table)
    assert grid.shape == (2, 4) and np.isnan(grid[0, 1]) and np.isnan(grid[0, 3]) and np.isnan(grid[1, 2])
    assert grid[1, 0] == table["rows"][1]["cells"]["mnist/test"]["log_likelihood"]["auroc"]
    md = (tmp_path / "m" / "matrix.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| cifar (cifar10/test)"))
    low, high = table["rows"][1]["cells"]["mnist/test"]["log_likelihood"]["intervals"]["auroc"]
    assert f"{grid[1, 0]:.3f} [{low:.3f}, {high:.3f}]" in row and "(in)" in row
    assert table["intervals"]["n_resamples"] == 40 and "40 resamples" in md
    assert "| fmnist (fashion-mnist/test) |" in md and "missing" in md and "## AUROC of `complexity_corrected`" in md
    assert "no dump for svhn/test" in md and "--data svhn/test" in md
    with Image.open(tmp_path / "m" / "matrix.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    assert f"{grid[1, 0]:.3f} [{low:.3f}, {high:.3f}]" in res.output  # the headline table
    # the heatmap shows the point value alone
    assert matrix.format_cell(table["rows"][1], "mnist/test", "log_likelihood", detail=False) == f"{grid[1, 0]:.3f}"


def test_matrix_other_score_explicit_in_sets_and_errors(two_runs, tmp_path):
    gray, rgb = two_runs
    res = _cli(["matrix", "--run", f"{gray}=fashion-mnist/train", "--run", str(rgb), "--ood", "mnist/test",
                "--score", "complexity_corrected", "--out", str(tmp_path / "m"), "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert table["rows"][0]["in_distribution"] == "fashion-mnist/train"
    expected = ood.ood_metrics(*(ood.complexity_corrected_score(d.bpd, d.complexity_bpd)
                                 for d in (load(gray, "fashion-mnist/train"), load(gray, "mnist/test"))))
    assert matrix.auroc_grid(table)[0, 0] == expected["auroc"]
    res = _cli(["matrix", "--run", str(gray), "--ood", "mnist/test", "--score", "nonsense", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "'nonsense' is in no cell" in res.output and "log_likelihood" in res.output
    (gray / "config.yaml").unlink()
    res = _cli(["matrix", "--run", str(gray), "--ood", "mnist/test", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "config.yaml not found" in res.output and "=DATASET/SPLIT" in res.output


def test_matrix_groups_seeds_into_one_row(tmp_path):
    runs = [make_run(tmp_path / "runs", f"cifar-s{k}", "cifar10", {"cifar10": 3.4, "svhn": 2.2 + 0.3 * k}, k)
            for k in range(2)]
    for k, run in enumerate(runs):
        (run / "config.yaml").write_text(f"run:\n  name: {run.name}\ndata:\n  dataset: cifar10\ntrain:\n  seed: {k}\n")
    out = tmp_path / "m"
    res = _cli(["matrix", *(a for r in runs for a in ("--run", str(r))), "--ood", "svhn/test", "--out", str(out),
                "--bootstrap", "0", "--group-seeds"])
    assert res.exit_code == 0, res.output
    table = json.loads((out / "matrix.json").read_text())
    [row] = table["rows"]
    assert row["label"] == "cifar" and row["runs"] == ["cifar-s0", "cifar-s1"]
    aurocs = [ood.ood_metrics(load(r, "cifar10/test").log_p, load(r, "svhn/test").log_p)["auroc"] for r in runs]
    cell = row["cells"]["svhn/test"]["log_likelihood"]
    assert cell["auroc"] == pytest.approx(np.mean(aurocs)) and cell["seeds"]["auroc"]["n"] == 2
    assert list(cell["seeds"]["auroc"]["values"].values()) == aurocs
    assert set(row["per_run"]) == {"cifar-s0", "cifar-s1"}
    std = np.std(aurocs, ddof=1)
    assert f"{np.mean(aurocs):.3f} ± {std:.3f} (N=2)" in (out / "matrix.md").read_text()
    assert f"{np.mean(aurocs):.3f} ± {std:.3f} (N=2)" in res.output
    assert matrix.auroc_grid(table)[0, 0] == pytest.approx(np.mean(aurocs))  # the heatmap: the mean
    assert matrix.format_cell(row, "svhn/test", "log_likelihood", detail=False) == f"{np.mean(aurocs):.3f}"
    # another recipe under a seed's name is refused, naming the key
    (runs[1] / "config.yaml").write_text("run:\n  name: cifar-s1\ndata:\n  dataset: cifar10\ntrain:\n  seed: 1\n"
                                         "optim:\n  lr: 0.1\n")
    res = _cli(["matrix", *(a for r in runs for a in ("--run", str(r))), "--ood", "svhn/test", "--out", str(out),
                "--group-seeds"])
    assert res.exit_code == 2 and "optim.lr" in res.output
