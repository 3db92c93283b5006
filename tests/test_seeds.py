"""glow.report.seeds: runs that differ only in their seed are grouped; anything else is refused."""

from __future__ import annotations

import copy
import math

import pytest

from glow.errors import BadArgument, ResultsInvalid
from glow.report.seeds import (
    SeedRun,
    group_by_recipe,
    group_by_stem,
    recipe_differences,
    seed_entry,
    seed_group,
    seed_stem,
)

BASE = {
    "run": {"name": "demo-s0", "root": "runs", "logger": "wandb"},
    "model": {"image_size": 32, "hidden_channels": 64, "mask": "channel"},
    "optim": {"lr": 0.001, "betas": [0.9, 0.999]},
    "train": {"seed": 0, "batch_size": 64},
}


def run(label: str, seed: int, metrics: dict, **changes) -> SeedRun:
    config = copy.deepcopy(BASE)
    config["run"]["name"] = label
    config["run"]["root"] = f"/scratch/{label}"
    config["train"]["seed"] = seed
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return SeedRun(label, config, metrics)


def test_seeds_of_one_recipe_are_summarised():
    runs = [run("s0", 0, {"svhn/test": {"auroc": 0.10}, "bpd": 3.5}),
            run("s1", 1, {"svhn/test": {"auroc": 0.14}, "bpd": 3.4}),
            run("s2", 2, {"svhn/test": {"auroc": 0.12}})]
    group = seed_group(runs)
    assert group["n_runs"] == 3 and group["runs"] == ["s0", "s1", "s2"]
    assert group["seeds"] == {"s0": 0, "s1": 1, "s2": 2}
    auroc = group["metrics"]["svhn/test/auroc"]
    assert auroc["n"] == 3
    assert auroc["mean"] == pytest.approx(0.12)
    assert auroc["std"] == pytest.approx(0.02)  # sample standard deviation (ddof = 1)
    assert auroc["values"] == {"s0": 0.10, "s1": 0.14, "s2": 0.12}
    assert auroc["missing"] == []
    bpd = group["metrics"]["bpd"]
    assert (bpd["n"], bpd["missing"]) == (2, ["s2"])
    assert bpd["mean"] == pytest.approx(3.45) and bpd["std"] == pytest.approx(math.sqrt(0.005))
    single = seed_group([runs[0]])
    assert single["metrics"]["bpd"] == {"mean": 3.5, "std": None, "n": 1, "values": {"s0": 3.5}, "missing": []}


def test_runs_of_different_recipes_are_refused_naming_the_keys():
    runs = [run("a", 0, {"auroc": 0.1}), run("b", 1, {"auroc": 0.2}, model__hidden_channels=128, optim__lr=0.002)]
    assert recipe_differences(runs) == {"model.hidden_channels": {"a": 64, "b": 128},
                                        "optim.lr": {"a": 0.001, "b": 0.002}}
    with pytest.raises(BadArgument, match=r"differ in model\.hidden_channels \(a: 64, b: 128\); "
                                          r"optim\.lr \(a: 0\.001, b: 0\.002\); only train\.seed, run\.name, run\.root"):
        seed_group(runs)
    # a key only one run has counts as a difference; so does a list value
    extra = run("c", 2, {})
    extra.config["data"] = {"hflip": True}
    with pytest.raises(BadArgument, match=r"data\.hflip \(a: '<absent>', c: True\)"):
        seed_group([runs[0], extra])
    betas = run("d", 3, {}, optim__betas=[0.9, 0.99])
    with pytest.raises(BadArgument, match=r"optim\.betas"):
        seed_group([runs[0], betas])
    # what else may differ can be widened explicitly
    assert seed_group([runs[0], betas], ignore=("train.seed", "run.name", "run.root", "optim.betas"))["n_runs"] == 2


