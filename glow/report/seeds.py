"""Several seeds of one recipe: group runs that differ only in their seed, and summarise them.

One run gives one number per metric, and a difference between two variants may be the noise
of training (initialisation, data order, dequantization noise: all follow `train.seed`). Runs
of the same recipe trained with different seeds are grouped here; each metric is reported as
the mean, the sample standard deviation (ddof = 1; None for a single run) and N, with the
value of every run, so a reader can see the spread.

A group is refused (`glow.errors.BadArgument`, naming the keys) when its resolved configs
(`<run>/config.yaml`, as nested dicts) differ in anything but `SEED_KEYS`: averaging runs of
different recipes would make a mean of nothing in particular. Pure functions on dicts: the
callers read the configs and the metrics.

How reports ask for groups (`compare` / `matrix` with ``--group-seeds``): runs are grouped by
name, `seed_stem` of each (``x-s0``, ``x-s1`` and ``x`` are seeds of ``x``; the local loop of
docs/variants.md and ``submit.sh --seeds`` name them so), and each group must pass
`seed_group`: a run named as a seed of ``x`` but trained with another recipe is refused, not
quietly put in a row of its own. `seed_entry` makes one OOD-metric entry of a group's entries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glow.errors import BadArgument, ResultsInvalid
from glow.report.intervals import INTERVAL_METRICS

__all__ = ["SEED_KEYS", "SeedRun", "group_by_recipe", "group_by_stem", "metric_summary", "recipe_differences",
           "seed_entry",
           "seed_group", "seed_stem"]

# What may differ between seeds of one recipe: the seed itself and where the run lives.
SEED_KEYS = ("train.seed", "run.name", "run.root")
_MISSING = "<absent>"
_SHOWN_KEYS = 6  # differing keys named in a refusal before "and N more"
_SEED_SUFFIX = re.compile(r"[-_](?:s|seed)[0-9]+$")  # x-s0, x_s1, x-seed2: seeds of x


@dataclass
class SeedRun:
    """One run: a label (e.g. its name), its resolved config and its metrics (name -> number;
    nested dicts are flattened with "/", e.g. ``{"svhn/test": {"auroc": 0.1}}`` -> ``svhn/test/auroc``)."""

    label: str
    config: Mapping[str, Any]
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        train = self.config.get("train") if isinstance(self.config, Mapping) else None
        if not isinstance(train, Mapping) or "seed" not in train:
            raise BadArgument(f"run {self.label}: its config has no train.seed, so it cannot be grouped by seed")
        return int(train["seed"])


def _flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, sep, name))
        else:
            out[name] = value
    return out


def _recipe(config: Mapping[str, Any], ignore: Sequence[str]) -> dict[str, Any]:
    """The config as dotted keys, without the keys seeds may differ in."""
    return {k: v for k, v in _flatten(config, ".").items() if k not in ignore}


def recipe_differences(runs: Sequence[SeedRun], ignore: Sequence[str] = SEED_KEYS) -> dict[str, dict[str, Any]]:
    """dotted config key -> {run label: value} for every key (outside ``ignore``) whose value is
    not the same in all runs; a key a run lacks shows as ``"<absent>"``. Empty: one recipe."""
    recipes = [_recipe(r.config, ignore) for r in runs]
    keys = sorted(set().union(*recipes)) if recipes else []
    differing = {}
    for key in keys:
        values = [recipe.get(key, _MISSING) for recipe in recipes]
        if any(v != values[0] for v in values[1:]):
            differing[key] = {r.label: v for r, v in zip(runs, values)}
    return differing


def _describe(differences: dict[str, dict[str, Any]]) -> str:
    shown = list(differences.items())[:_SHOWN_KEYS]
    text = "; ".join(f"{key} ({', '.join(f'{label}: {value!r}' for label, value in values.items())})"
                     for key, values in shown)
    more = len(differences) - len(shown)
    return text + (f"; and {more} more key(s)" if more > 0 else "")


def seed_group(runs: Sequence[SeedRun], ignore: Sequence[str] = SEED_KEYS) -> dict:
    """Mean, standard deviation (ddof = 1) and N of every metric over runs of one recipe.

    Returns ``{"n_runs", "runs": [labels], "seeds": {label: seed}, "ignored_keys", "metrics":
    {name: {"mean", "std", "n", "values": {label: value}, "missing": [labels]}}}``; a metric
    some runs lack is summarised over the others and names them in ``missing``. Raises
    BadArgument when the configs differ outside ``ignore`` (naming the keys and values), when
    two runs share a label or a seed (the same model counted twice), or when there is no run;
    ResultsInvalid for a metric value that is not a finite number.
    """
    if not runs:
        raise BadArgument("no runs to group by seed")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise BadArgument(f"runs to group have repeated labels: {sorted({x for x in labels if labels.count(x) > 1})}")
    differences = recipe_differences(runs, ignore)
    if differences:
        raise BadArgument(f"cannot group runs {', '.join(labels)} as seeds of one recipe: they differ in "
                          f"{_describe(differences)}; only {', '.join(ignore)} may differ between seeds")
    seeds = {r.label: r.seed for r in runs}
    repeated = sorted({s for s in seeds.values() if list(seeds.values()).count(s) > 1})
    if repeated:
        twins = {s: [label for label, v in seeds.items() if v == s] for s in repeated}
        raise BadArgument(f"runs {twins} have the same train.seed with the same recipe: one model counted twice; "
                          "group runs of different seeds")
    per_run = {r.label: _flatten(r.metrics, "/") for r in runs}
    names = sorted(set().union(*per_run.values()))
    metrics = {name: metric_summary(name, {label: m.get(name) for label, m in per_run.items()}) for name in names}
    return {"n_runs": len(runs), "runs": labels, "seeds": seeds, "ignored_keys": list(ignore), "metrics": metrics}


def metric_summary(name: str, values: dict[str, Any]) -> dict:
    """``{"mean", "std", "n", "values", "missing"}`` of one metric over runs (``{label: value or None}``);
    ResultsInvalid for a value that is not a finite number."""
    present = {}
    for label, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ResultsInvalid(f"run {label}: metric {name} is {value!r}, not a finite number")
        present[label] = float(value)
    n = len(present)
    mean = sum(present.values()) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in present.values()) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": present,
            "missing": [label for label in values if label not in present]}


def group_by_recipe(runs: Sequence[SeedRun], ignore: Sequence[str] = SEED_KEYS) -> list[dict]:
    """Partition runs into recipes (equal configs outside ``ignore``), in order of first
    appearance, and summarise each with `seed_group` (a recipe of one run has N = 1)."""
    groups: list[list[SeedRun]] = []
    keys: list[dict] = []
    for run in runs:
        recipe = _recipe(run.config, ignore)
        for key, members in zip(keys, groups):
            if key == recipe:
                members.append(run)
                break
        else:
            keys.append(recipe)
            groups.append([run])
    return [seed_group(members, ignore) for members in groups]


def seed_stem(name: str) -> str:
    """A run's name without its seed suffix (``-s<k>``, ``_s<k>``, ``-seed<k>``, ``_seed<k>``):
    the name of its recipe's row; a name without one is its own stem."""
    return _SEED_SUFFIX.sub("", name) or name


