"""Safe on a shared filesystem: no file a colleague (or an attacker) can write runs code,
no secret reaches an artifact, hostile names are refused.

Each planted file is a pickle whose unpickling creates a marker file: the test passes only if
the marker never appears (and the load is refused, or the file is never read).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glow import checkpoint as ckpt
from glow.cli.train import main as train_main
from glow.config import ConfigError, load_config
from glow.run import Run
from tests.helpers.repo import REPO, TINY, cpu_env, invoke, run
from tests.helpers.toy import train_command


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling opens (creates) the marker file
        return (open, (str(self.marker), "w"))


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state": _Payload(marker)})


def test_hub_cache_inception_file_is_never_unpickled(tmp_path, monkeypatch):
    from glow.evaluation.fid import FID_WEIGHTS_FILE, load_inception

    marker = tmp_path / "ran"
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save({"w": _Payload(marker)}, hub / FID_WEIGHTS_FILE)  # a real torch zip file with a code payload
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="as plain tensors"):
        load_inception("cpu")  # the default location: torch hub's own loader would run it
    with pytest.raises(ValueError, match="as plain tensors"):
        load_inception("cpu", weights_path=hub / FID_WEIGHTS_FILE)
    assert not marker.exists()


def test_dump_and_fid_statistics_are_never_unpickled(tmp_path):
    from glow.evaluation.dumps import load_dump
    from glow.evaluation.fid import load_statistics

    marker = tmp_path / "ran"
    payload = np.array([_Payload(marker)], dtype=object)
    for path in (tmp_path / "d.npz", tmp_path / "s.npz"):
        buf = io.BytesIO()
        np.savez(buf, key=payload, index=np.arange(1), label=np.zeros(1), log_p=np.zeros(1), bpd=np.zeros(1),
                 step=np.array(1), model_hash=np.array("m"), checkpoint=np.array("c"), dataset=np.array("d"),
                 split=np.array("s"), data_root=np.array("r"), n_bits=np.array(8), mu=payload, sigma=payload)
        path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError):
        load_dump(tmp_path / "d.npz")
    with pytest.raises(ValueError):
        load_statistics(tmp_path / "s.npz")
    assert not marker.exists()


def _deepspeed_state(root: Path) -> Path:
    """A state folder laid out as accelerate + DeepSpeed save it (the contents do not matter here)."""
    state = root / "state"
    (state / "pytorch_model").mkdir(parents=True)
    for name in ("pytorch_model/mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "latest", "random_states_0.pkl", ckpt.TRAINER_STATE):
        (state / name).write_bytes(b"x")
    return state


def test_a_deepspeed_resume_checks_the_state_before_deepspeed_reads_it(tmp_path):
    """The trainer's restore (every rank, under DeepSpeed) refuses a state a group member could have
    changed before accelerate/DeepSpeed unpickle anything: load_state is never reached. (The real
    ZeRO-2 run with a planted pickle: tests/test_trainer.py's DeepSpeed proof.)"""
    from glow.training.resume import ResumePoint, restore

    checkpoint = Run(tmp_path / "run").checkpoint(2)
    state = _deepspeed_state(checkpoint.path)
    (state / "pytorch_model" / "mp_rank_00_model_states.pt").chmod(0o664)

    class Accelerator:  # one process; a load means the check came too late
        num_processes, process_index = 1, 0

        def load_state(self, path):
            raise AssertionError(f"DeepSpeed state {path} loaded before it was checked")

    with pytest.raises(ckpt.DeepSpeedStateRefused, match="writable by group"):
        restore(Accelerator(), checkpoint, ResumePoint(2, {"world_size": 1}, False), state=None, scheduler=None,
                ema=None, seed=0, deepspeed=True)


@pytest.mark.parametrize("plant", ["group-writable", "replaced", "link", "group-writable-folder"])
def test_deepspeed_state_anyone_else_could_change_is_refused(tmp_path, plant):
    """DeepSpeed unpickles its state: a group member who overwrote mp_rank_00_model_states.pt in
    place (owner unchanged) ran code as the victim. Now a group- or other-writable file or folder,
    another user's file, or a link anywhere in the state refuses the resume (exit 5), naming it."""
    from glow.errors import EXIT_CHECKPOINT

    old = os.umask(0o002)  # a group-writable project directory, as docs/cluster.md recommends
    try:
        state = _deepspeed_state(tmp_path)
    finally:
        os.umask(old)
    with pytest.raises(ckpt.DeepSpeedStateRefused, match="writable by group"):
        ckpt.check_deepspeed_state(state)  # what the umask gave: the state was open to the group
    ckpt.seal_state(state)  # what the trainer does after each save
    for path in [state, *state.rglob("*")]:
        assert path.stat().st_mode & 0o022 == 0, path
    ckpt.check_deepspeed_state(state)
    target = state / "pytorch_model" / "mp_rank_00_model_states.pt"
    if plant == "group-writable":
        target.chmod(0o664)
    elif plant == "replaced":
        os.chown(target, 65534, 65534)  # the tests run as root, like the CI
    elif plant == "link":
        target.unlink()
        target.symlink_to(tmp_path / "planted.pt")
    else:
        target = target.parent
        target.chmod(0o775)
    with pytest.raises(ckpt.DeepSpeedStateRefused) as info:
        ckpt.check_deepspeed_state(state)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == EXIT_CHECKPOINT
    if plant == "link":
        with pytest.raises(ckpt.DeepSpeedStateRefused, match="symbolic link"):
            ckpt.seal_state(state)  # never chmods through a link
        assert not (tmp_path / "planted.pt").exists()


def _tiny_shards(root: Path) -> Path:
    from tests.helpers.fake_sources import build_small_shards

    for split in ("train", "test"):
        build_small_shards(root, n=8, samples_per_shard=8, dataset="toy", split=split)
    return root


def test_a_checkpoints_link_to_another_run_is_refused_by_train(tmp_path, monkeypatch):
    """A group member links the new run's checkpoints/ to another run: training refuses (exit 2,
    one line naming it) before it resumes from, prunes or writes into that run."""
    from accelerate import Accelerator

    from glow.errors import EXIT_USAGE
    from glow.training.trainer import Trainer
    from glow.trust import UntrustedRun

    monkeypatch.delenv("GLOW_ALLOW_SHARED_RUN", raising=False)
    shards = _tiny_shards(tmp_path / "shards")
    other = Run(tmp_path / "runs" / "other")
    for step in (5, 10):
        other.checkpoint(step).path.mkdir(parents=True)
        (other.checkpoint(step).path / "COMPLETE").write_text(f"{step}\n")
    before = {str(p): p.stat().st_mtime_ns for p in other.path.rglob("*")}
    victim = tmp_path / "runs" / "tiny"
    victim.mkdir()
    (victim / "checkpoints").symlink_to(other.checkpoints_dir)
    cfg = load_config(TINY, [f"run.root={tmp_path / 'runs'}", f"data.root={shards}", "data.dataset=toy",
                             "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1"])
    with pytest.raises(UntrustedRun) as info:
        Trainer(cfg, Accelerator(cpu=True)).fit()
    assert info.value.exit_code == EXIT_USAGE and str(victim / "checkpoints") in str(info.value)
    assert "symbolic link" in str(info.value) and "--allow-shared-run" in str(info.value)
    assert {str(p): p.stat().st_mtime_ns for p in other.path.rglob("*")} == before  # nothing pruned or written
    assert sorted(p.name for p in victim.iterdir()) == ["checkpoints"]  # no LOCK, config or log written


def test_a_forged_result_entry_is_not_taken_as_done(tmp_path, monkeypatch):
    """A group member writes bpd.d/<split>.json with the settings a real entry would have (they are
    in any entry): --check-done used to call the split done. An entry file another user wrote is
    ignored, whatever it claims, unless the shared layout is allowed."""
    from glow.evaluation.job import check_done
    from glow.evaluation.tasks import EvalContext, EvalOptions, bpd_result
    from glow.model import GlowConfig

    monkeypatch.delenv("GLOW_ALLOW_SHARED_RUN", raising=False)
    shards = _tiny_shards(tmp_path / "shards")
    model = GlowConfig(image_size=32, n_levels=2, steps_per_level=2, hidden_channels=16)
    run = Run(tmp_path / "runs" / "r")
    checkpoint = run.checkpoint(10)
    checkpoint.path.mkdir(parents=True)
    checkpoint.meta_path.write_text(json.dumps({"step": 10, "model_config": model.to_dict(),
                                                "model_hash": model.hash(), "data": {"root": str(shards)}}))
    checkpoint.complete_marker.write_text("10\n")
    options = EvalOptions(tasks=["bpd"], specs=[("toy", "test")])
    assert check_done(run.path, options)[0] == ["bpd toy/test"]
    settings = bpd_result(EvalContext(checkpoint=checkpoint, meta=checkpoint.meta(), options=options),
                          "toy", "test").settings
    assert settings["writer_uid"] == os.getuid()
    entry = run.eval_dir(10) / "bpd.d" / "toy%2Ftest.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"mean": 0.01, "std": 0.0, "count": 8, "writer_user": "root", **settings}))
    assert check_done(run.path, options)[0] == []  # yours: done
    os.chown(entry, 65534, 65534)  # the same bytes, written by someone else
    assert check_done(run.path, options)[0] == ["bpd toy/test"]
    assert check_done(run.path, EvalOptions(tasks=["bpd"], specs=[("toy", "test")], allow_shared=True))[0] == []
    os.chown(entry, 0, 0)
    entry.write_text(json.dumps({"mean": 0.01, **{k: v for k, v in settings.items() if k != "writer_uid"}}))
    assert check_done(run.path, options)[0] == ["bpd toy/test"]  # no writer recorded (older version): redone


SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- s3cr3t-victim-key"
NETRC = "machine api.wandb.ai login victim password s3cr3t-wandb-key"


def _victim_files(home: Path) -> dict[Path, tuple[str, int]]:
    files = {home / ".ssh" / "id_ed25519": SECRET, home / ".netrc": NETRC, home / ".bashrc": "export PATH=/usr/bin"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        path.chmod(0o600)
    return {p: (t + "\n", 0o600) for p, t in files.items()}


def _untouched(files: dict[Path, tuple[str, int]]) -> None:
    for path, (text, mode) in files.items():
        assert path.read_text() == text and path.stat().st_mode & 0o777 == mode, path


def _secret_nowhere(folder: Path) -> None:
    import base64

    needles = [s.encode() for s in (SECRET, NETRC, "s3cr3t")] + [base64.b64encode(SECRET.encode())[:24]]
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            blob = path.read_bytes()
            assert not any(n in blob for n in needles), path


@pytest.mark.parametrize("plant", ["config.yaml", "eval-samples.png", "training-samples.png", "foreign-dump"])
def test_figures_plants_are_refused_and_leak_nothing(tmp_path, monkeypatch, plant):
    """config.yaml -> ~/.netrc and eval/step-N/samples.png -> ~/.ssh/id_ed25519 put the key into
    figures/samples.png and index.html; a dump another user wrote put their numbers into ours."""
    from click.testing import CliRunner

    from glow.cli.figures import main as figures_main
    from tests.helpers.fake_runs import STEP, make_run

    monkeypatch.delenv("GLOW_ALLOW_SHARED_RUN", raising=False)
    victim = _victim_files(tmp_path / "home")
    run = make_run(tmp_path)
    step_dir = run / "eval" / f"step-{STEP:08d}"
    planted = {"config.yaml": run / "config.yaml", "eval-samples.png": step_dir / "samples.png",
               "training-samples.png": run / "samples" / f"step-{STEP:08d}.png",
               "foreign-dump": step_dir / "dumps" / "svhn-test.npz"}[plant]
    if plant == "foreign-dump":
        os.chown(planted, 65534, 65534)
    else:
        (step_dir / "samples.png").unlink()  # the training grid is the fallback
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.symlink_to(tmp_path / "home" / (".netrc" if plant == "config.yaml" else ".ssh/id_ed25519"))
    result = CliRunner().invoke(figures_main, ["--run", str(run), "--in", "celeba", "--ood", "svhn/test",
                                               "--wandb"], env={"WANDB_MODE": "offline"})
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and str(planted) in error[0] and "Traceback" not in result.output, result.output
    _untouched(victim)
    _secret_nowhere(run)
    assert not (run / "wandb").exists()  # refused before any tracker
    if plant in ("config.yaml", "eval-samples.png"):  # refused before anything was written
        assert not (run / "figures").exists()
    if plant == "foreign-dump":  # a deliberately shared run: the flag reads it
        ok = CliRunner().invoke(figures_main, ["--run", str(run), "--in", "celeba", "--ood", "svhn/test",
                                               "--no-wandb", "--allow-shared-run"])
        assert ok.exit_code == 0, ok.output


def test_config_interpolations_are_refused_and_names_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("GLOW_TEST_SECRET", "s3cr3t-key")
    for override in ("run.wandb_project=${oc.env:GLOW_TEST_SECRET}", "run.init_from=x${oc.env:HOME}"):
        with pytest.raises(ConfigError, match="interpolations") as err:
            load_config(TINY, ["run.name=x", override])
        assert "s3cr3t" not in str(err.value)
    nested = tmp_path / "nested.yaml"
    nested.write_text("run: {name: x}\ntrain: {sample_temperatures: [1.0, '${oc.env:GLOW_TEST_SECRET}']}\n")
    with pytest.raises(ConfigError, match=r"train.sample_temperatures\[1\]"):
        load_config(nested)
    with pytest.raises(ConfigError):  # an override YAML cannot parse: a config error, not a traceback
        load_config(TINY, ["run.name=x", "train.sample_temperatures=[1.0,"])
    for name in ("..", ".", "", "/etc", "a/b", "a b", "--x"):
        with pytest.raises(ConfigError, match="run.name"):
            load_config(TINY, [f"run.name={name}"])
    with pytest.raises(ConfigError, match="data.dataset"):
        load_config(TINY, ["run.name=x", "data.dataset=../../etc"])


def test_train_dry_run_refuses_hostile_run_names():
    from click.testing import CliRunner

    from glow.cli.train import main as train_main

    for name in ("..", ".", "/tmp/abs", "a b", "x/../../y"):  # the command in-process (no interpreter start)
        result = CliRunner().invoke(train_main, ["--config", str(TINY), "--dry-run", f"run.name={name}"])
        assert result.exit_code == 2 and "run.name" in result.output and result.output.startswith("error: "), name
        assert isinstance(result.exception, SystemExit), result.exc_info


def test_resume_never_unpickles_and_no_secret_in_the_run(toy_shards, tmp_path, monkeypatch):
    """A run with EMA trains (a real `python train/train.py` with wandb offline and a secret in its
    environment), its state has no pickle of ours; planted pickles in the state dir run nothing on
    resume (resumes in this process); a secret in the environment is in no file of the run."""
    env = cpu_env(GLOW_TEST_SECRET="s3cr3t-key-0123", WANDB_API_KEY="s3cr3t-key-0123")
    cmd = train_command(tmp_path / "runs", toy_shards, "train.max_steps=4", "optim.ema_decay=0.9", "run.logger=wandb")
    first = run(cmd, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    monkeypatch.setenv("GLOW_TEST_SECRET", "s3cr3t-key-0123")
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-key-0123")

    def resume(steps: int):
        return invoke(train_main, "--config", TINY, f"run.root={tmp_path / 'runs'}", f"data.root={toy_shards}",
                      "data.dataset=toy", f"train.max_steps={steps}", "optim.ema_decay=0.9", bugs_propagate=False)

    run_dir = tmp_path / "runs" / "tiny"
    state = Run(run_dir).latest().path / "state"
    assert (state / ckpt.TRAINER_STATE).is_file() and (state / ckpt.EMA_WEIGHTS).is_file()
    assert not list(state.glob("custom_checkpoint_*"))
    # plant: accelerate's custom-object files (it unpickles those of registered objects; we register
    # none, so accelerate refuses the folder instead of reading them)
    marker = tmp_path / "ran"
    for i in range(2):
        (state / f"custom_checkpoint_{i}.pkl").write_bytes(_malicious_pickle(marker))
    planted = resume(6)
    assert planted.returncode != 0 and not marker.exists()
    for path in state.glob("custom_checkpoint_*"):
        path.unlink()
    resumed = resume(6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stderr + resumed.stdout
    # plant: the RNG file accelerate reads back (with weights_only=True: refused, not run)
    state = Run(run_dir).latest().path / "state"
    torch.save({"rng": _Payload(marker)}, state / "random_states_0.pkl")
    refused = resume(8)
    assert refused.returncode != 0 and "random_states_0.pkl cannot be read as plain tensors" in refused.stderr
    assert not marker.exists()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"s3cr3t-key-0123" not in path.read_bytes(), path
    assert json.loads((state / ckpt.TRAINER_STATE).read_text())["counters"]["step"] == 6
    # outputs are group-readable where the umask allows (not mkstemp's 0600), never group-writable
    from glow.files import OUTPUT_MODE, new_file_mode

    step6 = Run(run_dir).latest().path
    for path in (step6 / "model.safetensors", step6 / "meta.json", step6 / "COMPLETE", state / ckpt.TRAINER_STATE):
        assert path.stat().st_mode & 0o777 == new_file_mode(OUTPUT_MODE), path
    for path in state.iterdir():  # accelerate's own files: sealed after the save
        assert path.stat().st_mode & 0o022 == 0, path


# ------------------------------------------------------------------ the same plants by a second user
GROUP, VICTIM, PLANTER = "glowtrust", "glowtrust_a", "glowtrust_b"
VICTIM_CHECKS = r"""
import json, sys
from click.testing import CliRunner
from glow.cli.figures import main as figures
from glow.files import hold_lock
from glow.run import main as run_main

out = {}
for run in sys.argv[1:]:
    out[run] = {"check_trust": run_main(["check-trust", run])}
    try:
        with hold_lock(run + "/LOCK"):
            out[run]["lock"] = "taken"
    except Exception as err:
        out[run]["lock"] = f"{type(err).__name__}: {err}"
    res = CliRunner().invoke(figures, ["--run", run, "--in", "celeba", "--ood", "svhn/test", "--no-wandb"])
    out[run]["figures"] = [res.exit_code, res.output]
print(json.dumps(out))
"""


def _as(user: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid", user, "--regid", GROUP, "--init-groups", *cmd],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _as_victim(args: list[str], shared: Path) -> dict:
    """VICTIM_CHECKS run as the victim, by an interpreter that user can run with this checkout's
    glow (the venv's, else the system one over the venv's packages), or pytest.skip saying why."""
    site = next(Path(sys.prefix).glob("lib/python3*/site-packages"), None)
    tries = [(sys.executable, str(REPO))] + ([("/usr/bin/python3", f"{REPO}:{site}")] if site else [])
    why = []
    for python, path in tries:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(shared), "MPLBACKEND": "Agg", "PYTHONPATH": path}
        done = _as(VICTIM, [python, "-c", VICTIM_CHECKS, *args], env, shared)
        if done.returncode == 0:
            return json.loads(done.stdout.splitlines()[-1])
        why.append(f"{python}: {(done.stderr.strip().splitlines() or [done.returncode])[-1]}")
    pytest.skip(f"user {VICTIM} cannot run this checkout's Python ({'; '.join(map(str, why))}); make the venv "
                "readable by other users to run this test")


def test_lock_and_figures_plants_by_a_second_user(tmp_path):
    """Two users in one group on a setgid, group-writable run root (docs/cluster.md). The planter
    links the victim's LOCK to ~/.bashrc, config.yaml to ~/.netrc and samples.png to the private
    key, and makes a folder of theirs in the victim's run; the victim's preflight, lock and
    figures job refuse each with one line naming it, leave the files untouched and copy nothing."""
    import shutil
    import tempfile

    from tests.helpers.fake_runs import STEP, make_run

    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("useradd"):
        pytest.skip("needs root with setpriv and useradd (CI runs the tests as root)")
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", GROUP], check=True)
    for user in (VICTIM, PLANTER):
        if subprocess.run(["id", user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-N", "-g", GROUP, "-s", "/usr/sbin/nologin", user], check=True)
    shared = Path(tempfile.mkdtemp(prefix="glow-shared-", dir="/tmp"))
    try:
        shutil.chown(shared, group=GROUP)
        shared.chmod(0o2775)
        home = shared / "home"
        victim = _victim_files(home)
        old = os.umask(0o002)  # the victim's runs, as a group-writable project directory makes them
        try:
            runs = {name: make_run(shared / name) for name in ("links", "key", "folder")}
        finally:
            os.umask(old)
        subprocess.run(["chown", "-R", f"{VICTIM}:{GROUP}", str(home), *(str(shared / n) for n in runs)], check=True)
        home.chmod(0o700)
        steps = {name: run / "eval" / f"step-{STEP:08d}" for name, run in runs.items()}
        plant = " && ".join([
            f"ln -s {home}/.bashrc {runs['links']}/LOCK", f"ln -s {home}/.netrc {runs['links']}/config.yaml",
            *(f"rm {steps[n]}/samples.png && ln -s {home}/.ssh/id_ed25519 {steps[n]}/samples.png"
              for n in ("links", "key")),
            f"mkdir {runs['folder']}/figures"])
        planted = _as(PLANTER, ["sh", "-c", plant], {"PATH": "/usr/bin:/bin"}, shared)
        assert planted.returncode == 0, planted.stderr  # the group may write there: the plants are possible
        out = _as_victim([str(runs[n]) for n in ("links", "key", "folder")], shared)

        links, key, folder = (out[str(runs[n])] for n in ("links", "key", "folder"))
        assert links["check_trust"] == 2 and links["lock"].startswith("UnsafeFile: ")
        assert f"{runs['links']}/LOCK is a symbolic link" in links["lock"]
        for result, named in ((links, f"{runs['links']}/config.yaml is a symbolic link"),
                              (key, f"{steps['key']}/samples.png is a symbolic link"),
                              (folder, f"{runs['folder']}/figures belongs to user {PLANTER} (uid")):
            code, output = result["figures"]
            errors = [line for line in output.splitlines() if line.startswith("error: ")]
            assert code == 2 and len(errors) == 1 and named in errors[0] and "Traceback" not in output, output
        assert key["lock"] == folder["lock"] == "taken"  # a real lock, taken and released
        assert folder["check_trust"] == 2
        _untouched(victim)
        for run_dir in runs.values():
            _secret_nowhere(run_dir)
            assert not (run_dir / "figures" / "index.html").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
