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
from glow.report.intervals import Bootstrap, ood_intervals
from tests.helpers.fake_runs import STEP, point, write_dump, write_vector_dump
from tests.helpers.repo import load_script


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
    table, files = compare.compare_runs([base, cycle], "demo", oods, background=bg, out_dir=tmp_path / "cmp",
                                        bootstrap=Bootstrap(60, seed=5))
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
    entry = rows[("demo_cycle", "log_likelihood")]["ood"]["digits/test"]
    assert point(entry) == ood.ood_metrics(d_in.log_p, d_out.log_p)
    drawn = ood_intervals(d_in.log_p, d_out.log_p, n_resamples=60, seed=5)
    assert entry["intervals"] == {m: [drawn[m]["low"], drawn[m]["high"]] for m in entry["intervals"]}
    assert written["intervals"]["n_resamples"] == 60 and written["intervals"]["seed"] == 5
    lr = rows[("demo_cycle", "likelihood_ratio")]
    assert lr["background"] == "demo_background"
    assert point(lr["ood"]["digits/test"]) == ood.ood_metrics(
        ood.likelihood_ratio(d_in, dump(bg, "demo")), ood.likelihood_ratio(d_out, dump(bg, "digits")))
    for spec in oods:  # recomputed from the dumps: -S(x) = L(x) - bpd(x) and -L(x) (the first run's)
        d_out = dump(cycle, spec.split("/")[0])
        assert point(rows[("demo_cycle", "complexity_corrected")]["ood"][spec]) == ood.ood_metrics(
            d_in.complexity_bpd - d_in.bpd, d_out.complexity_bpd - d_out.bpd)
        b_in, b_out = dump(base, "demo"), dump(base, spec.split("/")[0])
        assert point(rows[("(PNG size)", "png_complexity")]["ood"][spec]) == ood.ood_metrics(
            -b_in.complexity_bpd, -b_out.complexity_bpd)
    assert rows[("demo", "log_likelihood")]["test_bpd"] == pytest.approx(dump(base, "demo").bpd.mean())
    assert written["runs"]["demo_cycle"]["model"]["mask"] == "cycle"
    assert written["background"]["model"]["perturb_prob"] == 0.2
    md = files[1].read_text()
    for (variant, score), row in rows.items():
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {variant} |") and f"| {score} |" in ln)
        for spec in oods:
            low, high = row["ood"][spec]["intervals"]["auroc"]
            assert f"{row['ood'][spec]['auroc']:.4f} [{low:.4f}, {high:.4f}]" in line
    assert "60 resamples, seed 5" in md


def test_compare_without_complexity_or_background(tmp_path):
    a = make_run(tmp_path, "a", complexity=False)
    b = make_run(tmp_path, "b", complexity=False, model_hash="m1")
    table, _ = compare.compare_runs([a, b], "demo", ["digits/test"], bootstrap=Bootstrap(0))
    assert [(r["variant"], r["score"]) for r in table["rows"]] == [("a", "log_likelihood"), ("b", "log_likelihood")]
    assert table["intervals"]["n_resamples"] == 0 and "intervals" not in table["rows"][0]["ood"]["digits/test"]
    assert (tmp_path / "comparison" / "compare.md").is_file()  # default: beside the runs
    with pytest.raises(ValueError, match="unique"):
        compare.compare_table([compare.load_run_dumps(a, "demo/test", ["digits/test"])] * 2)


