"""The OOD benchmark matrix of the literature: one run per in-distribution set, one column per
OOD set, AUROC in each cell (Nalisnick et al. 2019; Kirichenko et al. 2020, Table 1).

Each row is one run (one model, its in-distribution test split); each cell is the OOD table of
:func:`glow.report.scores.ood_table` for that (model, OOD set) pair, computed from the run's dumps of one
evaluated step, so every score of ``ood.json`` is in ``matrix.json``; ``matrix.md`` and the
heatmap ``matrix.png`` show the AUROC of one chosen score (log-likelihood by default). A cell
whose dump is missing is shown as such (the note says which `eval/evaluate.py` run makes it);
the cell of a row's own in-distribution set is left empty. Every metric carries its bootstrap
interval (`glow.report.intervals.Bootstrap`); matrix.md and the terminal show it beside the
AUROC, the heatmap the point value. With ``--group-seeds`` the runs of one recipe
(`glow.report.seeds.group_by_stem`) make one row: each metric's mean, standard deviation and N,
the runs' own rows under ``per_run``. Reads only files on disk; no GPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glow.errors import BadArgument
from glow.evaluation.dumps import Dump
from glow.files import atomic_write_text
from glow.names import parse_spec
from glow.report.intervals import DEFAULT_BOOTSTRAP, Bootstrap
from glow.report.scores import metric_cell, ood_table, test_bpd_cell
from glow.report.seeds import SeedRun, group_by_stem, metric_summary, seed_entry
from glow.report.tables import cell, markdown_table
from glow.run import Run

log = logging.getLogger(__name__)

__all__ = ["MatrixRow", "auroc_grid", "format_cell", "load_row", "matrix_markdown", "matrix_table", "parse_run",
           "seed_groups", "write_matrix"]

DEFAULT_SCORE = "log_likelihood"


@dataclass
class MatrixRow:
    """One in-distribution model: its held-out dump, optional training dump and its OOD dumps."""

    label: str
    run_dir: Path
    in_test: Dump
    train: Dump | None = None
    oods: dict[str, Dump] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def in_spec_of(run_dir: Path, in_split: str) -> str:
    """``<data.dataset of the run's config.yaml>/<in_split>``: the set the run was trained on."""
    run = Run(run_dir)
    if run.config_text() is None:
        raise BadArgument(f"{run.config_path} not found: name the in-distribution set as --run {run_dir}=DATASET/SPLIT")
    dataset = (run.config().get("data") or {}).get("dataset")
    if not dataset:
        raise BadArgument(f"{run.config_path} names no data.dataset: name the in-distribution set as "
                          f"--run {run_dir}=DATASET/SPLIT")
    return f"{dataset}/{in_split}"


def parse_run(arg: str, in_split: str = "test") -> tuple[Path, str]:
    """``DIR`` (in-distribution set from its config.yaml) or ``DIR=DATASET/SPLIT``."""
    path, sep, spec = arg.partition("=")
    if sep:
        parse_spec(spec)
        return Path(path), spec
    return Path(arg), in_spec_of(Path(arg), in_split)


def load_row(run_dir: str | Path, in_spec: str, ood_specs: Sequence[str], *, step: int | None = None,
             train_split: str = "train", label: str | None = None) -> MatrixRow:
    """The dumps of one run at one evaluated step (newest by default); absent OOD dumps are listed."""
    run = Run(run_dir)
    step = run.eval_step(step)
    others = [s for s in ood_specs if s != in_spec]
    train_spec = f"{parse_spec(in_spec)[0]}/{train_split}"
    dumps = run.load_dumps(step, [in_spec], optional=[*others, *([train_spec] if train_spec != in_spec else [])])
    return MatrixRow(label=label or run.name, run_dir=run.path, in_test=dumps[in_spec], train=dumps.get(train_spec)
                     if train_spec != in_spec else None, oods={s: dumps[s] for s in others if s in dumps},
                     missing=[s for s in others if s not in dumps])


