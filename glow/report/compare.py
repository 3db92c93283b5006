"""Several runs side by side, and the likelihood-ratio score of Ren et al. (2019).

`compare_runs` reads the evaluation dumps of several runs (model variants) and writes
`compare.json` / `compare.md`: one row per (variant, score) with AUROC / AUPR / FPR@95 for each
OOD set and the in-distribution test bits/dim. Scores (higher = more in-distribution):

* ``log_likelihood``: log p(x) of the run's model;
* ``complexity_corrected``: L(x) - bpd(x) (Serra et al. 2020), when the dumps carry L(x);
* ``likelihood_ratio``: log p_fg(x) - log p_bg(x) (Ren et al. 2019), when a background run is
  given: a model of the same family trained on inputs whose values are replaced by uniform
  noise with probability mu (`data.perturb_prob`). The background explains the generic local
  statistics, so the ratio keeps what is specific to the in-distribution data;
* ``png_complexity``: -L(x) alone, once, as the model-free baseline (variant ``(PNG size)``).

Every metric comes with its bootstrap interval (`glow.report.intervals.Bootstrap`). With seed
groups (``--group-seeds``: `glow.report.seeds.group_by_stem` on the runs' config.yaml), the
runs of one recipe become one row per score: each metric's mean, standard deviation and N
(``"seeds"``), each run's own row under ``"per_run"``.

Reads only files on disk; no GPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glow.errors import BadArgument, ResultsInvalid
from glow.evaluation.dumps import Dump
from glow.files import atomic_write_text
from glow.report.intervals import DEFAULT_BOOTSTRAP, Bootstrap, metrics_with_intervals
from glow.report.scores import metric_cell, score_pairs, test_bpd_cell
from glow.report.seeds import SeedRun, group_by_stem, metric_summary, seed_entry
from glow.report.tables import markdown_table
from glow.run import Checkpoint, Run

log = logging.getLogger(__name__)

__all__ = ["RunDumps", "compare_markdown", "compare_runs", "compare_table", "load_run_dumps", "seed_groups"]

BASELINE = "(PNG size)"


@dataclass
class RunDumps:
    """The dumps of one evaluated step of one run: the in-distribution test split and the OOD sets."""

    label: str
    run_dir: Path
    in_test: Dump
    oods: list[Dump]
    model: dict = field(default_factory=dict)  # variant fields from the checkpoint's meta.json, if present

    @property
    def step(self) -> int:
        return self.in_test.step


def _run_description(dump: Dump) -> dict:
    """The variant-defining fields of the evaluated checkpoint's meta.json (empty if it is gone)."""
    try:
        meta = Checkpoint.at(dump.checkpoint).meta()
    except (OSError, ValueError) as err:  # a description only: never fail the comparison on it
        log.warning("no description of %s: %s", dump.checkpoint, err)
        return {}
    model = meta.get("model_config", {})
    keys = ("kind", "mask", "coupling_bottleneck", "coupling", "hidden_channels", "n_levels", "steps_per_level",
            "dim", "n_couplings", "hidden_width", "hidden_layers")
    desc = {k: model[k] for k in keys if k in model}
    desc["perturb_prob"] = meta.get("perturb_prob", 0.0)
    return desc


def load_run_dumps(run_dir: str | Path, in_spec: str, ood_specs: Sequence[str], *, step: int | None = None,
                   label: str | None = None) -> RunDumps:
    run = Run(run_dir)
    step = run.eval_step(step)
    dumps = run.load_dumps(step, [in_spec, *ood_specs])
    return RunDumps(label=label or run.name, run_dir=run.path, in_test=dumps[in_spec],
                    oods=[dumps[s] for s in ood_specs], model=_run_description(dumps[in_spec]))


def _row(variant: str, score: str, run: RunDumps | None, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
         bootstrap: Bootstrap, **extra) -> dict:
    row = {"variant": variant, "score": score}
    if run is not None:
        row.update(run=str(run.run_dir), step=run.step, model_hash=run.in_test.model_hash,
                   test_bpd=float(run.in_test.bpd.mean()))
    else:
        row.update(run=None, step=None, model_hash=None, test_bpd=None)
    row.update(extra)
    row["ood"] = {spec: metrics_with_intervals(*pair, bootstrap) for spec, pair in pairs.items()}
    return row


