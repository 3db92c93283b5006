"""glow.files: atomic writes (group-readable, never group-writable), no-follow capped reads and appends, and locks that name
their holder (a heartbeat where flock is node-local)."""

import json
import os
import stat
import subprocess
import sys
import threading

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


def test_atomic_write_is_group_readable_never_group_writable(tmp_path, umask_002):
    path = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 == new_file_mode(0o644)  # not mkstemp's 0600, not 0664
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


# --------------------------------------------------------------------------- appends, owners, the lock's heartbeat


def test_append_never_follows_a_link_and_creates_no_group_writable_file(tmp_path, umask_002):
    from glow.files import UnsafeFile, open_append

    keys = tmp_path / "victim_authorized_keys"
    keys.write_text("ssh-ed25519 AAAA victim\n")
    keys.chmod(0o600)
    (tmp_path / "log.txt").symlink_to(keys)
    with pytest.raises(UnsafeFile, match="log.txt is a symbolic link"):
        open_append(tmp_path / "log.txt")
    assert keys.read_text() == "ssh-ed25519 AAAA victim\n" and stat.S_IMODE(keys.stat().st_mode) == 0o600
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(UnsafeFile, match="fifo.txt"):
        open_append(tmp_path / "fifo.txt")  # refused at once, not blocked
    for line in (b"one\n", b"two\n"):
        fd = open_append(tmp_path / "new.txt")
        os.write(fd, line)
        os.close(fd)
    assert (tmp_path / "new.txt").read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644  # a log no one else can add to


def test_own_reads_refuse_a_file_another_user_wrote(tmp_path):
    from glow.files import ForeignFile, read_json

    path = tmp_path / "entry.json"
    path.write_text('{"mean": 1.0}')
    assert read_json(path, 64, own=True) == {"mean": 1.0}
    os.chown(path, 65534, 65534)  # the tests run as root
    assert read_json(path, 64) == {"mean": 1.0}
    with pytest.raises(ForeignFile, match=r"entry.json was written by user .* \(uid 65534\), not by you"):
        read_json(path, 64, own=True)


def _plant_holder(path, host: str, age_s: float) -> None:
    path.write_text(json.dumps({"host": host, "pid": 4242, "slurm_job_id": "77", "slurm_restart_count": "0"}) + "\n")
    then = path.stat().st_mtime - age_s
    os.utime(path, (then, then))


def test_a_lock_held_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    """flock can be node-local (Lustre localflock, NFS nolock): a holder on another node, whose
    heartbeat is fresh by the filesystem's clock, still holds the lock."""
    from glow.files import LOCK_STALE_S

    path = tmp_path / "LOCK"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _plant_holder(path, "other-node", age_s=5)
    with pytest.raises(LockHeld) as info:
        with hold_lock(path):
            pass
    assert "host=other-node" in str(info.value) and "pid=4242" in str(info.value) and "heartbeat" in str(info.value)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # a requeued attempt of the holder's own job (killed, not released)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with hold_lock(path) as holder:
        assert holder["slurm_restart_count"] == "1"
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    _plant_holder(path, "other-node", age_s=5)
    with pytest.raises(LockHeld):
        with hold_lock(path):
            pass
    _plant_holder(path, "other-node", age_s=LOCK_STALE_S + 5)  # its holder stopped beating: stale
    with hold_lock(path, {"job": "new"}) as holder:
        assert json.loads(path.read_text())["job"] == "new" and holder["pid"] == os.getpid()
    assert path.read_text() == ""  # released: another node may take it at once
    with hold_lock(path):
        pass


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    path = tmp_path / "LOCK"
    with hold_lock(path, heartbeat_s=0.01):
        os.utime(path, (1000.0, 1000.0))  # as if the last beat were long ago
        for _ in range(2000):  # a file gate: wait for the next beat (bounded)
            if path.stat().st_mtime > 1000.0:
                break
            threading.Event().wait(0.005)
        assert path.stat().st_mtime > 1000.0


def test_enolck_is_one_line(tmp_path, monkeypatch):
    import errno
    import fcntl

    from glow.errors import UserError
    from glow.files import LockUnsupported

    def no_lock_manager(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_lock_manager)
    with pytest.raises(LockUnsupported) as info:
        with hold_lock(tmp_path / "LOCK"):
            pass
    message = str(info.value)
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert "LOCK" in message and "ENOLCK" in message and "flock" in message and "\n" not in message
