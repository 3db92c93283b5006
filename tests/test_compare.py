"""glow.report.compare and `eval/report.py compare`: the likelihood ratio key by key, refusal of dumps
whose keys differ, one row per (variant, score) in compare.json / compare.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from glow.cli.report import main as report_cli
from glow.errors import EXIT_DATA
from glow.evaluation import dumps
from glow.report import compare, figures
from glow.report import scores as ood
from tests.test_figures import STEP, _cli, write_dump


def make_run(root: Path, name: str, *, shift: float = 0.0, model_hash: str = "m0", perm_seed: int | None = None,
             complexity: bool = True, meta: dict | None = None) -> Path:
    """A run with demo/test (40 samples) and two OOD sets; dumps optionally stored in shuffled order."""
    rng = np.random.default_rng(len(name))
    run = root / name
    step_dir = run / "eval" / f"step-{STEP:08d}"
    checkpoint = run / "checkpoints" / f"step-{STEP:08d}"
    for dataset, n, mean in (("demo", 40, 3.5), ("digits", 30, 3.0), ("gaussian-smooth", 25, 3.8)):
        path = write_dump(step_dir, dataset, "test", rng.normal(mean + shift, 0.2, n), model_hash=model_hash,
                          complexity=complexity, checkpoint=str(checkpoint))
        if perm_seed is not None:  # same samples, another order (e.g. another number of GPUs)
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            perm = np.random.default_rng(perm_seed).permutation(n)
            for k in ("key", "index", "label", "log_p", "bpd", "complexity_bpd"):
                if k in arrays:
                    arrays[k] = arrays[k][perm]
            np.savez(path, **arrays)
    if meta is not None:  # the evaluated checkpoint's meta.json describes the variant
        checkpoint.mkdir(parents=True)
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    return run


def dump(run: Path, dataset: str) -> figures.Dump:
    return dumps.load_dump(run / "eval" / f"step-{STEP:08d}" / "dumps" / f"{dataset}-test.npz")


def test_likelihood_ratio_is_the_difference_key_by_key(tmp_path):
    fg = dump(make_run(tmp_path, "fg"), "demo")
    bg = dump(make_run(tmp_path, "background", perm_seed=3), "demo")
    assert not np.array_equal(fg.key, bg.key)  # stored in another order
    lr = ood.likelihood_ratio(fg, bg)
    bg_by_key = dict(zip(bg.key.tolist(), bg.log_p.tolist()))
    expected = np.array([fg.log_p[i] - bg_by_key[k] for i, k in enumerate(fg.key.tolist())])
    assert lr.shape == fg.log_p.shape
    np.testing.assert_array_equal(lr, expected)


def test_likelihood_ratio_refuses_differing_keys(tmp_path):
    fg_run, bg_run = make_run(tmp_path, "fg"), make_run(tmp_path, "bg")
    fg = dump(fg_run, "demo")
    # the background dump misses samples (e.g. an interrupted evaluation)
    short = write_dump(bg_run / "eval" / f"step-{STEP:08d}", "demo", "test", np.full(35, 3.5))
    with pytest.raises(ValueError, match="keys differ") as err:
        ood.likelihood_ratio(fg, dumps.load_dump(short))
    assert str(fg.path) in str(err.value) and str(short) in str(err.value)
    # same count, other keys
    other = dumps.load_dump(short)
    other.key = np.array([f"x{i}" for i in range(fg.key.size)])
    other.log_p = np.zeros(fg.key.size)
    with pytest.raises(ValueError, match="keys differ"):
        ood.likelihood_ratio(fg, other)
    with pytest.raises(ValueError, match="different splits"):
        ood.likelihood_ratio(fg, dump(bg_run, "digits"))


def test_compare_writes_every_row(tmp_path):
    base = make_run(tmp_path, "demo", meta={"model_config": {"mask": "channel", "coupling_bottleneck": 0}, "perturb_prob": 0.0})
    cycle = make_run(tmp_path, "demo_cycle", shift=0.1, model_hash="m1",
                     meta={"model_config": {"mask": "cycle", "coupling_bottleneck": 0}, "perturb_prob": 0.0})
    bg = make_run(tmp_path, "demo_background", shift=0.3, perm_seed=5, meta={"model_config": {"mask": "channel", "coupling_bottleneck": 0}, "perturb_prob": 0.2})
    oods = ["digits/test", "gaussian-smooth/test"]
    table, files = compare.compare_runs([base, cycle], "demo", oods, background=bg, out_dir=tmp_path / "cmp")
    assert files == [tmp_path / "cmp" / "compare.json", tmp_path / "cmp" / "compare.md"]
    written = json.loads(files[0].read_text())
    assert written == json.loads(json.dumps(table))
    rows = {(r["variant"], r["score"]): r for r in written["rows"]}
    scores = ("log_likelihood", "complexity_corrected", "likelihood_ratio")
    expected = {(v, s) for v in ("demo", "demo_cycle") for s in scores} | {("(PNG size)", "png_complexity")}
    assert set(rows) == expected and len(written["rows"]) == len(expected)
    for row in written["rows"]:
        assert set(row["ood"]) == set(oods)
        for r in row["ood"].values():
            assert {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"} <= set(r)
    # the numbers are those of glow.metrics on the right scores
    d_in, d_out = dump(cycle, "demo"), dump(cycle, "digits")
    assert rows[("demo_cycle", "log_likelihood")]["ood"]["digits/test"] == ood.ood_metrics(d_in.log_p, d_out.log_p)
    lr = rows[("demo_cycle", "likelihood_ratio")]
    assert lr["background"] == "demo_background"
    assert lr["ood"]["digits/test"] == ood.ood_metrics(
        ood.likelihood_ratio(d_in, dump(bg, "demo")), ood.likelihood_ratio(d_out, dump(bg, "digits")))
    for spec in oods:  # recomputed from the dumps: -S(x) = L(x) - bpd(x) and -L(x) (the first run's)
        d_out = dump(cycle, spec.split("/")[0])
        assert rows[("demo_cycle", "complexity_corrected")]["ood"][spec] == ood.ood_metrics(
            d_in.complexity_bpd - d_in.bpd, d_out.complexity_bpd - d_out.bpd)
        b_in, b_out = dump(base, "demo"), dump(base, spec.split("/")[0])
        assert rows[("(PNG size)", "png_complexity")]["ood"][spec] == ood.ood_metrics(
            -b_in.complexity_bpd, -b_out.complexity_bpd)
    assert rows[("demo", "log_likelihood")]["test_bpd"] == pytest.approx(dump(base, "demo").bpd.mean())
    assert written["runs"]["demo_cycle"]["model"]["mask"] == "cycle"
    assert written["background"]["model"]["perturb_prob"] == 0.2
    md = files[1].read_text()
    for (variant, score), row in rows.items():
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {variant} |") and f"| {score} |" in ln)
        for spec in oods:
            assert f"{row['ood'][spec]['auroc']:.4f}" in line


def test_compare_without_complexity_or_background(tmp_path):
    a = make_run(tmp_path, "a", complexity=False)
    b = make_run(tmp_path, "b", complexity=False, model_hash="m1")
    table, _ = compare.compare_runs([a, b], "demo", ["digits/test"])
    assert [(r["variant"], r["score"]) for r in table["rows"]] == [("a", "log_likelihood"), ("b", "log_likelihood")]
    assert (tmp_path / "comparison" / "compare.md").is_file()  # default: beside the runs
    with pytest.raises(ValueError, match="unique"):
        compare.compare_table([compare.load_run_dumps(a, "demo/test", ["digits/test"])] * 2)


def test_cli_compare_and_single_run_usage(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", model_hash="m1")
    bg = make_run(tmp_path, "bg")
    out = tmp_path / "out"
    result = CliRunner().invoke(report_cli, ["compare", "--run", str(a), "--run", str(b), "--background", str(bg),
                                         "--in", "demo", "--ood", "digits/test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "likelihood_ratio" in result.output and (out / "compare.json").is_file()
    # differing keys: a clear error naming the files
    write_dump(bg / "eval" / f"step-{STEP:08d}", "digits", "test", np.full(7, 3.0),
               checkpoint=str(bg / "checkpoints" / f"step-{STEP:08d}"))
    bad = CliRunner().invoke(report_cli, ["compare", "--run", str(a), "--background", str(bg), "--in", "demo",
                                      "--ood", "digits/test", "--out", str(out)])
    assert bad.exit_code == EXIT_DATA and "keys differ" in bad.output and "digits-test.npz" in bad.output
    # the original single-run usage still routes to the figures command
    missing = CliRunner().invoke(_cli(), ["--run", str(a), "--in", "demo", "--ood", "nothing/test"])
    assert missing.exit_code == EXIT_DATA and "nothing-test.npz" in missing.output
