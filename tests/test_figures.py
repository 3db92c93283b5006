"""glow.report.figures / eval/figures.py on synthetic dumps: every file valid, mismatched dumps refused."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from glow.evaluation import dumps
from glow.report import figures
from glow.report import scores as ood
from glow.report.intervals import Bootstrap
from tests.helpers.fake_runs import (
    STEP,
    assert_png,
    fake_loader,
    make_run,
    point,
    write_dump,
    write_vector_dump,
)
from tests.helpers.repo import load_script


def test_make_figures_writes_every_file(tmp_path):
    run = make_run(tmp_path)
    calls: list = []
    res = figures.make_figures(run, "celeba", ["svhn/test"], image_loader=fake_loader(calls), k=9)
    out = run / "figures"
    assert res.out_dir == out and not res.skipped
    for name in ("distributions.png", "exp1.png", "exp2.png", "samples.png"):
        assert_png(out / name)
    assert (out / "samples.png").read_bytes() == (run / "eval" / f"step-{STEP:08d}" / "samples.png").read_bytes()

    table = json.loads((out / "ood.json").read_text())
    assert table["step"] == STEP and table["model_hash"] == "m0" and table["in_distribution"] == "celeba/test"
    rows = table["ood"]["svhn/test"]
    assert set(rows) == {"log_likelihood", "complexity_corrected", "png_complexity",
                         "typicality_m1", "typicality_m2", "typicality_m10", "typicality_m25"}
    for r in rows.values():
        assert set(r) == {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "n_in", "n_out", "intervals"}
    d_in = dumps.load_dump(run / "eval" / f"step-{STEP:08d}" / "dumps" / "celeba-test.npz")
    d_out = dumps.load_dump(run / "eval" / f"step-{STEP:08d}" / "dumps" / "svhn-test.npz")
    assert point(rows["log_likelihood"]) == ood.ood_metrics(d_in.log_p, d_out.log_p)
    assert rows["log_likelihood"]["auroc"] < 0.2  # the synthetic OOD set is "more likely"
    assert point(rows["png_complexity"]) == ood.ood_metrics(-d_in.complexity_bpd, -d_out.complexity_bpd)
    assert (rows["typicality_m25"]["n_in"], rows["typicality_m25"]["n_out"]) == (2, 2)
    assert table["bpd"]["svhn/test"]["count"] == 55
    assert table["bpd"]["celeba/test"]["mean"] == pytest.approx(d_in.bpd.mean())

    md = (out / "ood.md").read_text()
    assert "| OOD set | score | AUROC |" in md
    for name in rows:
        assert f"| svhn/test | {name} | {rows[name]['auroc']:.4f} [" in md
    # exp figures asked for the extremes: 9 highest-likelihood SVHN keys among others
    top = [str(k) for k in d_out.key[np.argsort(d_out.log_p)[::-1][:9]]]
    assert ("/nonexistent", "svhn", "test", top) in calls


def test_without_train_dump_and_samples(tmp_path):
    run = make_run(tmp_path, train=False, samples=False)
    res = figures.make_figures(run, "celeba", ["svhn/test"], image_loader=fake_loader())
    rows = json.loads((run / "figures" / "ood.json").read_text())["ood"]["svhn/test"]
    assert not any(name.startswith("typicality") for name in rows)
    assert "samples.png" in res.skipped and not (run / "figures" / "samples.png").exists()
    assert_png(run / "figures" / "distributions.png")


def test_mismatched_dumps_refused(tmp_path):
    run = make_run(tmp_path)
    step_dir = run / "eval" / f"step-{STEP:08d}"
    bad = write_dump(step_dir, "svhn", "test", np.ones(10), model_hash="other")
    with pytest.raises(ValueError, match="refusing to merge") as e:
        figures.make_figures(run, "celeba", ["svhn/test"], image_loader=fake_loader())
    assert str(bad) in str(e.value) and "celeba-test.npz" in str(e.value)
    write_dump(step_dir, "svhn", "test", np.ones(10), step=STEP + 1)  # other checkpoint
    with pytest.raises(ValueError, match="checkpoint"):
        dumps.check_same_model([dumps.load_dump(step_dir / "dumps" / "celeba-test.npz"), dumps.load_dump(bad)])
    with pytest.raises(FileNotFoundError, match="gaussian-test.npz"):
        figures.make_figures(run, "celeba", ["gaussian/test"], image_loader=fake_loader())


def test_figures_go_to_the_tracker_given(tmp_path):
    logged, summary, tables = [], {}, {}
    tracker = types.SimpleNamespace(log_image=lambda key, path, step: logged.append((key, Path(path).name, step)),
                                    log_summary=summary.update,
                                    log_table=lambda key, columns, rows, step: tables.update({key: (columns, rows)}))
    run = make_run(tmp_path)
    figures.make_figures(run, "celeba", ["svhn/test"], image_loader=fake_loader())  # no tracker: nothing logged
    assert logged == [] and summary == {} and tables == {}
    res = figures.make_figures(run, "celeba", ["svhn/test"], image_loader=fake_loader(), tracker=tracker)
    pngs = sorted(p.name for p in res.files if p.suffix == ".png")
    assert sorted(name for _, name, _ in logged) == pngs and "ood.md" not in pngs
    assert all(key == f"figures/{Path(name).stem}" and step == STEP for key, name, step in logged)
    assert summary["bpd/celeba/test"] == pytest.approx(res.table["bpd"]["celeba/test"]["mean"])
    columns, rows = tables["ood_table"]
    assert columns[:3] == ["ood_set", "score", "auroc"]
    assert {(r[0], r[1]) for r in rows} == {("svhn/test", name) for name in res.table["ood"]["svhn/test"]}


def test_index_html_is_one_self_contained_page(tmp_path):
    from html.parser import HTMLParser

    run = make_run(tmp_path)
    (run / "config.yaml").write_text("run:\n  name: r\n  logger: none\nmodel:\n  image_size: 32\n")
    res = figures.make_figures(run, "celeba", ["svhn/test"], image_loader=fake_loader())
    page = run / "figures" / "index.html"
    assert page in res.files

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.images, self.cells, self.links, self._cell = 0, [], [], [], None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tables += tag == "table"
            if tag == "img":
                self.images.append(attrs)
            if tag in ("td", "th"):
                self._cell = ""
            self.links += [v for k, v in attrs.items() if k in ("src", "href") and not v.startswith("data:")]

        def handle_data(self, data):
            if self._cell is not None:
                self._cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.cells.append(self._cell.strip())
                self._cell = None

    parsed = Page()
    parsed.feed(page.read_text())
    parsed.close()
    pngs = sorted(p.name for p in res.files if p.suffix == ".png")
    assert sorted(img["alt"] for img in parsed.images) == pngs  # every figure, the samples included
    assert all(img["src"].startswith("data:image/png;base64,") for img in parsed.images)
    assert parsed.links == []  # nothing to fetch: opens from a copied folder, offline
    assert parsed.tables == 3  # bits/dim, OOD and the typicality decision rule
    for spec, v in res.table["bpd"].items():
        assert spec in parsed.cells and f"{v['mean']:.4f}" in parsed.cells
    for name, r in res.table["ood"]["svhn/test"].items():
        low, high = r["intervals"]["auroc"]
        assert f"svhn/test: {name}" in parsed.cells and f"{r['auroc']:.4f} [{low:.4f}, {high:.4f}]" in parsed.cells
    decisions = res.table["typicality_test"]["ood"]["svhn/test"]
    assert decisions  # the page shows each M's decision-rule rates
    for m, r in decisions.items():
        assert m[1:] in parsed.cells and f"{r['epsilon']:.4f}" in parsed.cells and f"{r['tpr']:.4f}" in parsed.cells
    text = page.read_text()
    assert "image_size: 32" in text and res.table["checkpoint"] in text


def test_cli_with_real_shards(tmp_path):
    """The CLI end to end: images from real (tiny) shards through glow.data.streams.load_images for the
    image panels, scores from the dumps alone, newest step chosen by default."""
    from tests.helpers.fake_sources import build_small_shards

    root = tmp_path / "shards"
    build_small_shards(root, n=30, samples_per_shard=20, dataset="gaussian", split="test")
    build_small_shards(root, n=26, samples_per_shard=20, dataset="gaussian-smooth", split="test", seed=1)
    run = tmp_path / "runs" / "r"
    rng = np.random.default_rng(0)
    old = run / "eval" / "step-00000050"
    write_dump(old, "gaussian", "test", rng.normal(5, 0.1, 30), model_hash="old", step=50)
    new = run / "eval" / f"step-{STEP:08d}"
    write_dump(new, "gaussian", "test", rng.normal(5, 0.1, 30), data_root=str(root))
    write_dump(new, "gaussian-smooth", "test", rng.normal(4, 0.1, 26), data_root=str(root))
    result = CliRunner().invoke(load_script("eval/figures.py").main, ["--run", str(run), "--in", "gaussian", "--ood", "gaussian-smooth/test",
                                         "-k", "4", "--bootstrap", "25", "--bootstrap-seed", "3"])
    assert result.exit_code == 0, result.output
    assert "95% bootstrap intervals, 25 resamples, seed 3" in result.output
    assert "gaussian-smooth/test" in result.output and "png_complexity" in result.output
    assert "skipped samples.png" in result.output
    out = run / "figures"
    for name in ("distributions.png", "exp1.png", "exp2.png"):
        assert_png(out / name)
    table = json.loads((out / "ood.json").read_text())
    assert table["step"] == STEP and "complexity_corrected" in table["ood"]["gaussian-smooth/test"]
    assert (table["intervals"]["n_resamples"], table["intervals"]["seed"]) == (25, 3)
    entry = table["ood"]["gaussian-smooth/test"]["log_likelihood"]
    assert f"{entry['auroc']:.3f} [{entry['intervals']['auroc'][0]:.3f}, " in result.output

    # a dump without the complexity term (an older version's): no complexity rows, a note says why
    write_dump(new, "gaussian-smooth", "test", rng.normal(4, 0.1, 26), complexity=False, data_root=str(root))
    assert CliRunner().invoke(load_script("eval/figures.py").main, ["--run", str(run), "--in", "gaussian", "--ood", "gaussian-smooth/test"]).exit_code == 0
    table = json.loads((out / "ood.json").read_text())
    assert set(table["ood"]["gaussian-smooth/test"]) == {"log_likelihood"}
    assert any("gaussian-smooth/test: the dump holds no complexity_bpd" in n for n in table["notes"])

    bad = CliRunner().invoke(load_script("eval/figures.py").main, ["--run", str(run), "--step", "50", "--in", "gaussian", "--ood", "x/test"])
    assert bad.exit_code != 0 and "x-test.npz" in bad.output




def test_figures_of_a_features_flow(tmp_path, monkeypatch):
    """Dumps of vectors: log-likelihood and typicality rows (no PNG complexity), a histogram whose
    axis says continuous bits/dim, no image panels without the image shards, no sample grid."""
    rng = np.random.default_rng(0)
    run = tmp_path / "runs" / "f"
    step_dir = run / "eval" / f"step-{STEP:08d}"
    for spec, mean, n in (("celeba/train", -2.0, 80), ("celeba/test", -2.0, 40), ("svhn/test", -1.0, 30)):
        write_vector_dump(step_dir, *spec.split("/"), rng.normal(mean, 0.3, n))
    with pytest.raises(ValueError, match="missing fields"):  # an image dump still needs n_bits
        dumps.write_dump(tmp_path / "x.npz", {k: np.zeros(1) for k in ("key", "index", "label", "log_p", "bpd")},
                         step=1, model_hash="m", checkpoint="c", dataset="d", split="s", data_root="/")
    axes = []
    plot = figures.plot_distributions
    monkeypatch.setattr(figures, "plot_distributions", lambda *a, **kw: axes.append(kw["axis"]) or plot(*a, **kw))
    res = figures.make_figures(run, "celeba", ["svhn/test"], bootstrap=Bootstrap(20), image_loader=fake_loader())
    table = json.loads((run / "figures" / "ood.json").read_text())
    assert table["data_kind"] == "vectors" and table["n_bits"] is None
    rows = table["ood"]["svhn/test"]
    assert set(rows) == {"log_likelihood", "typicality_m1", "typicality_m2", "typicality_m10", "typicality_m25"}
    d_in, d_out = (dumps.load_dump(step_dir / "dumps" / f"{s}-test.npz") for s in ("celeba", "svhn"))
    assert d_in.vectors and d_in.complexity_bpd is None and d_in.n_bits is None
    assert point(rows["log_likelihood"]) == ood.ood_metrics(d_in.log_p, d_out.log_p)
    assert axes == [figures.CONTINUOUS_BPD_AXIS] and "may be negative" in axes[0]
    assert {"exp1.png", "exp2.png", "samples.png"} <= set(res.skipped) and "--data-root" in res.skipped["exp1.png"]
    md = (run / "figures" / "ood.md").read_text()
    assert "feature vectors: continuous bits/dim" in md and "differential entropy" in md
    assert "older version" not in md and "complexity_corrected is" not in md
    assert "feature vectors: continuous bits/dim" in (run / "figures" / "index.html").read_text()
