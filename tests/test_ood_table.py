"""Every number of ood.json / ood.md and of the exp1/exp2 panels, recomputed independently from
the dumps: the scores the paper's claims rest on, and the typicality test's decision rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glow.evaluation import dumps
from glow.report import figures, intervals
from glow.report import scores as ood
from glow.report.intervals import INTERVAL_METRICS, Bootstrap, ood_intervals
from glow.run import Run
from tests.helpers.fake_runs import STEP, point, write_dump

SEED = 4
BOOTSTRAP = Bootstrap(80, seed=9)


@pytest.fixture
def run(tmp_path) -> Path:
    """Train mean NLL well away from the test mean, so measuring typicality against the test set
    instead of the training set changes the numbers."""
    rng = np.random.default_rng(1)
    run = tmp_path / "runs" / "r"
    step_dir = run / "eval" / f"step-{STEP:08d}"
    write_dump(step_dir, "celeba", "train", rng.normal(3.35, 0.2, 150))
    write_dump(step_dir, "celeba", "test", rng.normal(3.5, 0.2, 100))
    write_dump(step_dir, "svhn", "test", rng.normal(3.2, 0.3, 90))
    write_dump(step_dir, "noise", "test", rng.normal(3.6, 0.4, 70))
    return run


def load(run: Path, spec: str) -> dumps.Dump:
    return dumps.load_dump(Run(run).dump_path(STEP, spec))


def typicality_by_hand(nll: np.ndarray, train_mean: float, m: int, seed: int) -> np.ndarray:
    n = nll.size // m
    idx = np.random.default_rng(seed).permutation(nll.size)[: n * m].reshape(n, m)
    return np.abs(nll[idx].mean(1) - train_mean)


def test_every_score_in_ood_json_and_md_is_recomputed_from_the_dumps(run):
    figures.make_figures(run, "celeba", ["svhn/test", "noise/test"], seed=SEED, bootstrap=BOOTSTRAP,
                         image_loader=lambda root, d, s, keys: {k: np.zeros((32, 32, 3), np.uint8) for k in keys})
    table = json.loads((run / "figures" / "ood.json").read_text())
    md = (run / "figures" / "ood.md").read_text()
    page = (run / "figures" / "index.html").read_text()
    assert table["intervals"] == {"method": intervals.METHOD, "confidence": 0.95, "n_resamples": 80, "seed": 9}
    assert "95% percentile-bootstrap interval (80 resamples, seed 9" in md and "80 resamples, seed 9" in page
    d_in, train = load(run, "celeba/test"), load(run, "celeba/train")
    train_mean = float(np.mean(-train.log_p))
    assert table["train_mean_nll_nats"] == pytest.approx(train_mean, rel=1e-12)
    for spec in ("svhn/test", "noise/test"):
        d_out = load(run, spec)
        expected = {
            "log_likelihood": (d_in.log_p, d_out.log_p),
            # -S(x) = L(x) - bpd(x): higher = more in-distribution
            "complexity_corrected": (d_in.complexity_bpd - d_in.bpd, d_out.complexity_bpd - d_out.bpd),
            "png_complexity": (-d_in.complexity_bpd, -d_out.complexity_bpd),
        }
        for m in (1, 2, 10, 25):
            expected[f"typicality_m{m}"] = (-typicality_by_hand(-d_in.log_p, train_mean, m, SEED),
                                            -typicality_by_hand(-d_out.log_p, train_mean, m, SEED))
        rows = table["ood"][spec]
        assert set(rows) == set(expected)
        for name, (s_in, s_out) in expected.items():
            r = rows[name]
            assert point(r) == pytest.approx(ood.ood_metrics(s_in, s_out), rel=1e-12, abs=1e-12), (spec, name)
            # the intervals: both sets resampled with the table's seed and count
            drawn = ood_intervals(s_in, s_out, n_resamples=BOOTSTRAP.n_resamples, seed=BOOTSTRAP.seed)
            assert r["intervals"] == {m: pytest.approx([drawn[m]["low"], drawn[m]["high"]], rel=1e-12, abs=1e-12)
                                      for m in INTERVAL_METRICS}, (spec, name)
            iv = r["intervals"]
            assert (f"| {spec} | {name} | {r['auroc']:.4f} [{iv['auroc'][0]:.4f}, {iv['auroc'][1]:.4f}] | "
                    f"{r['aupr_in']:.4f} [{iv['aupr_in'][0]:.4f}, {iv['aupr_in'][1]:.4f}] | "
                    f"{r['aupr_out']:.4f} [{iv['aupr_out'][0]:.4f}, {iv['aupr_out'][1]:.4f}] | "
                    f"{r['fpr_at_95_tpr']:.4f} [{iv['fpr_at_95_tpr'][0]:.4f}, {iv['fpr_at_95_tpr'][1]:.4f}] | "
                    f"{r['n_in']} | {r['n_out']} |") in md
            assert f"<td>{r['auroc']:.4f} [{iv['auroc'][0]:.4f}, {iv['auroc'][1]:.4f}]</td>" in page
    for spec, d in (("celeba/train", train), ("celeba/test", d_in), ("svhn/test", load(run, "svhn/test"))):
        assert table["bpd"][spec] == pytest.approx({"mean": d.bpd.mean(), "std": d.bpd.std(), "count": d.bpd.size})


def test_skipped_bootstrap_leaves_the_numbers_and_says_so(run):
    loader = lambda root, d, s, keys: {k: np.zeros((32, 32, 3), np.uint8) for k in keys}
    figures.make_figures(run, "celeba", ["svhn/test"], bootstrap=Bootstrap(0), image_loader=loader)
    table = json.loads((run / "figures" / "ood.json").read_text())
    assert table["intervals"]["n_resamples"] == 0
    d_in, d_out = load(run, "celeba/test"), load(run, "svhn/test")
    assert table["ood"]["svhn/test"]["log_likelihood"] == ood.ood_metrics(d_in.log_p, d_out.log_p)
    assert "No intervals" in (run / "figures" / "ood.md").read_text()


def test_typicality_decision_rule_in_ood_json_and_md(run):
    figures.make_figures(run, "celeba", ["svhn/test"], seed=SEED, bootstrap=Bootstrap(0),
                         image_loader=lambda root, d, s, keys: {k: np.zeros((32, 32, 3), np.uint8) for k in keys})
    test = json.loads((run / "figures" / "ood.json").read_text())["typicality_test"]
    md = (run / "figures" / "ood.md").read_text()
    d_in, d_out, train = load(run, "celeba/test"), load(run, "svhn/test"), load(run, "celeba/train")
    train_mean = float(np.mean(-train.log_p))
    calib, rest = ood.heldout_split(d_in.log_p.size, SEED)
    assert np.intersect1d(calib, rest).size == 0 and calib.size + rest.size == d_in.log_p.size
    assert test["alpha"] == 0.99 and "held-out" in md and "bootstrap" in md
    for m in (1, 2, 10, 25):
        r = test["ood"]["svhn/test"][f"m{m}"]
        # epsilon: the 0.99 quantile over bootstrap batches of the held-out (calibration) half
        rng = np.random.default_rng(SEED)
        boot = -d_in.log_p[calib][rng.integers(0, calib.size, (test["n_bootstrap"], m))]
        eps = np.quantile(np.abs(boot.mean(1) - train_mean), 0.99)
        assert r["epsilon"] == pytest.approx(eps, rel=1e-12)
        stat_in = typicality_by_hand(-d_in.log_p[rest], train_mean, m, SEED)
        stat_out = typicality_by_hand(-d_out.log_p, train_mean, m, SEED)
        assert r["fpr"] == pytest.approx(np.mean(stat_in > eps)) and r["tpr"] == pytest.approx(np.mean(stat_out > eps))
        assert (r["n_in"], r["n_out"]) == (stat_in.size, stat_out.size)
        assert f"| svhn/test | {m} | {r['epsilon']:.4f} | {r['tpr']:.4f} | {r['fpr']:.4f} |" in md


def test_typicality_decision_rule_has_its_false_positive_rate():
    """Known distributions: NLL ~ N(0, 1) in distribution. At M = 1, epsilon is the 0.99 quantile
    of |N(0, 1)| (2.576), at M = 25 a fifth of it; the in-distribution rejection rate is ~1%
    and a batch of 25 from N(1.5, 1) is always rejected."""
    rng = np.random.default_rng(0)
    heldout, test_in, shifted = rng.normal(0, 1, 20000), rng.normal(0, 1, 50000), rng.normal(1.5, 1, 5000)
    eps1 = ood.typicality_epsilon(heldout, 0.0, 1, alpha=0.99, n_bootstrap=20000)
    assert eps1 == pytest.approx(2.576, rel=0.03)
    r = ood.typicality_test(test_in, shifted, heldout, 0.0, 25, n_bootstrap=20000)
    assert r["epsilon"] == pytest.approx(2.576 / 5, rel=0.05)
    assert r["fpr"] == pytest.approx(0.01, abs=0.006) and r["tpr"] == 1.0
    assert (r["n_in"], r["n_out"]) == (2000, 200)
    with pytest.raises(ValueError, match="alpha"):
        ood.typicality_epsilon(heldout, 0.0, 1, alpha=1.0)


def test_exp_panels_show_the_most_and_least_likely_images(run, monkeypatch):
    """exp1: the OOD images with the LOWEST bits/dim beside the in-distribution test images with the
    HIGHEST; exp2 the other way round. Each fake image encodes its key, so the panels are read back."""
    shown: dict[str, list] = {}
    plot = figures.plot_extremes

    def capture(panels, path, suptitle):
        shown[Path(path).name] = [[int(im[0, 0, 0]) + 256 * int(im[0, 0, 1]) for im in images] for _, images in panels]
        return plot(panels, path, suptitle)

    def loader(root, dataset, split, keys):
        return {k: np.dstack([np.full((32, 32), int(k) % 256), np.full((32, 32), int(k) // 256),
                              np.zeros((32, 32))]).astype(np.uint8) for k in keys}

    monkeypatch.setattr(figures, "plot_extremes", capture)
    k = 7
    figures.make_figures(run, "celeba", ["svhn/test", "noise/test"], image_loader=loader, k=k)
    specs = ("celeba/test", "svhn/test", "noise/test")
    ranked = {spec: np.argsort(load(run, spec).bpd, kind="stable") for spec in specs}
    key_of = {spec: [int(x) for x in load(run, spec).key] for spec in ranked}

    def most(spec):
        return [key_of[spec][i] for i in ranked[spec][:k]]

    def least(spec):
        return sorted(key_of[spec][i] for i in ranked[spec][-k:])

    svhn_hi, noise_hi, in_lo = shown["exp1.png"]
    assert svhn_hi == most("svhn/test") and noise_hi == most("noise/test")
    assert sorted(in_lo) == least("celeba/test")
    svhn_lo, noise_lo, in_hi = shown["exp2.png"]
    assert sorted(svhn_lo) == least("svhn/test") and sorted(noise_lo) == least("noise/test")
    assert in_hi == most("celeba/test")