def test_cli_compare_and_single_run_usage(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", model_hash="m1")
    bg = make_run(tmp_path, "bg")
    out = tmp_path / "out"
    result = CliRunner().invoke(report_cli, ["compare", "--run", str(a), "--run", str(b), "--background", str(bg),
                                         "--in", "demo", "--ood", "digits/test", "--out", str(out),
                                         "--bootstrap", "30", "--bootstrap-seed", "2"])
    assert result.exit_code == 0, result.output
    assert "likelihood_ratio" in result.output and (out / "compare.json").is_file()
    written = json.loads((out / "compare.json").read_text())
    assert (written["intervals"]["n_resamples"], written["intervals"]["seed"]) == (30, 2)
    low, high = written["rows"][0]["ood"]["digits/test"]["intervals"]["auroc"]
    assert f"{written['rows'][0]['ood']['digits/test']['auroc']:.3f} [{low:.3f}, {high:.3f}]" in result.output
    assert "30 resamples, seed 2" in result.output
    # differing keys: a clear error naming the files
    write_dump(bg / "eval" / f"step-{STEP:08d}", "digits", "test", np.full(7, 3.0),
               checkpoint=str(bg / "checkpoints" / f"step-{STEP:08d}"))
    bad = CliRunner().invoke(report_cli, ["compare", "--run", str(a), "--background", str(bg), "--in", "demo",
                                      "--ood", "digits/test", "--out", str(out)])
    assert bad.exit_code == EXIT_DATA and "keys differ" in bad.output and "digits-test.npz" in bad.output
    # the original single-run usage still routes to the figures command
    missing = CliRunner().invoke(load_script("eval/figures.py").main, ["--run", str(a), "--in", "demo", "--ood", "nothing/test"])
    assert missing.exit_code == EXIT_DATA and "nothing-test.npz" in missing.output


def write_config(run: Path, seed: int, lr: float = 0.001) -> Path:
    """The run's saved config.yaml: one recipe per lr, any seed."""
    (run / "config.yaml").write_text(f"run:\n  name: {run.name}\n  root: {run.parent}\ndata:\n  dataset: demo\n"
                                     f"optim:\n  lr: {lr}\ntrain:\n  seed: {seed}\n")
    return run


def test_compare_groups_seeds_of_one_recipe(tmp_path):
    """x-s0..x-s2 (one recipe, three seeds) become one row per score: mean, sd and N, every run's
    values and intervals kept; y-s0 (another lr) stays a row of its own (N = 1, with its interval)."""
    xs = [write_config(make_run(tmp_path, f"x-s{k}", shift=0.05 * k), k) for k in range(3)]
    y = write_config(make_run(tmp_path, "y-s0", shift=0.3, model_hash="m1"), 0, lr=0.01)
    result = CliRunner().invoke(report_cli, ["compare", *(a for r in [*xs, y] for a in ("--run", str(r))),
                                             "--in", "demo", "--ood", "digits/test", "--out", str(tmp_path / "out"),
                                             "--bootstrap", "20", "--group-seeds"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "compare.json").read_text())
    rows = {(r["variant"], r["score"]): r for r in table["rows"]}
    assert set(rows) == {(v, s) for v in ("x", "y") for s in ("log_likelihood", "complexity_corrected")} | {
        ("(PNG size)", "png_complexity")}
    x = rows[("x", "log_likelihood")]
    assert x["runs"] == ["x-s0", "x-s1", "x-s2"] and x["seeds"] == {"x-s0": 0, "x-s1": 1, "x-s2": 2}
    aurocs = [ood.ood_metrics(dump(r, "demo").log_p, dump(r, "digits").log_p)["auroc"] for r in xs]
    summary = x["ood"]["digits/test"]["seeds"]["auroc"]
    assert summary["values"] == dict(zip(["x-s0", "x-s1", "x-s2"], aurocs))
    assert x["ood"]["digits/test"]["auroc"] == pytest.approx(np.mean(aurocs))
    assert summary["std"] == pytest.approx(np.std(aurocs, ddof=1)) and summary["n"] == 3
    assert x["per_run"]["x-s1"]["ood"]["digits/test"]["intervals"]["auroc"]  # each run's interval kept
    assert x["test_bpd"] == pytest.approx(np.mean([dump(r, "demo").bpd.mean() for r in xs]))
    assert f"{np.mean(aurocs):.3f} ± {summary['std']:.3f} (N=3)" in result.output
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| x | - | log_likelihood |" in md and f"{np.mean(aurocs):.4f} ± {summary['std']:.4f} (N=3)" in md
    y_row = rows[("y", "log_likelihood")]["ood"]["digits/test"]
    low, high = y_row["intervals"]["auroc"]
    assert y_row["seeds"]["auroc"]["n"] == 1 and f"{y_row['auroc']:.4f} [{low:.4f}, {high:.4f}]" in md


def test_compare_refuses_to_group_runs_of_other_recipes(tmp_path):
    a = write_config(make_run(tmp_path, "x-s0"), 0)
    b = write_config(make_run(tmp_path, "x-s1"), 1, lr=0.01)
    args = ["compare", "--run", str(a), "--run", str(b), "--in", "demo", "--ood", "digits/test", "--bootstrap", "0"]
    result = CliRunner().invoke(report_cli, [*args, "--group-seeds"])
    assert result.exit_code == 2 and "optim.lr (x-s0: 0.001, x-s1: 0.01)" in result.output
    write_config(b, 0)  # the same recipe and the same seed: one model counted twice
    result = CliRunner().invoke(report_cli, [*args, "--group-seeds"])
    assert result.exit_code == 2 and "same train.seed" in result.output
    assert CliRunner().invoke(report_cli, args).exit_code == 0  # without --group-seeds: a row per run


def test_image_flow_and_features_flow_side_by_side(tmp_path):
    """A features flow's dumps (no complexity, continuous bits/dim) beside an image flow's: both
    rows, the PNG baseline from the image run, a note that their bits/dim do not compare."""
    images = make_run(tmp_path, "glow32")
    features = tmp_path / "feats"
    rng = np.random.default_rng(1)
    for dataset, n, mean in (("demo", 40, -2.0), ("digits", 30, -1.0), ("gaussian-smooth", 25, -1.5)):
        write_vector_dump(features / "eval" / f"step-{STEP:08d}", dataset, "test", rng.normal(mean, 0.3, n))
    oods = ["digits/test", "gaussian-smooth/test"]
    table, _ = compare.compare_runs([features, images], "demo", oods, bootstrap=Bootstrap(0))
    rows = {(r["variant"], r["score"]): r for r in table["rows"]}
    assert set(rows) == {("feats", "log_likelihood"), ("glow32", "log_likelihood"),
                         ("glow32", "complexity_corrected"), ("(PNG size)", "png_complexity")}
    f_in, f_out = dump(features, "demo"), dump(features, "digits")
    assert rows[("feats", "log_likelihood")]["ood"]["digits/test"] == ood.ood_metrics(f_in.log_p, f_out.log_p)
    b_in, b_out = dump(images, "demo"), dump(images, "digits")
    assert rows[("(PNG size)", "png_complexity")]["ood"]["digits/test"] == ood.ood_metrics(
        -b_in.complexity_bpd, -b_out.complexity_bpd)
    assert any("do not compare" in n for n in table["notes"])
    assert not any("other samples" in n for n in table["notes"])  # the same keys: the same samples
    write_vector_dump(features / "eval" / f"step-{STEP:08d}", "digits", "test", rng.normal(-1.0, 0.3, 29))
    table, _ = compare.compare_runs([features, images], "demo", oods, bootstrap=Bootstrap(0))
    assert any(n.startswith("digits/test: the dumps of glow32 hold other samples") for n in table["notes"])