def group_by_stem(runs: Sequence[SeedRun], ignore: Sequence[str] = SEED_KEYS) -> list[tuple[str, dict]]:
    """``[(stem, seed_group(members))]``: runs partitioned by the `seed_stem` of their labels, in
    order of first appearance. Raises BadArgument (from `seed_group`, naming the keys) when the
    runs of one stem differ in anything but ``ignore`` or repeat a seed."""
    members: dict[str, list[SeedRun]] = {}
    for run in runs:
        members.setdefault(seed_stem(run.label), []).append(run)
    return [(stem, seed_group(group, ignore)) for stem, group in members.items()]


def seed_entry(entries: Mapping[str, Mapping | None]) -> dict | None:
    """One OOD-metric entry (`glow.report.intervals.metrics_with_intervals`) for a seed group, from its runs'
    entries (``{run label: entry, or None where the run lacks it}``): each metric of
    `INTERVAL_METRICS` is the mean over the runs, ``"seeds"`` holds every metric's `seed_group`
    summary (mean, std, n, per-run values, missing). A group of one run keeps that run's
    intervals. None when no run has the entry; ResultsInvalid when the runs scored sets of
    different sizes (seeds must be evaluated on the same data)."""
    present = {label: entry for label, entry in entries.items() if entry is not None}
    if not present:
        return None
    sizes = {label: (entry["n_in"], entry["n_out"]) for label, entry in present.items()}
    if len(set(sizes.values())) > 1:
        raise ResultsInvalid(f"seeds of one recipe scored sets of different sizes (n in, n OOD): {sizes}; "
                             "evaluate every seed on the same splits")
    summaries = {m: metric_summary(m, {label: None if e is None else e[m] for label, e in entries.items()})
                 for m in INTERVAL_METRICS}
    out: dict = {m: summaries[m]["mean"] for m in INTERVAL_METRICS}
    out["n_in"], out["n_out"] = next(iter(sizes.values()))
    if len(present) == 1 and "intervals" in next(iter(present.values())):
        out["intervals"] = next(iter(present.values()))["intervals"]
    out["seeds"] = summaries
    return out
