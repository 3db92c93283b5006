"""Merge the evaluation dumps of one checkpoint into the figures and the OOD table.

Reads only files on disk (`runs/<name>/eval/step-N/dumps/*.npz`, shards for the images) and
writes `runs/<name>/figures/`: distributions.png, exp1.png, exp2.png, samples.png, ood.json,
ood.md. Dumps from different checkpoints or model hashes are never merged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from glow import metrics  # noqa: E402
from glow.files import atomic_save_figure, atomic_write_bytes, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

ImageLoader = Callable[[str, str, str, Sequence[str]], dict]  # (root, dataset, split, keys) -> key -> HxWx3
REQUIRED = ("key", "index", "label", "log_p", "bpd", "step", "model_hash", "checkpoint", "dataset", "split",
            "data_root", "n_bits")
IDENTITY = ("model_hash", "checkpoint", "step", "n_bits")  # must agree across merged dumps
STEP_DIR_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class Dump:
    """One evaluation dump (per-sample scores of one split) and where it came from."""

    path: Path
    dataset: str
    split: str
    key: np.ndarray
    index: np.ndarray
    label: np.ndarray
    log_p: np.ndarray
    bpd: np.ndarray
    complexity_bpd: np.ndarray | None
    step: int
    model_hash: str
    checkpoint: str
    data_root: str
    n_bits: int

    @property
    def spec(self) -> str:
        return f"{self.dataset}/{self.split}"


@dataclass
class FiguresResult:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why
    table: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- locating and loading


def parse_spec(spec: str) -> tuple[str, str]:
    """"<dataset>/<split>" -> (dataset, split)."""
    dataset, sep, split = spec.partition("/")
    if not sep or not dataset or not split or "/" in split:
        raise ValueError(f"data spec {spec!r} is not of the form <dataset>/<split>")
    return dataset, split


def eval_step_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """`runs/<name>/eval/step-%08d`; the newest one when ``step`` is None."""
    base = Path(run_dir) / "eval"
    if step is not None:
        path = base / f"step-{step:08d}"
        if not path.is_dir():
            raise FileNotFoundError(f"no evaluation for step {step}: {path} does not exist; run eval/evaluate.py first")
        return path
    steps = sorted(int(m.group(1)) for p in (base.iterdir() if base.is_dir() else ())
                   if (m := STEP_DIR_RE.match(p.name)) and p.is_dir())
    if not steps:
        raise FileNotFoundError(f"no evaluation under {base} (expected step-NNNNNNNN folders); run eval/evaluate.py first")
    return base / f"step-{steps[-1]:08d}"


def dump_path(step_dir: str | Path, spec: str) -> Path:
    from glow import evaluation

    return evaluation.dump_path(Path(step_dir), *parse_spec(spec))


def load_dump(path: str | Path) -> Dump:
    """Read a dump, checking every array of the contract is there and the lengths agree."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dump {path} not found; run `eval/evaluate.py --task dump` for that split")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in REQUIRED if k not in z.files]
        if missing:
            raise ValueError(f"dump {path} lacks {missing}; rewrite it with eval/evaluate.py --task dump --force")
        arrays = {k: z[k] for k in ("key", "index", "label", "log_p", "bpd")}
        arrays["complexity_bpd"] = z["complexity_bpd"] if "complexity_bpd" in z.files else None
        meta = {k: z[k].item() for k in ("step", "model_hash", "checkpoint", "dataset", "split", "data_root", "n_bits")}
    n = len(arrays["key"])
    bad = {k: len(v) for k, v in arrays.items() if v is not None and len(v) != n}
    if bad:
        raise ValueError(f"dump {path}: arrays of unequal length (key: {n}, {bad})")
    return Dump(path=path, key=arrays["key"].astype(str), index=arrays["index"], label=arrays["label"],
                log_p=arrays["log_p"].astype(np.float64), bpd=arrays["bpd"].astype(np.float64),
                complexity_bpd=None if arrays["complexity_bpd"] is None else arrays["complexity_bpd"].astype(np.float64),
                step=int(meta["step"]), model_hash=str(meta["model_hash"]), checkpoint=str(meta["checkpoint"]),
                dataset=str(meta["dataset"]), split=str(meta["split"]), data_root=str(meta["data_root"]),
                n_bits=int(meta["n_bits"]))


