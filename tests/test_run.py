"""glow.run: the run directory's one owner (checkpoints, latest, results, control files) and the
facts it gives the Slurm templates (`python -m glow.run`), including the requeue decision."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glow.errors import CheckpointMissing, ResultsMissing
from glow.run import Checkpoint, Run, attempt_end, main, resolve_checkpoint
from tests.helpers.fake_runs import fake_checkpoints
from tests.helpers.repo import REPO, cpu_env


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


def test_a_finish_request_is_consumed_with_any_stop_request(tmp_path, monkeypatch):
    run = Run(tmp_path / "r")
    run.path.mkdir()
    run.finish_path.touch()
    os.utime(run.finish_path, (0, 0))  # touched while the job waited in the queue
    monkeypatch.setenv("GLOW_ATTEMPT_START", "1000")
    run.clear_stale_markers()
    assert run.finish_requested()  # only a person writes FINISH: never dropped as stale
    run.stop_path.touch()
    run.mark_stopped(7, "FINISH")
    assert run.read_stopped() == (7, "FINISH") and not run.finish_requested() and not run.stop_requested()


@pytest.mark.parametrize("stopped, start, restarts, got_term, action, code", [
    (None, 0, 0, False, "finished", 0),
    ("20 SIGUSR1", 10, 0, False, "requeue", 0),
    ("20 STOP-file", 10, 3, False, "requeue", 0),
    ("20 SIGUSR1", 20, 0, False, "no-progress", 1),
    ("20 SIGUSR1", 10, 50, False, "cap", 1),
    ("20 SIGTERM", 10, 0, False, "term", 75),
    ("20 SIGUSR1", 10, 0, True, "term", 75),
    ("20 FINISH", 10, 0, False, "finished-early", 0),
    ("20 FINISH", 10, 50, False, "finished-early", 0),  # the cap does not matter: nothing to requeue
    ("20 FINISH", 10, 0, True, "term", 75),  # scancel'd as well: the job is cancelled anyway
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


# -- trust (issue 22): the run directory is the user's, or the user said it is shared ------------
def _one_line_refusal(err: BaseException, path) -> str:
    message = str(err)
    assert str(path) in message and "\n" not in message and "--allow-shared-run" in message, message
    return message


@pytest.mark.parametrize("plant", ["run-link", "checkpoints-link", "foreign-step", "foreign-eval", "config-link",
                                   "lock-link", "samples-link", "file-as-folder"])
def test_check_trusted_refuses_links_and_other_users_folders(tmp_path, monkeypatch, plant):
    from glow.trust import UntrustedRun

    monkeypatch.delenv("GLOW_ALLOW_SHARED_RUN", raising=False)
    secret = tmp_path / "colleague" / ".netrc"
    secret.parent.mkdir()
    secret.write_text("machine api.wandb.ai login user password s3cr3t\n")
    other = Run(tmp_path / "other")
    fake_checkpoints(other, complete=(5,), partial=())
    run = Run(tmp_path / "runs" / "r")
    fake_checkpoints(run, complete=(10,), partial=())
    run.eval_dir(10).mkdir(parents=True)
    run.check_trusted()  # all real folders of the user: fine
    bad = {"run-link": run.path, "checkpoints-link": run.checkpoints_dir, "foreign-step": run.checkpoint(10).path,
           "foreign-eval": run.eval_dir(10), "config-link": run.config_path, "lock-link": run.lock_path,
           "samples-link": run.eval_dir(10) / "samples.png", "file-as-folder": run.path / "figures"}[plant]
    if plant == "run-link":
        os.rename(run.path, tmp_path / "runs" / "real")
        run.path.symlink_to(tmp_path / "runs" / "real")
    elif plant == "checkpoints-link":
        os.rename(run.checkpoints_dir, run.path / "mine")
        run.checkpoints_dir.symlink_to(other.checkpoints_dir)
    elif plant.startswith("foreign"):
        os.chown(bad, 65534, 65534)
    elif plant == "file-as-folder":
        bad.write_text("x")
    else:
        bad.symlink_to(secret)
    with pytest.raises(UntrustedRun) as info:
        run.check_trusted()
    if plant in ("config-link", "lock-link", "samples-link"):  # a file: never read through the link anyway
        message = str(info.value)
        assert str(bad) in message and "symbolic link" in message and "\n" not in message
    else:
        message = _one_line_refusal(info.value, bad)
    assert "s3cr3t" not in message
    Run(run.path, allow_shared=True).check_trusted()  # a deliberately shared layout: --allow-shared-run
    monkeypatch.setenv("GLOW_ALLOW_SHARED_RUN", "1")
    run.check_trusted()
    assert secret.read_text() == "machine api.wandb.ai login user password s3cr3t\n"


def test_the_shell_preflight_check_trust(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GLOW_ALLOW_SHARED_RUN", raising=False)
    run = Run(tmp_path / "r")
    fake_checkpoints(run, complete=(7,), partial=())
    assert main(["check-trust", str(run.path)]) == 0 and capsys.readouterr().err == ""
    assert main(["check-trust", str(tmp_path / "not-yet")]) == 0  # a new run: nothing to check
    os.chown(run.checkpoints_dir, 65534, 65534)
    assert main(["check-trust", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run.checkpoints_dir} belongs to user ") and err.count("\n") == 1
    assert "--allow-shared-run" in err and "GLOW_ALLOW_SHARED_RUN=1" in err
    monkeypatch.setenv("GLOW_ALLOW_SHARED_RUN", "1")
    assert main(["check-trust", str(run.path)]) == 0


def test_a_checkpoints_link_to_another_run_is_never_written_or_pruned(tmp_path, monkeypatch):
    """A group member swaps checkpoints/ for a link to another run while a trainer runs: the next
    save and prune are refused, and the other run keeps every file."""
    from glow.trust import UntrustedRun

    monkeypatch.delenv("GLOW_ALLOW_SHARED_RUN", raising=False)
    other = Run(tmp_path / "other")
    fake_checkpoints(other, complete=(5, 10, 20), partial=(25,))
    before = sorted(str(p.relative_to(other.path)) for p in other.path.rglob("*"))
    run = Run(tmp_path / "r")
    fake_checkpoints(run, complete=(5,), partial=())
    os.rename(run.checkpoints_dir, run.path / "moved")
    run.checkpoints_dir.symlink_to(other.checkpoints_dir)
    for act in (lambda: run.new_step_folder(30), lambda: run.prune_checkpoints(keep=1), run.lock().__enter__):
        with pytest.raises(UntrustedRun, match="checkpoints is a symbolic link"):
            act()
    assert sorted(str(p.relative_to(other.path)) for p in other.path.rglob("*")) == before
    assert not run.lock_path.exists()  # refused before the lock was taken


def test_new_step_folders_are_not_group_writable(tmp_path):
    run = Run(tmp_path / "r")
    old = os.umask(0o002)
    try:
        fake_checkpoints(run, complete=(5,), partial=(10,))
        (run.checkpoint(10).path / "planted").symlink_to(tmp_path / "r" / "config.yaml")
        checkpoint = run.new_step_folder(10)  # the partial save of an interrupted attempt goes
    finally:
        os.umask(old)
    assert list(checkpoint.path.iterdir()) == [checkpoint.state_dir] and not list(checkpoint.state_dir.iterdir())
    for folder in (checkpoint.path, checkpoint.state_dir):
        assert folder.stat().st_mode & 0o777 == 0o755, oct(folder.stat().st_mode)


def test_stop_staleness_is_judged_by_the_filesystem_clock(tmp_path, monkeypatch):
    """This node's clock runs an hour ahead: a STOP the trap wrote 2 s after the attempt began
    (stamped by the filesystem) is older than GLOW_ATTEMPT_START by the node's clock, yet kept."""
    import time

    from glow import attempts

    run = Run(tmp_path / "r")
    run.path.mkdir()
    real = time.time()
    monkeypatch.setattr(attempts, "_node_time", lambda: real + 3600 + 5)  # 5 s into the attempt, skewed clock
    monkeypatch.setenv("GLOW_ATTEMPT_START", str(real + 3600))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run.stop_path.touch()
    os.utime(run.stop_path, (real + 2, real + 2))
    run.clear_stale_markers()
    assert run.stop_requested()  # the node's clock alone would have dropped it
    os.utime(run.stop_path, (real - 60, real - 60))  # from the previous attempt
    run.clear_stale_markers()
    assert not run.stop_requested()
    # The Slurm template's ATTEMPT file: its own time stamp dates the attempt.
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert main(["attempt-start", str(run.path)]) == 0
    assert run.attempt_path.read_text() == "41 2\n"
    began = run.attempt_path.stat().st_mtime
    monkeypatch.setattr(attempts, "_node_time", lambda: began + 10**6)  # any node clock: unused
    for offset, kept in ((1, True), (-1, False)):
        run.stop_path.touch()
        os.utime(run.stop_path, (began + offset, began + offset))
        run.clear_stale_markers()
        assert run.stop_requested() == kept
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # an ATTEMPT of an earlier attempt is not this one's
    assert abs(attempts.attempt_began(run) - (began - 10**6 + 3600)) < 60  # GLOW_ATTEMPT_START's, moved


