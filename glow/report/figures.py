"""The figures of one run: bits/dim distributions, most/least likely images, samples, OOD table files.

`make_figures` reads the dumps of one evaluated checkpoint (scores come from the dumps
alone; the shards are read only for the images of exp1/exp2) and writes
`runs/<name>/figures/`: distributions.png, exp1.png, exp2.png, samples.png, ood.json,
ood.md and index.html (all of it on one page). The OOD table itself is computed by
:mod:`glow.report.scores`; a tracker, when given, gets the table, the bits/dim and the figures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from glow.errors import BadArgument  # noqa: E402
from glow.evaluation.dumps import Dump  # noqa: E402
from glow.evaluation.result_tables import read_table  # noqa: E402
from glow.files import (  # noqa: E402
    UnsafeFile,
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_text,
    read_bytes,
)
from glow.report.intervals import DEFAULT_BOOTSTRAP, Bootstrap  # noqa: E402
from glow.report.page import MAX_IMAGE_BYTES, write_index  # noqa: E402
from glow.report.scores import ood_markdown, ood_table  # noqa: E402
from glow.run import Run  # noqa: E402

log = logging.getLogger(__name__)

ImageLoader = Callable[[str, str, str, Sequence[str]], dict]  # (root, dataset, split, keys) -> key -> HxWx3


@dataclass
class FiguresResult:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why
    table: dict = field(default_factory=dict)


def default_image_loader(root, dataset, split, keys) -> dict:
    from glow.data.streams import load_images

    return load_images(root, dataset, split, keys)


# --------------------------------------------------------------------------- plots


BPD_AXIS = "bits/dim"
CONTINUOUS_BPD_AXIS = "bits/dim (continuous; may be negative)"  # a flow on feature vectors


def plot_distributions(sets: Sequence[tuple[str, np.ndarray]], path: Path,
                       clip: tuple[float, float] = (0.5, 99.5), kde_max: int = 20000, seed: int = 0,
                       axis: str = BPD_AXIS) -> Path:
    """Histograms + Gaussian-KDE curves of bits/dim; the x-range is clipped at pooled percentiles.
    ``axis`` names the quantity (`CONTINUOUS_BPD_AXIS` for feature vectors)."""
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
    ax.set_xlabel(f"{axis}  (x clipped to pooled percentiles {clip[0]:g}-{clip[1]:g}: [{lo:.3f}, {hi:.3f}]; "
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


def plot_auroc_matrix(auroc: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                      path: Path, texts: Sequence[Sequence[str]] | None = None) -> Path:
    """Heatmap of an AUROC matrix (rows x columns, NaN = no value) with each value (or ``texts``)
    written in its cell; a diverging map centred on 0.5, so red (below 0.5: OOD looks more
    likely) stands out."""
    auroc = np.asarray(auroc, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(col_labels), 1.0 + 0.7 * len(row_labels)))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(auroc), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(auroc):
        text = texts[i][j] if texts is not None else ("-" if np.isnan(v) else f"{v:.2f}")
        ax.text(j, i, text, ha="center", va="center", fontsize=9,
                color="white" if not np.isnan(v) and abs(v - 0.5) > 0.35 else "black")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_xlabel("OOD set")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="AUROC")
    return atomic_save_figure(fig, path, bbox_inches="tight")


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


def make_figures(run_dir: str | Path, in_dataset: str, ood_specs: Sequence[str], *, step: int | None = None,
                 in_split: str = "test", train_split: str = "train", out_dir: str | Path | None = None,
                 data_root: str | None = None, k: int = 16, seed: int = 0, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
                 image_loader: ImageLoader | None = None, tracker=None, allow_shared: bool = False) -> FiguresResult:
    """Write figures/ for one run from the dumps of one evaluated step (newest by default).

    Every metric of the OOD table comes with its interval drawn as ``bootstrap`` says.
    Also writes ``index.html``, the one page of results (:mod:`glow.report.page`).
    ``tracker`` (a :class:`glow.tracking.Tracker`, optional) receives the OOD table, the
    bits/dim per split and the PNG figures. The run must be the user's and so must every file
    read from it (glow.trust), unless ``allow_shared``; nothing is written before that is known.
    """
    loader = image_loader or default_image_loader
    run = Run(run_dir, allow_shared)
    run.check_trusted()
    step = run.eval_step(step)
    out = Path(out_dir) if out_dir is not None else run.figures_dir
    res = FiguresResult(out_dir=out)
    if not ood_specs:
        raise BadArgument("give at least one OOD set (--ood <dataset>/<split>)")
    in_spec, train_spec = f"{in_dataset}/{in_split}", f"{in_dataset}/{train_split}"
    dumps = run.load_dumps(step, [in_spec, *ood_specs], optional=[train_spec])
    in_test, oods, train = dumps[in_spec], [dumps[s] for s in ood_specs], dumps.get(train_spec)
    own = not run.allow_shared
    if train is None:
        log.warning("no training dump %s: distributions without train, no typicality scores",
                    run.dump_path(step, train_spec))

    table = ood_table(in_test, oods, train, seed=seed, bootstrap=bootstrap)
    res.table = table
    atomic_write_text(out / "ood.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "ood.md", ood_markdown(table))
    res.files += [out / "ood.json", out / "ood.md"]

    sets = ([(f"{train_spec} (in, train)", train.bpd)] if train else []) + \
        [(f"{in_spec} (in, test)", in_test.bpd)] + [(f"{d.spec} (OOD)", d.bpd) for d in oods]
    axis = CONTINUOUS_BPD_AXIS if in_test.vectors else BPD_AXIS
    res.files.append(plot_distributions(sets, out / "distributions.png", seed=seed, axis=axis))

    if in_test.vectors and data_root is None:
        for name in ("exp1.png", "exp2.png"):
            res.skipped[name] = ("the dumps score feature vectors: pass --data-root with the image shards they were "
                                 "extracted from to see the images")
    else:
        _extreme_figures(res, in_test, oods, k, loader, data_root, out)

    samples = [run.eval_dir(step) / "samples.png", run.samples_path(in_test.step)]
    copied = next((blob for p in samples if (blob := _read_image(p, own)) is not None), None)
    if copied is None and in_test.vectors:
        res.skipped["samples.png"] = "a flow on feature vectors has no sample grid"
    elif copied is None:
        res.skipped["samples.png"] = f"none of {[str(p) for p in samples]} is a PNG; run --task samples"
    else:
        atomic_write_bytes(out / "samples.png", copied)
        res.files.append(out / "samples.png")
    images = [p for p in res.files if p.suffix == ".png"]
    res.files.append(write_index(out, table, images, run_name=run.name, config_text=run.config_text(),
                                 fid=read_table(run.eval_dir(step) / "fid.json", own)))
    if tracker is not None:
        track_figures(tracker, table, images)
    return res


def _extreme_figures(res: FiguresResult, in_test: Dump, oods: Sequence[Dump], k: int, loader: ImageLoader,
                     data_root: str | None, out: Path) -> None:
    """exp1.png / exp2.png: the most and least likely images of each set (or why they are skipped)."""
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


def _read_image(path: Path, own: bool) -> bytes | None:
    """A PNG from the run directory (no link followed, capped, and with ``own`` the user's own
    file), or None when there is none. Anything that is not a PNG is refused: the figures folder
    and index.html copy it."""
    try:
        blob = read_bytes(path, MAX_IMAGE_BYTES, own=own)
    except FileNotFoundError:
        return None
    if not blob.startswith(b"\x89PNG\r\n\x1a\n"):
        raise UnsafeFile(f"{path} is not a PNG file: refused (it would be copied into the figures)")
    return blob


def track_figures(tracker, table: dict, images: Sequence[Path]) -> None:
    """The OOD table (a wandb.Table), bits/dim per split (summary) and the figures (images)."""
    step = int(table["step"])
    tracker.log_summary({f"bpd/{spec}": v["mean"] for spec, v in table["bpd"].items()})
    columns = ["ood_set", "score", "auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "n_in", "n_out",
               "auroc_low", "auroc_high"]
    rows = [[spec, name, *(r[c] for c in columns[2:8]), *(r.get("intervals") or {}).get("auroc", [None, None])]
            for spec, scores in table["ood"].items() for name, r in scores.items()]
    tracker.log_table("ood_table", columns, rows, step=step)
    tracker.log_summary({f"auroc/{spec}/{name}": r["auroc"] for spec, scores in table["ood"].items()
                         for name, r in scores.items()})
    for path in images:
        tracker.log_image(f"figures/{path.stem}", path, step=step)