def check_same_model(dumps: Sequence[Dump]) -> None:
    """Refuse dumps that come from different checkpoints / model hashes, naming the files."""
    ref = dumps[0]
    for d in dumps[1:]:
        diff = [f for f in IDENTITY if getattr(d, f) != getattr(ref, f)]
        if diff:
            desc = lambda x: ", ".join(f"{f}={getattr(x, f)!r}" for f in diff)  # noqa: E731
            raise ValueError(
                f"refusing to merge dumps from different models: {ref.path} ({desc(ref)}) vs {d.path} ({desc(d)}); "
                "re-run eval/evaluate.py --task dump --force on the same checkpoint for every split"
            )


def load_dumps(paths: Sequence[str | Path]) -> list[Dump]:
    dumps = [load_dump(p) for p in paths]
    check_same_model(dumps)
    return dumps


def default_image_loader(root, dataset, split, keys) -> dict:
    from glow.data import load_images

    return load_images(root, dataset, split, keys)


# --------------------------------------------------------------------------- OOD table


def complexity_of(d: Dump, loader: ImageLoader, data_root: str | None) -> np.ndarray:
    """The dump's PNG complexity term, or computed from the shards when the dump lacks it."""
    if d.complexity_bpd is not None:
        return d.complexity_bpd
    root = data_root or d.data_root
    log.info("%s has no complexity_bpd: computing it from the images under %s", d.path, root)
    images = loader(root, d.dataset, d.split, list(d.key))
    return np.array([metrics.png_complexity_bpd(images[k]) for k in d.key], dtype=np.float64)


def ood_table(in_test: Dump, oods: Sequence[Dump], train: Dump | None = None, *,
              complexity: dict[str, np.ndarray] | None = None,
              typicality_sizes: Sequence[int] = metrics.TYPICALITY_BATCH_SIZES, seed: int = 0) -> dict:
    """OOD metrics per OOD set and score (higher score = more in-distribution, in-dist positive).

    Scores: log-likelihood; -S(x) = L(x) - bpd(x) (Serra et al. 2020); -L(x) alone (PNG
    complexity, model-free); typicality with batch size M (needs the training dump), whose
    set sizes count batches, not images. ``complexity`` maps dump spec -> L(x) per sample.
    """
    complexity = complexity or {}
    table = {
        "step": in_test.step, "model_hash": in_test.model_hash, "checkpoint": in_test.checkpoint,
        "n_bits": in_test.n_bits, "in_distribution": in_test.spec, "typicality_seed": seed,
        "bpd": {d.spec: {"mean": float(d.bpd.mean()), "std": float(d.bpd.std()), "count": int(d.bpd.size)}
                for d in [x for x in (train, in_test) if x is not None] + list(oods)},
        "notes": [
            "Scores are oriented higher = more in-distribution; in-distribution is the positive class. "
            "AUROC < 0.5 means the OOD set looks MORE in-distribution than held-out in-distribution data.",
            "png_complexity is -L(x), the PNG size alone (a model-free baseline): it shows what the flow adds.",
        ],
        "ood": {},
    }
    train_nll = None if train is None else float(-train.log_p.mean())
    if train is None:
        table["notes"].append("no training-set dump: typicality scores omitted")
    else:
        table["train_mean_nll_nats"] = train_nll
    for ood in oods:
        scores: dict[str, tuple[np.ndarray, np.ndarray]] = {"log_likelihood": (in_test.log_p, ood.log_p)}
        if in_test.spec in complexity and ood.spec in complexity:
            c_in, c_out = complexity[in_test.spec], complexity[ood.spec]
            scores["complexity_corrected"] = (metrics.complexity_corrected_score(in_test.bpd, c_in),
                                              metrics.complexity_corrected_score(ood.bpd, c_out))
            scores["png_complexity"] = (-c_in, -c_out)
        if train_nll is not None:
            for m in typicality_sizes:
                if min(in_test.log_p.size, ood.log_p.size) < m:
                    continue
                scores[f"typicality_m{m}"] = (metrics.typicality_scores(-in_test.log_p, train_nll, m, seed),
                                              metrics.typicality_scores(-ood.log_p, train_nll, m, seed))
        table["ood"][ood.spec] = {name: metrics.ood_metrics(*pair) for name, pair in scores.items()}
    return table


