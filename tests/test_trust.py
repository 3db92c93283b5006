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
from glow.config import ConfigError, load_config
from glow.run import Run
from tests.toydata import REPO, build_toy_shards, cpu_env, run, train_command

TINY = REPO / "train" / "configs" / "tiny.yaml"


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


def test_deepspeed_resume_refuses_files_of_another_user(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "mine.pt").write_bytes(b"x")
    ckpt.check_own_files(state)  # all mine: fine
    foreign = state / "pytorch_model" / "mp_rank_00_model_states.pt"
    foreign.parent.mkdir()
    foreign.write_bytes(b"x")
    os.chown(foreign, 65534, 65534)  # the tests run as root, like the CI
    with pytest.raises(PermissionError, match="mp_rank_00_model_states.pt"):
        ckpt.check_own_files(state)


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


@pytest.mark.parametrize("name", ["..", ".", "/tmp/abs", "a b", "x/../../y"])
def test_train_dry_run_refuses_hostile_run_names(name):
    result = subprocess.run([sys.executable, str(REPO / "train" / "train.py"), "--config", str(TINY), "--dry-run",
                             f"run.name={name}"], capture_output=True, text=True, env=cpu_env(), cwd=REPO)
    assert result.returncode != 0 and "run.name" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_resume_never_unpickles_and_no_secret_in_the_run(tmp_path):
    """A run with EMA trains, its state has no pickle of ours; planted pickles in the state dir
    run nothing on resume; a secret in the environment is in no file of the run."""
    shards = build_toy_shards(tmp_path / "shards", n_train=64, n_test=8, n_ood=8)
    env = cpu_env(GLOW_TEST_SECRET="s3cr3t-key-0123", WANDB_API_KEY="s3cr3t-key-0123")
    cmd = train_command(tmp_path / "runs", shards, "train.max_steps=4", "optim.ema_decay=0.9", "run.logger=wandb")
    first = run(cmd, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    state = Run(run_dir).latest().path / "state"
    assert (state / ckpt.TRAINER_STATE).is_file() and (state / ckpt.EMA_WEIGHTS).is_file()
    assert not list(state.glob("custom_checkpoint_*"))
    # plant: accelerate's custom-object files (it unpickles those of registered objects; we register
    # none, so accelerate refuses the folder instead of reading them)
    marker = tmp_path / "ran"
    for i in range(2):
        (state / f"custom_checkpoint_{i}.pkl").write_bytes(_malicious_pickle(marker))
    planted = run(train_command(tmp_path / "runs", shards, "train.max_steps=6", "optim.ema_decay=0.9"), env=env)
    assert planted.returncode != 0 and not marker.exists()
    for path in state.glob("custom_checkpoint_*"):
        path.unlink()
    resumed = run(train_command(tmp_path / "runs", shards, "train.max_steps=6", "optim.ema_decay=0.9"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stderr + resumed.stdout
    # plant: the RNG file accelerate reads back (with weights_only=True: refused, not run)
    state = Run(run_dir).latest().path / "state"
    torch.save({"rng": _Payload(marker)}, state / "random_states_0.pkl")
    refused = run(train_command(tmp_path / "runs", shards, "train.max_steps=8", "optim.ema_decay=0.9"), env=env)
    assert refused.returncode != 0 and "random_states_0.pkl cannot be read as plain tensors" in refused.stderr
    assert not marker.exists()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"s3cr3t-key-0123" not in path.read_bytes(), path
    assert json.loads((state / ckpt.TRAINER_STATE).read_text())["counters"]["step"] == 6
    # outputs get the umask's mode (group-readable under 0022/0002), not mkstemp's 0600
    from glow.files import new_file_mode

    step6 = Run(run_dir).latest().path
    for path in (step6 / "model.safetensors", step6 / "meta.json", step6 / "COMPLETE", state / ckpt.TRAINER_STATE):
        assert path.stat().st_mode & 0o777 == new_file_mode(), path