def compare_table(runs: Sequence[RunDumps], background: RunDumps | None = None, *,
                  bootstrap: Bootstrap = DEFAULT_BOOTSTRAP, groups: Sequence[tuple[str, dict]] | None = None) -> dict:
    """Every (variant, score) row; see the module docstring for the scores. ``groups`` (`seed_groups`):
    the runs of each group become one row per score (mean, sd and N over the seeds)."""
    if not runs:
        raise BadArgument("give at least one run to compare (--run runs/<name>)")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise BadArgument(f"run labels must be unique, got {labels}; name the runs differently")
    ref = runs[0]
    specs = [d.spec for d in ref.oods]
    for r in [*runs[1:], *([background] if background else [])]:
        if r.in_test.spec != ref.in_test.spec or [d.spec for d in r.oods] != specs:
            raise ResultsInvalid(f"{r.run_dir} was loaded for {r.in_test.spec} vs {[d.spec for d in r.oods]}, "
                             f"not {ref.in_test.spec} vs {specs}")
    table: dict = {
        "in_distribution": ref.in_test.spec,
        "ood_sets": specs,
        "runs": {r.label: {"run_dir": str(r.run_dir), "step": r.step, "model_hash": r.in_test.model_hash,
                           "checkpoint": r.in_test.checkpoint, "model": r.model,
                           "bpd": {d.spec: float(d.bpd.mean()) for d in [r.in_test, *r.oods]}} for r in runs},
        "background": None,
        "intervals": bootstrap.describe(),
        "rows": [],
        "notes": [
            "Scores are oriented higher = more in-distribution; in-distribution is the positive class; "
            "AUROC < 0.5 means the OOD set looks more in-distribution than held-out in-distribution data.",
            "test_bpd is the mean bits/dim of the in-distribution test split under the run's model.",
            bootstrap.note(),
        ],
    }
    if background is not None:
        table["background"] = {"label": background.label, "run_dir": str(background.run_dir),
                               "step": background.step, "model_hash": background.in_test.model_hash,
                               "model": background.model, "test_bpd": float(background.in_test.bpd.mean())}
        table["notes"].append(
            f"likelihood_ratio = log p(x) - log p_bg(x) (Ren et al. 2019), background {background.label} "
            f"(perturb_prob {background.model.get('perturb_prob', 'unknown')})."
        )
    for r in runs:
        if background is not None and background.in_test.model_hash != r.in_test.model_hash:
            log.warning("background %s has another architecture (model hash %s) than %s (%s)", background.label,
                        background.in_test.model_hash, r.label, r.in_test.model_hash)
        per_ood = {d.spec: score_pairs(r.in_test, d, model_free=False,
                                       background=None if background is None else (background.in_test, b))
                   for d, b in zip(r.oods, background.oods if background is not None else [None] * len(r.oods))}
        for name in next(iter(per_ood.values())):
            extra = {"background": background.label} if name == "likelihood_ratio" else {}
            table["rows"].append(_row(r.label, name, r, {spec: pairs[name] for spec, pairs in per_ood.items()},
                                      bootstrap, **extra))
    if groups is not None:
        _group_rows(table, groups)
    _note_kinds_and_samples(table, runs)
    # the model-free baseline from the first run whose dumps carry L(x) (a features flow's do not)
    with_png = next((r for r in runs if all(d.complexity_bpd is not None for d in [r.in_test, *r.oods])), None)
    if with_png is not None:
        baseline = {d.spec: score_pairs(with_png.in_test, d)["png_complexity"] for d in with_png.oods}
        table["rows"].append(_row(BASELINE, "png_complexity", None, baseline, bootstrap))
    else:
        table["notes"].append("the dumps carry no complexity_bpd: no complexity_corrected / png_complexity rows")
    return table


def _note_kinds_and_samples(table: dict, runs: Sequence[RunDumps]) -> None:
    """Notes for an image flow beside a features flow: their bits/dim do not compare, and whether
    their dumps hold the same samples (by key: a features dump keeps its images' keys)."""
    kinds = {r.label: "vectors" if r.in_test.vectors else "images" for r in runs}
    if len(set(kinds.values())) < 2:
        return
    table["notes"].append(
        f"Runs on feature vectors ({', '.join(k for k, v in kinds.items() if v == 'vectors')}) beside runs on images: "
        "their test bits/dim do not compare (continuous bits/dim of features vs discrete bits/dim of pixels); "
        "their AUROCs do, on the same samples.")
    for i, spec in enumerate([runs[0].in_test.spec, *(d.spec for d in runs[0].oods)]):
        keys = {r.label: set([r.in_test, *r.oods][i].key.tolist()) for r in runs}
        differ = [label for label, k in keys.items() if k != keys[runs[0].label]]
        if differ:
            table["notes"].append(f"{spec}: the dumps of {', '.join(differ)} hold other samples (keys) than "
                                  f"{runs[0].label}'s: the rows are not measured on the same data")


