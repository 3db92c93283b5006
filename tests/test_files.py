"""glow.files: atomic writes with the umask's mode, and locks that name their holder."""

import json
import os
import stat
import subprocess
import sys

import pytest

from glow.files import (
    LockHeld,
    atomic_write_bytes,
    atomic_write_json,
    hold_lock,
    new_file_mode,
)


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_atomic_write_uses_umask_mode(tmp_path, umask_002):
    path = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o664 == new_file_mode()
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]  # no temp file left


def test_atomic_write_json_replaces_and_sorts(tmp_path):
    path = tmp_path / "t.json"
    atomic_write_json(path, {"b": 1, "a": 2})
    atomic_write_json(path, {"c": 3, "a": 1})
    assert path.read_text() == json.dumps({"a": 1, "c": 3}, indent=2, sort_keys=True) + "\n"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "t.txt"
    atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_lock_refuses_second_holder_and_names_first(tmp_path, umask_002):
    path = tmp_path / "LOCK"
    code = ("import sys, time; from glow.files import hold_lock\n"
            "with hold_lock(sys.argv[1], {'job': 'first'}):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as info:
            with hold_lock(path):
                pass
        assert info.value.holder["pid"] == proc.pid and info.value.holder["job"] == "first"
        assert str(proc.pid) in str(info.value)
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone: its lock is taken over
    with hold_lock(path, {"job": "second"}) as holder:
        assert holder["pid"] == os.getpid()
        assert json.loads(path.read_text())["job"] == "second"


# --------------------------------------------------------------------------- no-follow reads and the lock


def test_reads_refuse_links_fifos_and_oversize(tmp_path):
    from glow.files import UnsafeFile, read_bytes, read_json

    secret = tmp_path / "colleague_secret"
    secret.write_text('{"token": "s3cret"}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").symlink_to(secret)
    os.link(secret, run / "hard.json")
    os.mkfifo(run / "fifo.json")
    (run / "big.json").write_bytes(b"[" + b"0," * 100 + b"0]")
    (run / "ok.json").write_text('{"a": 1}')
    for name in ("config.json", "hard.json", "fifo.json"):  # the FIFO must not block
        with pytest.raises(UnsafeFile, match=name):
            read_bytes(run / name, 1 << 20)
    with pytest.raises(UnsafeFile, match="more than the 64 this file may hold"):
        read_bytes(run / "big.json", 64)
    assert read_json(run / "ok.json", 64) == {"a": 1}
    with pytest.raises(FileNotFoundError):
        read_bytes(run / "absent.json", 64)


def test_lock_through_a_symlink_leaves_the_target_untouched(tmp_path):
    from glow.files import UnsafeFile

    dotfile = tmp_path / "victim_bashrc"
    dotfile.write_text("export PATH=/usr/bin\n")
    dotfile.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir()
    (run / "LOCK").symlink_to(dotfile)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        with hold_lock(run / "LOCK"):
            pass
    assert dotfile.read_text() == "export PATH=/usr/bin\n"
    assert stat.S_IMODE(dotfile.stat().st_mode) == 0o600
