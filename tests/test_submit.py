"""slurm/submit.sh: the exact chain it submits, the checks it runs before the queue, --only and
--finish, and the shell files' hygiene (shellcheck).

Every value submit.sh puts into a command or an evaluation work item is checked with the
character set of glow/names.py (slurm/names.sh); a refused value exits 2 before anything is
written or submitted. The preflight (glow/preflight.py) runs the jobs' first checks; each planted
mistake is refused with its documented code on the real test cluster, with no job queued and
nothing written under the run. Without a cluster, a stand-in `sbatch` on PATH records what
would be submitted.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glow.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_USAGE
from glow.names import check_name, parse_spec
from tests.helpers.repo import REPO

SUBMIT = REPO / "slurm" / "submit.sh"
CONFIG = "train/configs/tiny.yaml"
SHELL_FILES = sorted([*REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch")])


def submit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GLOW_RUN_ROOT": str(tmp_path / "runs"), "GLOW_CPU": "0", **env}
    return subprocess.run(["bash", str(SUBMIT), *args], env=full_env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from tests.helpers.toy import build_toy_shards

    return build_toy_shards(tmp_path_factory.mktemp("submit") / "shards", n_train=20, n_test=10, n_ood=10)


def toy(name: str, shards: Path) -> list[str]:
    """A submission that passes every check: the tiny config on the toy shards."""
    return ["--name", name, "--config", CONFIG, "--in", "toy/test", "--ood", "toyood/test",
            "--data-root", str(shards), "data.dataset=toy"]


def fake_sbatch(tmp_path: Path) -> dict[str, str]:
    """PATH with a stand-in `sbatch` that records its arguments (calls.jsonl) and prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "sbatch"
    script.write_text(f"""#!{sys.executable}
import json, sys
from pathlib import Path
calls = Path({str(tmp_path / "calls.jsonl")!r})
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print(f"{{100 + n}};cluster")
""")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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
                    "--data-root", "/data/shards", "--skip-preflight", "--dry-run")
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
    # the array takes its work items as its own arguments, one per task, never from a file
    items = shlex.split(evals[0].split("slurm/eval.sbatch", 1)[1])
    assert [item.split() for item in items] == task_lines(out)
    assert len(figs) == 1 and "--gpus" not in figs[0]  # the figures job is CPU only
    fig_args = shlex.split(figs[0].split("slurm/figures.sbatch", 1)[1])
    assert fig_args == ["--run", f"{tmp_path}/runs/exp", "--in", "celeba/valid", "--train-split", "train",
                        "--ood", "svhn/test", "--ood", "gaussian-smooth/test", *dr]
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_each_split_is_scored_once(tmp_path):
    result = submit(tmp_path, *base(), "--tasks", "dump bpd", "--train-split", "none", "--skip-preflight", "--dry-run")
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
    assert result.stderr.startswith("submit.sh: error (exit 2): ") and result.stdout == ""
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
                   "--run-tasks", "--no-eval", "--only", "--finish", "--skip-preflight", "--allow-shared-run",
                   "--dry-run"):
        assert f"\n  {option}" in result.stdout, option


# -- the chain with a stand-in sbatch ---------------------------------------------------------------
def test_the_job_list_replaces_a_planted_link_and_the_array_gets_its_items_as_arguments(tmp_path, shards):
    victim = tmp_path / "victim_bashrc"
    victim.write_text("echo hello\n")
    slurm_dir = tmp_path / "runs" / "x" / "slurm"
    slurm_dir.mkdir(parents=True)
    (slurm_dir / "eval-jobs.txt").symlink_to(victim)
    result = submit(tmp_path, *toy("x", shards), **fake_sbatch(tmp_path))
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "echo hello\n"  # never written through the link
    jobs = slurm_dir / "eval-jobs.txt"
    assert not jobs.is_symlink() and len(jobs.read_text().splitlines()) == 4
    train, array, figures = calls(tmp_path)
    assert train[-4:] == ["x", CONFIG, "data.dataset=toy", f"data.root={shards}"]
    items = array[array.index("slurm/eval.sbatch") + 1:]
    assert items == jobs.read_text().splitlines() and "--dependency=afterok:100" in array
    assert "--dependency=afterok:101" in figures
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["train", "eval", "figures"]


