"""glow's launcher (python -m glow.cli.launch): `accelerate launch` whose exit status tells the truth.

A user error in any worker ends the launch with its documented code and its one-line message as
the last line, no launcher traceback; a bug keeps its tracebacks. The launches are real: two gloo
processes through accelerate (torchrun) and one through accelerate's simple launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glow.errors import EXIT_DATA, EXIT_USAGE
from glow.exit_reports import EXIT_DIR_ENV, private_dir, read_reports, write_report
from tests.helpers.repo import REPO, TINY, cpu_env

CPU_2PROC = str(REPO / "train" / "accelerate" / "cpu_2proc.yaml")


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glow.cli.launch", *args], env=env or cpu_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


# -- the report directory ------------------------------------------------------------------------
def test_reports_need_a_private_directory_of_this_user(tmp_path, monkeypatch):
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    assert write_report(2, "no launcher asked") is False  # the worker prints it itself
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o770)
    shared.chmod(0o770)
    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    for refused in (shared, link, tmp_path / "missing"):
        monkeypatch.setenv(EXIT_DIR_ENV, str(refused))
        assert private_dir(refused) is None and write_report(2, "x") is False
    assert list(shared.iterdir()) == [] and list(private.iterdir()) == []
    monkeypatch.setenv(EXIT_DIR_ENV, str(private))
    monkeypatch.setenv("RANK", "1")
    assert write_report(EXIT_DATA, "shards missing\nsecond line") is True
    monkeypatch.setenv("RANK", "0")
    assert write_report(EXIT_USAGE, "bad override") is True
    (private / "rank-x").write_text("2\nnot a rank\n")
    reports = read_reports(private)
    assert [(r.rank, r.exit_code, r.message) for r in reports] == [
        (0, EXIT_USAGE, "bad override"), (1, EXIT_DATA, "shards missing\\nsecond line")]
    private.chmod(0o750)  # opened to the group: its reports are not trusted any more
    assert read_reports(private) == []


# -- real launches ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_config_error_under_two_processes_ends_with_2_and_no_traceback(tmp_path):
    exit_dir = tmp_path / "exit"
    exit_dir.mkdir(mode=0o700)  # as the Slurm template passes its own: the reports stay readable
    result = launch("--config_file", CPU_2PROC, "train/train.py", "--config", str(TINY),
                    f"run.root={tmp_path}", "train.max_stepz=3", env=cpu_env(**{EXIT_DIR_ENV: str(exit_dir)}))
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USAGE, output
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    assert last_line(result.stderr).startswith("error: override 'train.max_stepz=3': unknown key"), output
    assert output.count("unknown key train.max_stepz") == 1  # printed once, by the launcher
    # a worker's report, and the launcher's one line (the launcher stops the other worker after the first
    # failure: that one may have written its report, part of it as an atomic write's temporary file, or none)
    names = sorted(p.name for p in exit_dir.iterdir())
    assert "error" in names and {"rank-0", "rank-1"} & set(names), names
    assert (exit_dir / "error").read_text() == last_line(result.stderr) + "\n"


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_and_status_1(tmp_path):
    script = tmp_path / "bug.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise RuntimeError('a bug on rank 1')\n")
    result = launch("--config_file", CPU_2PROC, str(script))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" in output and "RuntimeError: a bug on rank 1" in output, output


@pytest.mark.slow
def test_one_process_keeps_a_usage_status_without_a_report(tmp_path):
    """click's own usage errors (exit 2, message printed by click) keep their status too."""
    result = launch("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "train/train.py", "--no-such-option")
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USAGE, output
    assert "Traceback" not in output and "No such option" in output, output
    assert last_line(result.stderr) == ("error: train/train.py exited with status 2 (a usage, data or checkpoint "
                                        "error: its message is above)")


def test_the_launcher_takes_accelerates_arguments():
    result = launch("--help")
    assert result.returncode == 0 and "--num_processes" in result.stdout and "python -m glow.cli.launch" in result.stdout
    assert os.path.isfile(CPU_2PROC)
