"""The OOD benchmark matrix of the literature: one run per in-distribution set, one column per
OOD set, AUROC in each cell (Nalisnick et al. 2019; Kirichenko et al. 2020, Table 1).

Each row is one run (one model, its in-distribution test split); each cell is the OOD table of
:func:`glow.report.scores.ood_table` for that (model, OOD set) pair, computed from the run's dumps of one
evaluated step, so every score of ``ood.json`` is in ``matrix.json``; ``matrix.md`` and the
heatmap ``matrix.png`` show the AUROC of one chosen score (log-likelihood by default). A cell
whose dump is missing is shown as such (the note says which `eval/evaluate.py` run makes it);
the cell of a row's own in-distribution set is left empty. Reads only files on disk; no GPU.
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
from glow.report.scores import ood_table
from glow.report.tables import markdown_table
from glow.run import Run

log = logging.getLogger(__name__)

__all__ = ["MatrixRow", "auroc_grid", "format_cell", "load_row", "matrix_markdown", "matrix_table", "parse_run",
           "write_matrix"]

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
                 seed: int = 0) -> dict:
    """rows x OOD sets; each cell holds every score's metrics (None: missing, or the row's own set)."""
    if not rows or not ood_specs:
        raise BadArgument("the matrix needs at least one run (--run) and one OOD set (--ood)")
    table = {"score": score, "ood_sets": list(ood_specs), "rows": [], "notes": [
        "Rows: the in-distribution model (one run each); columns: OOD sets. Scores are oriented higher = more "
        "in-distribution, in-distribution is the positive class: AUROC < 0.5 means the OOD set looks MORE "
        "in-distribution than the model's own held-out data.",
    ]}
    for row in rows:
        d = row.in_test
        one = ood_table(d, list(row.oods.values()), row.train, seed=seed)
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
    return table


def auroc_grid(table: dict, score: str | None = None) -> np.ndarray:
    """AUROC of ``score`` (default: the table's) as rows x OOD sets, NaN where there is none."""
    score = score or table["score"]
    return np.array([[np.nan if not (r["cells"][s] and score in r["cells"][s]) else r["cells"][s][score]["auroc"]
                      for s in table["ood_sets"]] for r in table["rows"]], dtype=np.float64)


def format_cell(row: dict, spec: str, score: str) -> str:
    """A matrix row's cell as text: the AUROC, ``(in)``, ``missing`` or ``n/a``."""
    cell = row["cells"][spec]
    if spec == row["in_distribution"]:
        return "(in)"
    if cell is None:
        return "missing"
    return f"{cell[score]['auroc']:.3f}" if score in cell else "n/a"


def matrix_markdown(table: dict) -> str:
    chosen, specs = table["score"], table["ood_sets"]
    lines = [f"# OOD benchmark matrix: AUROC of `{chosen}`", ""]
    for k, score in enumerate([chosen] + [s for s in table["scores"] if s != chosen]):
        if k:
            lines += [f"## AUROC of `{score}`", ""]
        header = ["model (in-distribution)", *(["test bits/dim"] if k == 0 else []), *specs]
        rows = [[f"{r['label']} ({r['in_distribution']})", *([r["test_bpd"]] if k == 0 else []),
                 *(format_cell(r, s, score) for s in specs)] for r in table["rows"]]
        lines += [*markdown_table(header, rows), ""]
    lines += markdown_table(["model", "run", "step", "model hash", "bits"],
                            [[r["label"], r["run_dir"], r["step"], f"`{r['model_hash']}`", r["n_bits"]]
                             for r in table["rows"]])
    lines += [""] + [f"- {n}" for n in table["notes"]] + [
        "- `(in)`: the model's own in-distribution set; `missing`: no dump; `n/a`: the score needs data the dumps "
        "lack (complexity_bpd, or a training dump for typicality). Every score and metric is in matrix.json.", ""]
    return "\n".join(lines)


def write_matrix(run_args: Sequence[str], ood_specs: Sequence[str], out_dir: str | Path, *,
                 score: str = DEFAULT_SCORE, step: int | None = None, in_split: str = "test",
                 train_split: str = "train", seed: int = 0) -> tuple[dict, list[Path]]:
    """Load every run, write matrix.json, matrix.md and the heatmap matrix.png under ``out_dir``."""
    from glow.report.figures import plot_auroc_matrix

    for s in ood_specs:
        parse_spec(s)
    rows = [load_row(path, spec, ood_specs, step=step, train_split=train_split)
            for path, spec in (parse_run(a, in_split) for a in run_args)]
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise BadArgument(f"two runs have the same folder name ({labels}); the rows need distinct names")
    table = matrix_table(rows, ood_specs, score, seed=seed)
    out = Path(out_dir)
    atomic_write_text(out / "matrix.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "matrix.md", matrix_markdown(table))
    texts = [[format_cell(r, s, score) for s in table["ood_sets"]] for r in table["rows"]]
    png = plot_auroc_matrix(auroc_grid(table), [f"{r['label']}\n({r['in_distribution']})" for r in table["rows"]],
                            table["ood_sets"], f"AUROC of {score} (in-distribution positive)", out / "matrix.png",
                            texts=texts)
    return table, [out / "matrix.json", out / "matrix.md", png]
