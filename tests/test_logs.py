"""glow.logs: a log line is one line whatever a logged value holds, and log.txt is never written
through a link (issue 22: a manifest's text plus `log.txt -> ~/.ssh/authorized_keys` added a key)."""

from __future__ import annotations

import json
import logging
import re
import stat

import pytest

from glow.logs import escape_control, setup_logging

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlanted planter"
HOSTILE_KIND = f"\n{KEY}\n"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")  # how every record begins


@pytest.fixture
def restore_logging():
    yield
    setup_logging()  # our handlers again, without a file


def test_log_txt_through_a_link_is_refused_and_the_target_untouched(tmp_path, restore_logging):
    from glow.files import UnsafeFile

    keys = tmp_path / "victim" / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text("ssh-ed25519 AAAA victim@laptop\n")
    keys.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").symlink_to(keys)
    with pytest.raises(UnsafeFile) as info:
        setup_logging(run)
    assert str(run / "log.txt") in str(info.value) and "symbolic link" in str(info.value)
    assert keys.read_text() == "ssh-ed25519 AAAA victim@laptop\n" and stat.S_IMODE(keys.stat().st_mode) == 0o600


def test_a_manifest_text_cannot_add_a_line_to_the_log(tmp_path, restore_logging):
    """The trainer's fan-out warning (readers outnumber shards) names the shard source; a manifest
    whose source.kind holds a newline and a key stays one record, one line."""
    from glow.data.streams import fan_out_warning
    from tests.helpers.fake_sources import build_small_shards

    build_small_shards(tmp_path / "shards", n=10, samples_per_shard=10, dataset="toy", split="train")
    manifest = tmp_path / "shards" / "toy" / "train" / "manifest.json"
    man = json.loads(manifest.read_text())
    man["source"] = {**(man.get("source") or {}), "kind": HOSTILE_KIND}
    manifest.write_text(json.dumps(man))
    run = tmp_path / "run"
    setup_logging(run)
    log = logging.getLogger("glow.training.trainer")
    log.warning(fan_out_warning(tmp_path / "shards", "toy", "train", 2, 2))
    log.warning("source kind %s", HOSTILE_KIND)  # any value, whatever a future message prints
    try:
        raise ValueError(f"bad kind {HOSTILE_KIND}")
    except ValueError:
        log.exception("a bug, with its traceback")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = (run / "log.txt").read_text().splitlines()
    records = [line for line in lines if LINE.match(line)]
    assert len(records) == 3 and "source kind \\nssh-ed25519" in records[1]
    assert not any(line.startswith("ssh-ed25519") for line in lines), lines
    traceback = lines[lines.index(records[2]) + 1:]
    assert traceback[0] == "Traceback (most recent call last):" and len(traceback) > 2  # keeps its lines
    assert traceback[-1] == f"ValueError: bad kind \\n{KEY}\\n"  # its message escaped


def test_escape_control_is_one_line_and_idempotent():
    text = "a\nb\rc\x1b[31md\x00e\u2028f\x85g\tá"
    once = escape_control(text)
    assert once == "a\\nb\\rc\\x1b[31md\\x00e\\u2028f\\x85g\\tá"
    assert escape_control(once) == once and len(once.splitlines()) == 1


def test_a_user_error_is_one_line_on_stderr(capsys):
    from glow.errors import UserError, exit_on_user_error

    @exit_on_user_error
    def refuse():
        raise UserError(f"manifest kind {HOSTILE_KIND!s} refused")

    with pytest.raises(SystemExit) as info:
        refuse()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: manifest kind \\nssh-ed25519")