def matrix_table(rows: Sequence[MatrixRow], ood_specs: Sequence[str], score: str = DEFAULT_SCORE,
                 seed: int = 0, *, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
                 groups: Sequence[tuple[str, dict]] | None = None) -> dict:
    """rows x OOD sets; each cell holds every score's metrics (None: missing, or the row's own set).
    ``groups`` (`seed_groups`): the rows of each group become one row (mean, sd and N over seeds)."""
    if not rows or not ood_specs:
        raise BadArgument("the matrix needs at least one run (--run) and one OOD set (--ood)")
    table = {"score": score, "ood_sets": list(ood_specs), "intervals": bootstrap.describe(), "rows": [], "notes": [
        "Rows: the in-distribution model (one run each); columns: OOD sets. Scores are oriented higher = more "
        "in-distribution, in-distribution is the positive class: AUROC < 0.5 means the OOD set looks MORE "
        "in-distribution than the model's own held-out data.",
        bootstrap.note(),
    ]}
    for row in rows:
        d = row.in_test
        one = ood_table(d, list(row.oods.values()), row.train, seed=seed, bootstrap=bootstrap)
        table["rows"].append({
            "label": row.label, "run_dir": str(row.run_dir), "in_distribution": d.spec, "step": d.step,
            "model_hash": d.model_hash, "checkpoint": d.checkpoint, "n_bits": d.n_bits,
            "test_bpd": float(d.bpd.mean()), "train": row.train.spec if row.train is not None else None,
            "cells": {s: one["ood"].get(s) for s in ood_specs}, "missing": list(row.missing),
        })
        if row.missing:
            table["notes"].append(
                f"{row.label}: no dump for {', '.join(row.missing)} at step {d.step}; make it with `eval/evaluate.py "
                f"--checkpoint {row.run_dir}/checkpoints/latest --task dump "
                + " ".join(f"--data {s}" for s in row.missing) + "` (add --convert-channels across gray/RGB)")
    seen = list(dict.fromkeys(name for r in table["rows"] for c in r["cells"].values() if c for name in c))
    if seen and score not in seen:
        raise BadArgument(f"score {score!r} is in no cell; the dumps give {seen}")
    table["scores"] = seen
    if groups is not None:
        _group_rows(table, groups)
    return table


def seed_groups(runs: Sequence[tuple[Path, str]]) -> list[tuple[str, dict]]:
    """The runs (``(run dir, in-distribution spec)``, labelled by folder name) grouped as seeds of
    their recipes (`glow.report.seeds.group_by_stem`, from each config.yaml); refused
    (BadArgument) when the runs of one group differ in anything but the seed or in the
    in-distribution set they are scored on."""
    labelled = [(Run(path), spec) for path, spec in runs]
    groups = group_by_stem([SeedRun(run.name, run.config()) for run, _ in labelled])
    spec_of = {run.name: spec for run, spec in labelled}
    for stem, group in groups:
        specs = {label: spec_of[label] for label in group["runs"]}
        if len(set(specs.values())) > 1:
            raise BadArgument(f"the seeds of {stem} are scored on different in-distribution sets {specs}: "
                              "give them the same --run DIR=DATASET/SPLIT")
    return groups


def _group_rows(table: dict, groups: Sequence[tuple[str, dict]]) -> None:
    """Replace the runs' rows by one row per seed group: cells of `seed_entry` per score, test
    bits/dim as a mean (``test_bpd_seeds``: its summary), the runs' rows under ``per_run``."""
    by_label = {r["label"]: r for r in table["rows"]}
    rows = []
    for stem, group in groups:
        members = {label: by_label[label] for label in group["runs"]}
        first = next(iter(members.values()))
        bpd = metric_summary("test_bpd", {label: r["test_bpd"] for label, r in members.items()})
        cells = {}
        for spec in table["ood_sets"]:
            present = [r["cells"][spec] for r in members.values() if r["cells"][spec]]
            names = list(dict.fromkeys(name for c in present for name in c))
            cells[spec] = {name: seed_entry({label: (r["cells"][spec] or {}).get(name) for label, r in members.items()})
                           for name in names} or None
        rows.append({"label": stem, "runs": group["runs"], "seeds": group["seeds"], "run_dir": None,
                     "in_distribution": first["in_distribution"], "step": None, "model_hash": None,
                     "checkpoint": None, "n_bits": first["n_bits"], "test_bpd": bpd["mean"], "test_bpd_seeds": bpd,
                     "train": first["train"], "cells": cells,
                     "missing": list(dict.fromkeys(s for r in members.values() for s in r["missing"])),
                     "per_run": members})
    table["rows"] = rows
    table["notes"].append("Rows of several seeds (--group-seeds) show mean ± sample standard deviation (N=runs) "
                          "of the AUROC over the seeds; each run's cells and intervals are under per_run in "
                          "matrix.json.")