def test_same_seed_twice_and_bad_inputs_are_refused():
    with pytest.raises(BadArgument, match="same train.seed"):
        seed_group([run("a", 0, {}), run("b", 0, {})])
    with pytest.raises(BadArgument, match="repeated labels"):
        seed_group([run("a", 0, {}), run("a", 1, {})])
    with pytest.raises(BadArgument, match="no runs"):
        seed_group([])
    no_seed = run("n", 0, {})
    del no_seed.config["train"]["seed"]
    with pytest.raises(BadArgument, match="no train.seed"):
        seed_group([no_seed])
    with pytest.raises(ResultsInvalid, match="metric auroc is nan"):
        seed_group([run("a", 0, {"auroc": float("nan")}), run("b", 1, {"auroc": 0.5})])


def test_group_by_recipe_partitions_in_order_of_appearance():
    runs = [run("w64-s0", 0, {"auroc": 0.1}), run("w128-s0", 0, {"auroc": 0.3}, model__hidden_channels=128),
            run("w64-s1", 1, {"auroc": 0.2}), run("w128-s1", 1, {"auroc": 0.5}, model__hidden_channels=128),
            run("lr-s0", 0, {"auroc": 0.9}, optim__lr=0.01)]
    groups = group_by_recipe(runs)
    assert [g["runs"] for g in groups] == [["w64-s0", "w64-s1"], ["w128-s0", "w128-s1"], ["lr-s0"]]
    assert [g["metrics"]["auroc"]["mean"] for g in groups] == pytest.approx([0.15, 0.4, 0.9])
    assert groups[2]["metrics"]["auroc"]["std"] is None


def test_seed_stem_and_group_by_stem():
    assert [seed_stem(n) for n in ("x-s0", "x_s12", "x-seed3", "x", "celeba32", "demos2", "-s1")] == \
        ["x", "x", "x", "x", "celeba32", "demos2", "-s1"]
    runs = [run("x-s0", 0, {}), run("y-s0", 0, {}, optim__lr=0.01), run("x", 1, {}), run("x-s2", 2, {})]
    groups = group_by_stem(runs)
    assert [(stem, g["runs"]) for stem, g in groups] == [("x", ["x-s0", "x", "x-s2"]), ("y", ["y-s0"])]
    assert groups[0][1]["seeds"] == {"x-s0": 0, "x": 1, "x-s2": 2}
    # a run named as a seed of x but trained with another recipe: refused, not put in a row of its own
    with pytest.raises(BadArgument, match=r"x-s0, x-s1 as seeds of one recipe: they differ in optim\.lr"):
        group_by_stem([run("x-s0", 0, {}), run("x-s1", 1, {}, optim__lr=0.01)])


def test_seed_entry_means_the_metrics_and_keeps_every_value():
    def entry(auroc, n_in=40, intervals=True):
        out = {"auroc": auroc, "aupr_in": auroc / 2, "aupr_out": 0.5, "fpr_at_95_tpr": 1 - auroc,
               "n_in": n_in, "n_out": 30}
        if intervals:
            out["intervals"] = {m: [0.0, 1.0] for m in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr")}
        return out

    group = seed_entry({"s0": entry(0.2), "s1": entry(0.4), "s2": None})
    assert group["auroc"] == pytest.approx(0.3) and group["fpr_at_95_tpr"] == pytest.approx(0.7)
    assert (group["n_in"], group["n_out"]) == (40, 30) and "intervals" not in group
    assert group["seeds"]["auroc"]["values"] == {"s0": 0.2, "s1": 0.4}
    assert group["seeds"]["auroc"]["std"] == pytest.approx(math.sqrt(0.02))
    assert group["seeds"]["auroc"]["missing"] == ["s2"]
    assert seed_entry({"s0": entry(0.2)})["intervals"]["auroc"] == [0.0, 1.0]  # one run: its interval
    assert seed_entry({"s0": None}) is None
    with pytest.raises(ResultsInvalid, match="different sizes"):
        seed_entry({"s0": entry(0.2), "s1": entry(0.4, n_in=41)})