@pytest.mark.slow
def test_the_trainer_finishes_early_on_request_with_a_checkpoint(tmp_path):
    """FINISH: the trainer saves a complete checkpoint at its next step, writes STOPPED
    ("<step> FINISH"), consumes FINISH and returns 0; the decision is finished-early."""
    from accelerate import Accelerator

    from glow.config import load_config
    from glow.training.trainer import Trainer
    from tests.helpers.repo import TINY
    from tests.helpers.toy import build_toy_shards

    shards = build_toy_shards(tmp_path / "shards", n_train=40, n_test=10, n_ood=10)
    cfg = load_config(TINY, [f"run.root={tmp_path}", f"data.root={shards}", "data.dataset=toy",
                             "train.max_steps=50", "train.checkpoint_every=20"])
    run = Run.at(tmp_path, cfg.run.name)
    run.path.mkdir()
    run.finish_path.touch()
    assert Trainer(cfg, Accelerator(cpu=True)).fit() == 0
    assert run.read_stopped() == (1, "FINISH") and not run.finish_requested()
    assert run.latest_step() == 1  # a checkpoint at the next step, not at checkpoint_every
    decision = attempt_end(run, start_step=0, restarts=0, max_requeues=50, got_term=False)
    assert (decision.action, decision.exit_code) == ("finished-early", 0)