def ood_markdown(table: dict) -> str:
    lines = [
        f"# OOD detection: in-distribution `{table['in_distribution']}`",
        "",
        f"Checkpoint `{table['checkpoint']}` (step {table['step']}, model hash `{table['model_hash']}`, "
        f"{table['n_bits']}-bit).",
        "",
        "| set | bits/dim mean | std | count |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {s} | {v['mean']:.4f} | {v['std']:.4f} | {v['count']} |" for s, v in table["bpd"].items()]
    lines += ["", "| OOD set | score | AUROC | AUPR-in | AUPR-out | FPR@95%TPR | n in | n OOD |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for spec, rows in table["ood"].items():
        for name, r in rows.items():
            lines.append(f"| {spec} | {name} | {r['auroc']:.4f} | {r['aupr_in']:.4f} | {r['aupr_out']:.4f} | "
                         f"{r['fpr_at_95_tpr']:.4f} | {r['n_in']} | {r['n_out']} |")
    lines += [""] + [f"- {n}" for n in table["notes"]] + [
        "- complexity_corrected is -S(x) = L(x) - bpd(x) (Serra et al. 2020), L = PNG size at maximum "
        "compression in bits/dim; typicality_mM is -|mean NLL of a batch of M - training mean NLL| "
        "(Nalisnick et al. 2019) over disjoint seeded batches, so its n counts batches.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot_distributions(sets: Sequence[tuple[str, np.ndarray]], path: Path,
                       clip: tuple[float, float] = (0.5, 99.5), kde_max: int = 20000, seed: int = 0) -> Path:
    """Histograms + Gaussian-KDE curves of bits/dim; the x-range is clipped at pooled percentiles."""
    pooled = np.concatenate([v for _, v in sets])
    lo, hi = np.percentile(pooled, clip)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 60)
    grid = np.linspace(lo, hi, 400)
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    outside = []
    for i, (label, v) in enumerate(sets):
        color = f"C{i}"
        inside = v[(v >= lo) & (v <= hi)]
        outside.append(f"{label}: {v.size - inside.size}")
        ax.hist(inside, bins=bins, density=True, alpha=0.3, color=color)
        sub = v if v.size <= kde_max else rng.choice(v, kde_max, replace=False)
        if sub.size > 1 and np.std(sub) > 0:
            ax.plot(grid, gaussian_kde(sub)(grid), color=color, lw=1.8,
                    label=f"{label} (n={v.size}, mean {v.mean():.3f})")
        else:
            ax.axvline(float(np.mean(v)), color=color, label=f"{label} (n={v.size}, mean {v.mean():.3f})")
    ax.set_xlabel(f"bits/dim  (x clipped to pooled percentiles {clip[0]:g}-{clip[1]:g}: [{lo:.3f}, {hi:.3f}]; "
                  "values outside: " + ", ".join(outside) + ")", fontsize=8)
    ax.set_ylabel("density")
    ax.set_title("Distribution of bits/dim (lower = more likely)")
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path, bbox_inches="tight")


