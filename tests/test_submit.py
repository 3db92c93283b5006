"""slurm/submit.sh without a cluster: the dry run prints the exact chain; hostile values are refused.

Every value submit.sh puts into a command or the evaluation job list is checked with the
character set of glow/names.py (slurm/names.sh); a refused value exits 2 before anything is
written or submitted.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from glow.names import check_name, parse_spec

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
CONFIG = "train/configs/tiny.yaml"


def submit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GLOW_RUN_ROOT": str(tmp_path / "runs"), "GLOW_CPU": "0", **env}
    return subprocess.run(["bash", str(SUBMIT), *args], env=full_env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def base(name: str = "exp", *, ind: str = "celeba/test", ood: tuple[str, ...] = ("svhn/test",)) -> list[str]:
    args = ["--name", name, "--config", str(REPO / CONFIG), "--in", ind]
    for o in ood:
        args += ["--ood", o]
    return args


def task_lines(stdout: str) -> list[list[str]]:
    """The evaluate.py arguments of each array task, as eval.sbatch's `read -r -a` splits them."""
    return [shlex.split(line.split(": ", 1)[1])[1:] for line in stdout.splitlines() if line.startswith("#   task ")]


def test_dry_run_prints_the_exact_chain_with_a_chosen_in_split(tmp_path):
    result = submit(tmp_path, *base(ind="celeba/valid", ood=("svhn/test", "gaussian-smooth/test")),
                    "--data-root", "/data/shards", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    ckpt = f"{tmp_path}/runs/exp/checkpoints/latest"
    dr = ["--data-root", "/data/shards"]
    assert task_lines(out) == [
        ["--checkpoint", ckpt, "--task", "dump", "--data", "celeba/valid", *dr],
        ["--checkpoint", ckpt, "--task", "dump", "--data", "svhn/test", *dr],
        ["--checkpoint", ckpt, "--task", "dump", "--data", "gaussian-smooth/test", *dr],
        ["--checkpoint", ckpt, "--task", "dump", "--data", "celeba/train", *dr],  # typicality rows
        ["--checkpoint", ckpt, "--task", "samples", "--data", "celeba/valid", *dr],
    ]
    lines = out.splitlines()
    evals = [line for line in lines if "slurm/eval.sbatch" in line]
    figs = [line for line in lines if "slurm/figures.sbatch" in line]
    assert len(evals) == 1 and "--array=0-4" in evals[0] and "--gpus-per-node=1" in evals[0]
    assert len(figs) == 1 and "--gpus" not in figs[0]  # the figures job is CPU only
    fig_args = shlex.split(figs[0].split("slurm/figures.sbatch", 1)[1])
    assert fig_args == ["--run", f"{tmp_path}/runs/exp", "--in", "celeba/valid", "--train-split", "train",
                        "--ood", "svhn/test", "--ood", "gaussian-smooth/test", *dr]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_each_split_is_scored_once(tmp_path):
    result = submit(tmp_path, *base(), "--tasks", "dump bpd", "--train-split", "none", "--dry-run")
    assert result.returncode == 0, result.stderr
    tasks = [(args[args.index("--task") + 1], args[args.index("--data") + 1]) for args in task_lines(result.stdout)]
    assert tasks == [("dump", "celeba/test"), ("dump", "svhn/test"), ("samples", "celeba/test")]


HOSTILE = [
    ("--name", ".."), ("--name", "."), ("--name", ""), ("--name", "a b"), ("--name", "--force"),
    ("--name", "*"), ("--name", "/etc"), ("--name", "a/b"), ("--name", "-x"),
    ("--in", "../x"), ("--in", "celeba/te st"), ("--in", "celeba/*"), ("--in", "celeba/.."),
    ("--in", "celeba/test --force"), ("--in", "--force/test"),
    ("--ood", "svhn/test --task fid"), ("--ood", "svhn/--force"), ("--ood", "x/y/z"), ("--ood", "svhn"),
    ("--ood", "svhn/[ab]*"), ("--ood", ".hidden/test"),
    ("--data-root", "/d --force"), ("--data-root", "-x"), ("--data-root", "/d/*"), ("--data-root", "/d'x"),
    ("--data-root", "/d;rm"), ("--tasks", "dump --force"), ("--tasks", "*"), ("--run-tasks", "samples;x"),
    ("--train-split", ".."), ("--train-split", "a b"),
]


@pytest.mark.parametrize(("option", "value"), HOSTILE, ids=[f"{o}={v!r}" for o, v in HOSTILE])
def test_hostile_values_are_refused_before_anything_is_written(tmp_path, option, value):
    args = base()
    if option in ("--name", "--in"):
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    result = submit(tmp_path, *args, "--dry-run")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("submit.sh: ") and result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_an_unknown_option_is_not_taken_for_an_override(tmp_path):
    result = submit(tmp_path, *base(), "--force=1", "--dry-run")
    assert result.returncode == 2 and "unknown option '--force=1'" in result.stderr


NAMES = ["celeba", "svhn-32", "a.b_c", "x" * 128, "x" * 129, ".", "..", "", ".a", "-a", "_a", "a b", "a/b",
         "*", "a*", "é", "a\tb", "a\nb", "0", "A-._"]


def test_the_shell_checks_agree_with_glow_names():
    script = 'source slurm/names.sh; for v in "$@"; do if valid_name "$v"; then echo ok; else echo bad; fi; done'
    out = subprocess.run(["bash", "-c", script, "names", *NAMES], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()

    def python_ok(value):
        try:
            check_name(value, "x")
            return "ok"
        except ValueError:
            return "bad"

    assert out == [python_ok(v) for v in NAMES]
    specs = ["celeba/test", "celeba/..", "a/b/c", "svhn", "/test", "a/", "svhn/te st", "x.y/z_1"]
    script = 'source slurm/names.sh; for v in "$@"; do if valid_spec "$v"; then echo ok; else echo bad; fi; done'
    out = subprocess.run(["bash", "-c", script, "specs", *specs], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout.split()

    def spec_ok(value):
        try:
            parse_spec(value)
            return "ok"
        except ValueError:
            return "bad"

    assert out == [spec_ok(v) for v in specs]


def test_help_lists_every_option_with_an_example(tmp_path):
    result = submit(tmp_path, "--help")
    assert result.returncode == 0 and "Examples:" in result.stdout
    for option in ("--name", "--config", "--in", "--ood", "--train-split", "--nodes", "--data-root", "--tasks",
                   "--run-tasks", "--no-eval", "--dry-run"):
        assert f"\n  {option}" in result.stdout, option
