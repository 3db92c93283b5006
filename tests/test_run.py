"""glow.run: the run directory's one owner (checkpoints, latest, results, control files) and the
facts it gives the Slurm templates (`python -m glow.run`), including the requeue decision."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glow.errors import CheckpointMissing, ResultsMissing
from glow.run import Checkpoint, Run, attempt_end, main, resolve_checkpoint
from tests.toydata import REPO, cpu_env


def fake_checkpoints(run: Run, complete=(5, 10), partial=(15,)) -> None:
    for step in (*complete, *partial):
        c = run.checkpoint(step)
        c.path.mkdir(parents=True)
        (c.path / "meta.json").write_text(f'{{"step": {step}, "model_hash": "m"}}')
        if step in complete:
            c.complete_marker.write_text(f"{step}\n")


def test_latest_is_the_newest_complete_checkpoint_and_the_link_follows(tmp_path):
    run = Run.at(tmp_path, "r")
    assert run.latest() is None and run.latest_step() == 0
    fake_checkpoints(run)
    assert [c.step for c in run.step_folders()] == [5, 10, 15]
    assert [c.step for c in run.complete_checkpoints()] == [5, 10]
    assert run.latest() == run.checkpoint(10)
    run.update_latest_link()
    assert os.readlink(run.latest_link) == "step-00000010"  # relative: survives rsync and moves
    assert (run.latest_link / "COMPLETE").read_text() == "10\n"  # tools can follow it
    # every spelling of "this run's newest" resolves by listing, not through the link
    os.replace(run.latest_link, run.checkpoints_dir / "old")
    run.latest_link.symlink_to("/elsewhere")
    for spec in (run.path, run.checkpoints_dir, run.latest_link, run.checkpoint(10).path):
        assert resolve_checkpoint(spec) == run.checkpoint(10)
    assert resolve_checkpoint(run.checkpoint(5).path).meta()["step"] == 5
    with pytest.raises(CheckpointMissing, match="not complete"):
        resolve_checkpoint(run.checkpoint(15).path)
    with pytest.raises(CheckpointMissing, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "other")
    assert Checkpoint.at(run.checkpoint(15).path) == run.checkpoint(15)


def test_prune_keeps_the_newest_and_drops_stale_partial_saves(tmp_path):
    run = Run(tmp_path / "r")
    fake_checkpoints(run, complete=(5, 10, 20), partial=(15, 25))
    run.prune_checkpoints(keep=2)
    assert [c.step for c in run.step_folders()] == [10, 20, 25]  # 25 may be a save in progress


def test_meta_is_read_without_following_a_link(tmp_path):
    from glow.files import UnsafeFile

    secret = tmp_path / "colleague_netrc"
    secret.write_text('{"step": 1, "password": "x"}')
    run = Run(tmp_path / "r")
    fake_checkpoints(run, complete=(5,), partial=())
    (run.checkpoint(5).meta_path).unlink()
    run.checkpoint(5).meta_path.symlink_to(secret)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        run.latest().meta()


def test_evaluated_steps_and_dump_paths(tmp_path):
    run = Run(tmp_path / "r")
    with pytest.raises(ResultsMissing, match="run eval/evaluate.py first"):
        run.eval_step()
    for step in (10, 20):
        run.eval_dir(step).mkdir(parents=True)
    (run.path / "eval" / "notes").mkdir()
    assert run.evaluated_steps() == [10, 20] and run.eval_step() == 20 and run.eval_step(10) == 10
    with pytest.raises(ResultsMissing, match="step 30"):
        run.eval_step(30)
    assert run.dump_path(10, "svhn/test") == run.path / "eval" / "step-00000010" / "dumps" / "svhn-test.npz"
    with pytest.raises(ValueError, match="DATASET|dataset"):
        run.dump_path(10, "../x")


def test_stop_markers(tmp_path, monkeypatch):
    run = Run(tmp_path / "r")
    run.path.mkdir()
    run.stop_path.touch()
    os.utime(run.stop_path, (0, 0))  # from an earlier attempt
    monkeypatch.setenv("GLOW_ATTEMPT_START", "1000")
    run.clear_stale_markers()
    assert not run.stop_requested()
    run.stop_path.touch()  # written during this attempt: kept
    run.clear_stale_markers()
    assert run.stop_requested()
    run.mark_stopped(12, "SIGUSR1")
    assert run.read_stopped() == (12, "SIGUSR1") and not run.stop_requested()
    run.stopped_path.write_text("12 $(touch pwned)\n")
    assert run.read_stopped() is None  # not ours: never acted on


@pytest.mark.parametrize("stopped, start, restarts, got_term, action, code", [
    (None, 0, 0, False, "finished", 0),
    ("20 SIGUSR1", 10, 0, False, "requeue", 0),
    ("20 STOP-file", 10, 3, False, "requeue", 0),
    ("20 SIGUSR1", 20, 0, False, "no-progress", 1),
    ("20 SIGUSR1", 10, 50, False, "cap", 1),
    ("20 SIGTERM", 10, 0, False, "term", 75),
    ("20 SIGUSR1", 10, 0, True, "term", 75),
])
def test_the_requeue_decision(tmp_path, stopped, start, restarts, got_term, action, code):
    run = Run(tmp_path / "r")
    fake_checkpoints(run, complete=(10, 20), partial=())
    if stopped:
        run.stopped_path.write_text(stopped + "\n")
    decision = attempt_end(run, start_step=start, restarts=restarts, max_requeues=50, got_term=got_term)
    assert (decision.action, decision.exit_code) == (action, code)


def test_the_shell_entry_prints_only_numbers_and_words(tmp_path, capsys):
    run = Run(tmp_path / "r")
    fake_checkpoints(run, complete=(7,), partial=())
    hostile = run.checkpoints_dir / "step-1+NNODES[$(touch pwned)]"
    hostile.mkdir()
    (hostile / "COMPLETE").touch()
    assert main(["latest-step", str(run.path)]) == 0
    assert capsys.readouterr().out == "7\n"
    run.stopped_path.write_text("7 SIGUSR1\n")
    assert main(["attempt-end", str(run.path), "0", "0", "50", "0"]) == 0
    assert capsys.readouterr().out.startswith("requeue ")
    out = subprocess.run([sys.executable, "-m", "glow.run", "latest-step", str(run.path)], env=cpu_env(),
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (out.returncode, out.stdout) == (0, "7\n") and not (tmp_path / "pwned").exists()