def _grid(images: Sequence[np.ndarray], ncol: int) -> np.ndarray:
    h, w = images[0].shape[:2]
    nrow = -(-len(images) // ncol)
    out = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        out[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = im
    return out


def plot_extremes(panels: Sequence[tuple[str, Sequence[np.ndarray]]], path: Path, suptitle: str) -> Path:
    """One panel per set, each a grid of images (already in the order to show)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        ncol = int(np.ceil(np.sqrt(len(images))))
        ax.imshow(_grid(images, ncol), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    return atomic_save_figure(fig, path, bbox_inches="tight")


def _extreme_panel(d: Dump, k: int, highest: bool, loader: ImageLoader, data_root: str | None):
    order = np.argsort(d.log_p, kind="stable")
    idx = order[::-1][:k] if highest else order[:k]
    keys = [str(d.key[i]) for i in idx]
    images = loader(data_root or d.data_root, d.dataset, d.split, keys)
    which = "highest" if highest else "lowest"
    title = f"{d.spec}: {len(idx)} {which} log-likelihood\nbits/dim {d.bpd[idx].min():.3f}-{d.bpd[idx].max():.3f}"
    return title, [images[key] for key in keys]


# --------------------------------------------------------------------------- driver


def log_figures_to_wandb(paths: Sequence[Path], step: int, run=None) -> bool:
    """Log the PNG figures to ``run`` or to the active wandb run, if any (never starts one)."""
    wandb = sys.modules.get("wandb")
    run = run if run is not None else (getattr(wandb, "run", None) if wandb else None)
    if run is None:
        return False
    import wandb as _wandb

    # no step=: the wandb run of the training usually sits past this step and would drop it
    record = {f"figures/{p.stem}": _wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
    run.log({**record, "figures/eval_step": step})
    return True


def make_figures(run_dir: str | Path, in_dataset: str, ood_specs: Sequence[str], *, step: int | None = None,
                 in_split: str = "test", train_split: str = "train", out_dir: str | Path | None = None,
                 data_root: str | None = None, k: int = 16, seed: int = 0,
                 image_loader: ImageLoader | None = None) -> FiguresResult:
    """Write figures/ for one run from the dumps of one evaluated step (newest by default)."""
    loader = image_loader or default_image_loader
    step_dir = eval_step_dir(run_dir, step)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "figures"
    res = FiguresResult(out_dir=out)
    if not ood_specs:
        raise ValueError("give at least one OOD set (--ood <dataset>/<split>)")
    in_spec, train_spec = f"{in_dataset}/{in_split}", f"{in_dataset}/{train_split}"
    paths = [dump_path(step_dir, in_spec)] + [dump_path(step_dir, s) for s in ood_specs]
    train_path = dump_path(step_dir, train_spec)
    has_train = train_path.is_file()
    if not has_train:
        log.warning("no training dump %s: distributions without train, no typicality scores", train_path)
    dumps = load_dumps(paths + ([train_path] if has_train else []))
    in_test, oods = dumps[0], dumps[1:len(paths)]
    train = dumps[-1] if has_train else None

    complexity: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for d in [in_test, *oods]:
        try:
            complexity[d.spec] = complexity_of(d, loader, data_root)
        except (FileNotFoundError, KeyError) as e:
            log.warning("no complexity term for %s: %s", d.spec, e)
            missing.append(d.spec)
    table = ood_table(in_test, oods, train, complexity=complexity, seed=seed)
    table["notes"] += [f"{s}: no complexity_bpd in the dump and its images could not be read" for s in missing]
    res.table = table
    atomic_write_text(out / "ood.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "ood.md", ood_markdown(table))
    res.files += [out / "ood.json", out / "ood.md"]

    sets = ([(f"{train_spec} (in, train)", train.bpd)] if train else []) + \
        [(f"{in_spec} (in, test)", in_test.bpd)] + [(f"{d.spec} (OOD)", d.bpd) for d in oods]
    res.files.append(plot_distributions(sets, out / "distributions.png", seed=seed))

    try:
        ood_hi = [_extreme_panel(d, k, True, loader, data_root) for d in oods]
        ood_lo = [_extreme_panel(d, k, False, loader, data_root) for d in oods]
        in_lo = _extreme_panel(in_test, k, False, loader, data_root)
        in_hi = _extreme_panel(in_test, k, True, loader, data_root)
        res.files.append(plot_extremes([*ood_hi, in_lo], out / "exp1.png",
                                       "OOD images with the highest likelihood vs in-distribution test with the lowest"))
        res.files.append(plot_extremes([*ood_lo, in_hi], out / "exp2.png",
                                       "OOD images with the lowest likelihood vs in-distribution test with the highest"))
    except (FileNotFoundError, KeyError) as e:
        for name in ("exp1.png", "exp2.png"):
            res.skipped[name] = f"images not readable ({e}); pass --data-root"
        log.warning("exp1/exp2 skipped: %s", e)

    samples = [step_dir / "samples.png", Path(run_dir) / "samples" / f"step-{in_test.step:08d}.png"]
    src = next((p for p in samples if p.is_file()), None)
    if src is None:
        res.skipped["samples.png"] = f"none of {[str(p) for p in samples]} exists; run --task samples"
    else:
        atomic_write_bytes(out / "samples.png", src.read_bytes())
        res.files.append(out / "samples.png")
    log_figures_to_wandb(res.files, in_test.step)
    return res
