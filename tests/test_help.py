"""Every entry point teaches itself: -h and --help show a description, a real example, and
help text (with its default) for every option."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from tests.helpers.repo import REPO, load_script

SCRIPTS = ["train/train.py", "eval/evaluate.py", "eval/figures.py", "eval/report.py", "shards/build.py",
           *sorted(str(p.relative_to(REPO)) for p in (REPO / "bench").glob("*.py")
                   if "__main__" in p.read_text())]  # the runnable ones (not bench/harness.py)


def load_command(script: str) -> click.Command:
    module = load_script(script)
    commands = [v for v in vars(module).values() if isinstance(v, click.Command)]
    groups = [c for c in commands if isinstance(c, click.Group)]
    own = [c for c in commands if c.callback.__module__ == module.__name__]  # bench scripts import others
    return groups[0] if groups else (own or commands)[0]  # entry scripts import glow.cli's


def commands_of(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += commands_of(sub, (*path, name))
    return out


def all_commands():
    for script in SCRIPTS:
        for path, cmd in commands_of(load_command(script)):
            yield pytest.param(script, path, cmd, id=" ".join([script, *path]))


@pytest.mark.parametrize(("script", "path", "cmd"), list(all_commands()))
def test_help_shows_an_example_and_documents_every_option(script, path, cmd):
    root = load_command(script)
    runner = CliRunner()
    long = runner.invoke(root, [*path, "--help"], terminal_width=120)
    short = runner.invoke(root, [*path, "-h"], terminal_width=120)
    assert long.exit_code == 0 and short.exit_code == 0, (long.output, short.output)
    assert long.output == short.output
    text = long.output
    assert re.search(r"^\s+(python|accelerate|ACCELERATE_USE_CPU=\S+)\s.*\S", text, re.M), f"no example line:\n{text}"
    if isinstance(cmd, click.Group):
        return
    lacking = [p.name for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not lacking, f"{script} {' '.join(path)}: options without help: {lacking}"
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.is_flag and not p.secondary_opts or p.required:
            continue
        said = "[default:" in (p.help or "")
        if p.default not in (None, (), "") and not p.show_default and not said:
            pytest.fail(f"{script} {' '.join(path)}: {p.opts[0]} has a default but does not show it")
        if p.default in (None, (), "") and not p.show_default and not said:
            pytest.fail(f"{script} {' '.join(path)}: {p.opts[0]} has no default value and does not say what "
                        "happens without it")


def test_evaluate_help_says_what_each_task_writes():
    text = CliRunner().invoke(load_command("eval/evaluate.py"), ["--help"], terminal_width=120).output
    for task, output in (("dump", "dumps/"), ("bpd", "bpd.json"), ("samples", "samples.png"), ("fid", "fid.json"),
                         ("latents", "latents.png")):
        line = next(line for line in text.splitlines() if line.strip().startswith(task + " "))
        assert output in line, line
    assert "(samples and fid)" not in text  # --temperature is the samples task's; fid has --fid-temperature