def test_only_eval_and_figures_submits_no_training(tmp_path, shards):
    from glow.run import Run
    from tests.helpers.fake_runs import fake_checkpoints

    run = Run(tmp_path / "runs" / "done")
    fake_checkpoints(run, complete=(8,), partial=())
    meta = {"step": 8, "model_hash": "m", "model_config": {"image_size": 32, "in_channels": 3},
            "data": {"root": str(shards), "dataset": "toy"}}
    run.checkpoint(8).meta_path.write_text(json.dumps(meta))
    args = ["--name", "done", "--in", "toy/test", "--ood", "toyood/test", "--train-split", "none"]
    result = submit(tmp_path, "--only", "eval,figures", *args, **fake_sbatch(tmp_path))
    assert result.returncode == 0, result.stderr
    array, figures = calls(tmp_path)
    assert "slurm/eval.sbatch" in array and not any(a.startswith("--dependency") for a in array)
    assert "--gpus-per-node=1" in array  # the same GPU settings as with training
    assert "slurm/figures.sbatch" in figures and "--dependency=afterok:100" in figures
    assert "checkpoint" in result.stderr and "preflight" in result.stderr
    # figures alone: refused while no dump exists, then one job
    only_figures = submit(tmp_path, "--only", "figures", *args, **fake_sbatch(tmp_path))
    assert only_figures.returncode == EXIT_DATA and "no evaluation under" in only_figures.stderr
    for spec in ("toy/test", "toyood/test"):
        path = run.dump_path(8, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    only_figures = submit(tmp_path, "--only", "figures", *args, **fake_sbatch(tmp_path))
    assert only_figures.returncode == 0, only_figures.stderr
    assert len(calls(tmp_path)) == 3 and "slurm/figures.sbatch" in calls(tmp_path)[-1]
    # no checkpoint: refused with the checkpoint code
    empty = submit(tmp_path, "--only", "eval,figures", *[a if a != "done" else "empty" for a in args],
                   **fake_sbatch(tmp_path))
    assert empty.returncode == EXIT_CHECKPOINT and "no complete checkpoint" in empty.stderr
    assert not (tmp_path / "runs" / "empty").exists()


@pytest.mark.parametrize("only", ["train,figures", "figures,eval", "all", ""])
def test_only_takes_stages_in_pipeline_order(tmp_path, only):
    result = submit(tmp_path, *base(), "--only", only, "--dry-run")
    assert result.returncode == EXIT_USAGE and "--only" in result.stderr


def test_finish_touches_the_control_file_and_never_follows_a_link(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    result = submit(tmp_path, "--finish", "r")
    assert result.returncode == 0 and "finish requested" in result.stdout, result.stderr
    assert (run_dir / "FINISH").is_file()
    (run_dir / "FINISH").unlink()
    victim = tmp_path / "victim"
    (run_dir / "FINISH").symlink_to(victim)  # dangling: creating through it would make the file
    refused = submit(tmp_path, "--finish", "r")
    assert refused.returncode == EXIT_USAGE and not victim.exists()
    missing = submit(tmp_path, "--finish", "nope")
    assert missing.returncode == EXIT_USAGE and "no run directory" in missing.stderr


def test_dry_run_runs_the_checks_and_skip_preflight_skips_them(tmp_path, shards):
    typo = submit(tmp_path, *toy("x", shards), "train.max_stepz=3", "--dry-run")
    assert typo.returncode == EXIT_USAGE and "unknown key train.max_stepz" in typo.stderr, typo.stderr
    assert typo.stdout == "" and not (tmp_path / "runs").exists()
    skipped = submit(tmp_path, *toy("x", shards), "train.max_stepz=3", "--skip-preflight", "--dry-run")
    assert skipped.returncode == 0 and "slurm/train.sbatch" in skipped.stdout
    passed = submit(tmp_path, *toy("x", shards), "--dry-run")
    assert passed.returncode == 0 and "checks passed" in passed.stderr, passed.stderr


def test_the_time_limit_is_parsed_as_slurm_does():
    from glow.errors import BadArgument
    from glow.preflight import STARTUP_S, parse_slurm_time, time_limit_check

    assert [parse_slurm_time(t) for t in ("30", "30:15", "2:00:00", "1-0", "1-2:30", "1-00:00:05", "UNLIMITED")] == \
        [1800, 1815, 7200, 86400, 95400, 86405, None]
    with pytest.raises(BadArgument):
        parse_slurm_time("2h")
    with pytest.raises(BadArgument, match="no attempt could reach a checkpoint"):
        time_limit_check(300 + STARTUP_S - 1, 300, 500, None)
    assert time_limit_check(300 + STARTUP_S, 300, 500, None) is None  # unmeasured: nothing to say
    assert "past the preemption signal" in time_limit_check(3600, 300, 500, 10.0)
    assert time_limit_check(3600, 300, 500, 1.0) is None


# -- shell hygiene --------------------------------------------------------------------------------
def test_shellcheck_finds_nothing_at_warning_level():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-S", "warning", *map(str, SHELL_FILES)], capture_output=True,
                            text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout


def test_no_shell_file_reads_a_step_from_a_folder_name():
    """Steps and states come from `python -m glow.run`; no template parses checkpoints/step-*."""
    for path in SHELL_FILES:
        text = path.read_text()
        assert "step-" not in text.replace("latest-step", ""), path


# -- each planted mistake on the real test cluster ------------------------------------------------
PLANTS = {
    # name: (submit.sh arguments added to a good submission, extra environment, exit code, words of the message)
    "config typo": (["--config", "{bad_config}"], {}, EXIT_USAGE, "unknown key trian"),
    "bad override": (["train.max_steps=abc"], {}, EXIT_USAGE, "override 'train.max_steps=abc'"),
    "missing split": (["--ood", "gaussian-smooth/test"], {}, EXIT_DATA, "gaussian-smooth/test/manifest.json"),
    "wrong resolution": (["model.image_size=64"], {}, EXIT_DATA, "model.image_size=64"),
    "missing FID weights": (["--tasks", "dump fid"], {"TORCH_HOME": "{tmp}/no-torch-home"}, 5,
                            "FID Inception weights not found"),
    "unreachable time limit": ([], {"GLOW_TIME": "5:00"}, EXIT_USAGE, "no attempt could reach a checkpoint"),
    "missing venv": ([], {"GLOW_VENV": "{tmp}/no-venv"}, EXIT_USAGE, "has no bin/activate"),
    "run directory is a link": ([], {}, EXIT_USAGE, "link"),
}


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
@pytest.mark.parametrize("plant", list(PLANTS))
def test_each_planted_mistake_is_refused_before_the_queue(slurm_cluster, tmp_path, shards, plant):
    args, env, code, words = PLANTS[plant]
    bad_config = tmp_path / "typo.yaml"
    bad_config.write_text((REPO / CONFIG).read_text().replace("train:", "trian:"))
    fill = {"bad_config": str(bad_config), "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    env = {k: v.format(**fill) for k, v in env.items()}
    name = "plant-" + plant.replace(" ", "-")
    good = toy(name, shards)
    if "--config" in args:
        good[good.index("--config"):good.index("--config") + 2] = []
    root = tmp_path / "runs"
    if plant == "run directory is a link":  # another run (or a colleague's folder) planted at this name
        (tmp_path / "elsewhere").mkdir()
        root.mkdir()
        (root / name).symlink_to(tmp_path / "elsewhere")
    full_env = {"GLOW_RUN_ROOT": str(root), "GLOW_CPU": "1", "GLOW_PROCS_PER_NODE": "1", **env}
    started = time.monotonic()
    result = slurm_cluster.run(["slurm/submit.sh", *good, *args], env=full_env, cwd=REPO, check=False)
    took = time.monotonic() - started
    print(f"refusal '{plant}': exit {result.returncode} after {took:.2f} s")
    assert result.returncode == code, result.stderr
    assert result.stderr.rstrip("\n").endswith("nothing submitted") or code == EXIT_USAGE, result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"submit.sh: error (exit {code}): ") and words in last, result.stderr
    assert result.stdout == ""
    queued = slurm_cluster.run(["squeue", "-h", "-o", "%j"]).stdout.split()
    assert not [j for j in queued if j.endswith(name)], queued
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "runs" in p.parts or
                     "elsewhere" in p.parts)
    assert written == (["elsewhere", "runs", f"runs/{name}"] if root.exists() else []), written  # nothing written


AUTOMATION_ONLY = ("--parsable", "--kill-on-invalid-dep=", "--chdir=", "--export=", "--job-name=", "--dependency=")


def split_command(words: list[str]) -> tuple[str, set[str], list[str]]:
    """(template, sbatch options that matter to a person, the template's arguments)."""
    template = next(w for w in words if w.startswith("slurm/") and w.endswith(".sbatch"))
    at = words.index(template)
    options = {w for w in words[1:at] if not w.startswith(AUTOMATION_ONLY)}
    return template, options, words[at + 1:]


def test_the_manual_commands_in_the_docs_are_what_submit_prints(tmp_path):
    """docs/cluster.md's hand-submitted sbatch lines carry every option submit.sh gives each job
    (partition, account, GPUs, CPUs per task, nodes, array, output) and the same arguments."""
    text = (REPO / "docs" / "cluster.md").read_text()
    block = text.split("To submit a template by\nhand", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    docs = [shlex.split(cmd) for cmd in block.replace("\\\n", " ").splitlines() if cmd.startswith("sbatch ")]
    result = submit(tmp_path, "--name", "x", "--config", "train/configs/celeba32.yaml", "--nodes", "2",
                    "--in", "celeba/test", "--ood", "svhn/test", "--train-split", "none", "--run-tasks", "",
                    "--data-root", "/data/shards", "--skip-preflight", "--dry-run",
                    GLOW_RUN_ROOT="runs", GLOW_PARTITION="gpu", GLOW_ACCOUNT="my-project", GLOW_GPUS_PER_NODE="4",
                    GLOW_CPUS_PER_TASK="32", GLOW_EVAL_GPUS="1", GLOW_TIME="", GLOW_EVAL_TIME="", GLOW_QOS="",
                    GLOW_SBATCH_EXTRA="", GLOW_ACCELERATE_CONFIG="")
    assert result.returncode == 0, result.stderr
    printed = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(docs) == len(printed) == 3
    for doc, dry in zip(docs, printed):
        assert split_command(doc) == split_command(dry), (doc, dry)


def test_seeds_submits_one_chain_per_seed_named_and_seeded(tmp_path):
    """--seeds 3: runs exp-s0..exp-s2, each the whole chain with train.seed=k (the name --group-seeds reads)."""
    result = submit(tmp_path, *base(), "train.max_steps=7", "--seeds", "3", "--skip-preflight", "--dry-run")
    assert result.returncode == 0, result.stderr
    trains = [shlex.split(line) for line in result.stdout.splitlines() if "slurm/train.sbatch" in line]
    assert len(trains) == 3
    for k, train in enumerate(trains):
        args = train[train.index("slurm/train.sbatch") + 1:]
        assert args == [f"exp-s{k}", str(REPO / CONFIG), "train.max_steps=7", f"train.seed={k}"]
        assert f"--job-name=glow-train-exp-s{k}" in train
    figures = [line for line in result.stdout.splitlines() if "slurm/figures.sbatch" in line]
    assert [f"--run {tmp_path}/runs/exp-s{k} " in line for k, line in enumerate(figures)] == [True] * 3
    for bad in ("0", "x", "-1"):
        refused = submit(tmp_path, *base(), "--seeds", bad, "--skip-preflight", "--dry-run")
        assert refused.returncode == EXIT_USAGE and "--seeds" in refused.stderr
    only_eval = submit(tmp_path, *base(), "--seeds", "2", "--only", "eval,figures", "--skip-preflight", "--dry-run")
    assert only_eval.returncode == EXIT_USAGE and "needs the train stage" in only_eval.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_the_rendezvous_port_passes_over_one_in_use_on_the_head_host():
    """slurm/jobs.sh: base + job id, or the next free port when something on this (the rendezvous) host
    listens there, e.g. a requeued job's previous attempt still shutting down; MASTER_PORT is kept."""
    import socket

    def port(base: int, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", "source slurm/jobs.sh && rendezvous_port test"], cwd=REPO,
                              env={"PATH": os.environ["PATH"], "GLOW_PORT_BASE": str(base), "SLURM_JOB_ID": "7", **env},
                              capture_output=True, text=True)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # a free port P = base + job id 7
        free = busy.getsockname()[1]
        assert port(free - 7).stdout.strip() == str(free)
        busy.listen()
        taken = port(free - 7)
        assert taken.stdout.strip() == str(free + 1) and f"port {free} is in use" in taken.stderr
        assert port(free - 7, MASTER_PORT="12345").stdout.strip() == "12345"