def seed_groups(run_dirs: Sequence[str | Path]) -> list[tuple[str, dict]]:
    """The runs (labelled by folder name) grouped as seeds of their recipes
    (`glow.report.seeds.group_by_stem`) from each run's config.yaml; refused (BadArgument,
    naming the keys) when the runs of one group differ in anything but the seed."""
    runs = [Run(d) for d in run_dirs]
    return group_by_stem([SeedRun(run.name, run.config()) for run in runs])


def _group_rows(table: dict, groups: Sequence[tuple[str, dict]]) -> None:
    """Replace the per-run rows by one row per (group, score): ``ood`` entries of `seed_entry`,
    ``test_bpd`` the mean (``test_bpd_seeds`` its summary), each run's row under ``per_run``."""
    by_run: dict[str, dict[str, dict]] = {}
    for row in table["rows"]:
        by_run.setdefault(row["variant"], {})[row["score"]] = row
    rows = []
    for stem, group in groups:
        members = group["runs"]
        scores = list(dict.fromkeys(score for label in members for score in by_run[label]))
        bpd = metric_summary("test_bpd", {label: next(iter(by_run[label].values()))["test_bpd"] for label in members})
        for score in scores:
            per_run = {label: by_run[label].get(score) for label in members}
            present = [r for r in per_run.values() if r is not None]
            row = {"variant": stem, "score": score, "runs": members, "seeds": group["seeds"], "run": None,
                   "step": None, "model_hash": None, "test_bpd": bpd["mean"], "test_bpd_seeds": bpd}
            row.update({k: v for k, v in present[0].items() if k == "background"})
            row["ood"] = {spec: seed_entry({label: r and r["ood"][spec] for label, r in per_run.items()})
                          for spec in table["ood_sets"]}
            row["per_run"] = per_run
            rows.append(row)
    table["rows"] = rows
    table["seed_groups"] = {stem: {"runs": g["runs"], "seeds": g["seeds"]} for stem, g in groups}
    table["notes"].append("Rows of several seeds (--group-seeds) show mean ± sample standard deviation (N=runs) "
                          "over the seeds; each run's values and intervals are under per_run in compare.json.")


def compare_markdown(table: dict) -> str:
    specs = table["ood_sets"]
    header = ["variant", "model", "score", "test bits/dim"]
    header += [f"{s} {metric}" for s in specs for metric in ("AUROC", "AUPR-in", "FPR@95")]
    rows = []
    for row in table["rows"]:
        model = table["runs"].get(row.get("runs", [row["variant"]])[0], {}).get("model", {})
        shown = ("mask", "coupling_bottleneck", "perturb_prob") if model.get("kind", "glow") == "glow" else (
            "kind", "dim", "n_couplings", "hidden_width")
        desc = ", ".join(f"{k}={v}" for k, v in model.items() if k in shown)
        rows.append([row["variant"], desc or "-", row["score"], test_bpd_cell(row)]
                    + [metric_cell(row["ood"][s], k) for s in specs for k in ("auroc", "aupr_in", "fpr_at_95_tpr")])
    runs = [[label, r["run_dir"], r["step"], f"`{r['model_hash']}`"] for label, r in table["runs"].items()]
    if table["background"]:
        b = table["background"]
        runs.append([f"background: {b['label']}", b["run_dir"], b["step"], f"`{b['model_hash']}`"])
    lines = [f"# Comparison: in-distribution `{table['in_distribution']}` vs {', '.join(f'`{s}`' for s in specs)}",
             "", *markdown_table(header, rows), "", *markdown_table(["variant", "run", "step", "model hash"], runs)]
    lines += [""] + [f"- {n}" for n in table["notes"]] + [""]
    return "\n".join(lines)


def compare_runs(run_dirs: Sequence[str | Path], in_dataset: str, ood_specs: Sequence[str], *,
                 background: str | Path | None = None, out_dir: str | Path | None = None,
                 in_split: str = "test", step: int | None = None, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
                 group_seeds: bool = False) -> tuple[dict, list[Path]]:
    """Load every run's dumps (newest evaluated step, or `step` for all), write compare.json/.md;
    with ``group_seeds``, the seeds of each recipe in one row (`seed_groups`)."""
    if not ood_specs:
        raise BadArgument("give at least one OOD set (--ood <dataset>/<split>)")
    in_spec = f"{in_dataset}/{in_split}"
    groups = seed_groups(run_dirs) if group_seeds else None  # refused before any dump is read
    runs = [load_run_dumps(r, in_spec, ood_specs, step=step) for r in run_dirs]
    bg = load_run_dumps(background, in_spec, ood_specs, step=step) if background is not None else None
    table = compare_table(runs, bg, bootstrap=bootstrap, groups=groups)
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0]).parent / "comparison"
    atomic_write_text(out / "compare.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "compare.md", compare_markdown(table))
    return table, [out / "compare.json", out / "compare.md"]