def auroc_grid(table: dict, score: str | None = None) -> np.ndarray:
    """AUROC of ``score`` (default: the table's) as rows x OOD sets, NaN where there is none."""
    score = score or table["score"]
    return np.array([[np.nan if not (r["cells"][s] and score in r["cells"][s]) else r["cells"][s][score]["auroc"]
                      for s in table["ood_sets"]] for r in table["rows"]], dtype=np.float64)


def format_cell(row: dict, spec: str, score: str, detail: bool = True) -> str:
    """A matrix row's cell as text: the AUROC (with ``detail``, its interval or, for seeds,
    ``mean ± sd (N)``; without, the point value or mean, as on the heatmap), ``(in)``,
    ``missing`` or ``n/a``."""
    entries = row["cells"][spec]
    if spec == row["in_distribution"]:
        return "(in)"
    if entries is None:
        return "missing"
    if score not in entries or entries[score] is None:
        return "n/a"
    return cell(metric_cell(entries[score], "auroc") if detail else entries[score]["auroc"], 3)


def matrix_markdown(table: dict) -> str:
    chosen, specs = table["score"], table["ood_sets"]
    lines = [f"# OOD benchmark matrix: AUROC of `{chosen}`", ""]
    for k, score in enumerate([chosen] + [s for s in table["scores"] if s != chosen]):
        if k:
            lines += [f"## AUROC of `{score}`", ""]
        header = ["model (in-distribution)", *(["test bits/dim"] if k == 0 else []), *specs]
        rows = [[f"{r['label']} ({r['in_distribution']})", *([test_bpd_cell(r)] if k == 0 else []),
                 *(format_cell(r, s, score) for s in specs)] for r in table["rows"]]
        lines += [*markdown_table(header, rows), ""]
    runs = [run for r in table["rows"] for run in (r.get("per_run") or {r["label"]: r}).values()]
    lines += markdown_table(["model", "run", "step", "model hash", "bits"],
                            [[r["label"], r["run_dir"], r["step"], f"`{r['model_hash']}`", r["n_bits"]] for r in runs])
    lines += [""] + [f"- {n}" for n in table["notes"]] + [
        "- `(in)`: the model's own in-distribution set; `missing`: no dump; `n/a`: the score needs data the dumps "
        "lack (complexity_bpd, or a training dump for typicality). Every score and metric is in matrix.json.", ""]
    return "\n".join(lines)


def write_matrix(run_args: Sequence[str], ood_specs: Sequence[str], out_dir: str | Path, *,
                 score: str = DEFAULT_SCORE, step: int | None = None, in_split: str = "test",
                 train_split: str = "train", seed: int = 0, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
                 group_seeds: bool = False) -> tuple[dict, list[Path]]:
    """Load every run, write matrix.json, matrix.md and the heatmap matrix.png under ``out_dir``;
    with ``group_seeds``, the seeds of each recipe in one row (`seed_groups`)."""
    from glow.report.figures import plot_auroc_matrix

    for s in ood_specs:
        parse_spec(s)
    runs = [parse_run(a, in_split) for a in run_args]
    labels = [Run(path).name for path, _ in runs]
    if len(set(labels)) != len(labels):
        raise BadArgument(f"two runs have the same folder name ({labels}); the rows need distinct names")
    groups = seed_groups(runs) if group_seeds else None  # refused before any dump is read
    rows = [load_row(path, spec, ood_specs, step=step, train_split=train_split) for path, spec in runs]
    table = matrix_table(rows, ood_specs, score, seed=seed, bootstrap=bootstrap, groups=groups)
    out = Path(out_dir)
    atomic_write_text(out / "matrix.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "matrix.md", matrix_markdown(table))
    texts = [[format_cell(r, s, score, detail=False) for s in table["ood_sets"]] for r in table["rows"]]
    png = plot_auroc_matrix(auroc_grid(table), [f"{r['label']}\n({r['in_distribution']})" for r in table["rows"]],
                            table["ood_sets"], f"AUROC of {score} (in-distribution positive)", out / "matrix.png",
                            texts=texts)
    return table, [out / "matrix.json", out / "matrix.md", png]
