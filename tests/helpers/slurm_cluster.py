"""A throw-away two-node Slurm cluster on this machine, for tests.

`SlurmCluster` installs Slurm and munge from Debian when they are missing, writes a
config into a temporary directory and starts `munged`, `slurmctld` and three `slurmd`
on 127.0.0.1 (different ports): `n1` and `n2` form the default partition `debug`; `n3` is
the preemption node, shared by partition `low` and partition `high` (a higher PriorityTier,
`PreemptType=preempt/partition_prio`, `PreemptMode=REQUEUE`, no `GraceTime`): a `high` job that
needs `n3` preempts the `low` jobs there: Slurm signals them (TERM, then KILL after `KillWait`)
and requeues them. All daemons run in one private
mount namespace (held by a `sleep` process) in which `/etc/hosts` and `/etc/resolv.conf`
are replaced by files that resolve every name locally and point the resolver at
127.0.0.1: nothing leaves the loopback interface. Jobs inherit that namespace, which is
also how teardown finds every process a job left behind.

Every Slurm command is given `SLURM_CONF` (see `SlurmCluster.env`); without it Slurm
looks the controller up in DNS. Use `cluster.run([...])` for Slurm commands: it enters
the namespace and sets the environment.

The `slurm_cluster` fixture (session scope) is registered in `tests/conftest.py`.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged")
NODES = ("n1", "n2")  # the default partition
PREEMPT_NODE = "n3"  # partitions low (preemptable, requeued) and high
ALL_NODES = (*NODES, PREEMPT_NODE)
# Advertised, not real (SlurmdParameters=config_overrides): tests run several 1-CPU jobs per
# node at once on a 2-core machine.
CPUS_PER_NODE = 8
PARTITION = "debug"
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
})


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed here (not root, or no apt-get)."""


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_slurm_installed() -> None:
    """Install the Debian packages when a binary is missing; raise SlurmUnavailable if we can't."""
    missing = _missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and installing "
                               f"{' '.join(PACKAGES)} needs root (euid={os.geteuid()})")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and there is no apt-get "
                               f"to install {' '.join(PACKAGES)}")
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise SlurmUnavailable("unshare/nsenter (util-linux) are needed to isolate the daemons")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("installing %s with apt-get", " ".join(PACKAGES))
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    still = _missing_binaries()
    if still:
        raise RuntimeError(f"after installing {PACKAGES}, still missing: {still}")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """A running cluster; create with `SlurmCluster.start()`, end with `stop()`."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.hostname = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._holder: subprocess.Popen | None = None
        self.job_ids: list[str] = []
        path = os.environ.get("PATH", "/usr/bin:/bin")
        for extra in ("/usr/sbin", "/sbin"):
            if extra not in path.split(":"):
                path += ":" + extra
        self.env: dict[str, str] = {"SLURM_CONF": str(self.conf), "PATH": path}

    # ---------------------------------------------------------------- set-up
    @classmethod
    def start(cls, root: Path | None = None) -> "SlurmCluster":
        ensure_slurm_installed()
        root = Path(root or tempfile.mkdtemp(prefix="slurm-test-"))
        cluster = cls(root)
        try:
            cluster._write_config()
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self) -> None:
        r = self.root
        os.chmod(r, 0o755)
        for d in ("state", "spool", "log", "munge", "etc", "jobs"):
            (r / d).mkdir(exist_ok=True)
        os.chmod(r / "munge", 0o755)          # munged insists on this for its socket dir
        os.chmod(r / "jobs", 0o777)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        names = " ".join([self.hostname, *ALL_NODES])
        (r / "etc" / "hosts").write_text(f"127.0.0.1 localhost {names}\n::1 localhost\n")
        (r / "etc" / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        ctl_port, *node_ports = _free_ports(1 + len(ALL_NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={self.hostname} Port={p} "
            f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            for n, p in zip(ALL_NODES, node_ports))
        self.conf.write_text(f"""\
# Throw-away test cluster written by tests/helpers/slurm_cluster.py
ClusterName=glowtest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
{nodes}
PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
PartitionName=low Nodes={PREEMPT_NODE} PriorityTier=1 PreemptMode=REQUEUE State=UP
PartitionName=high Nodes={PREEMPT_NODE} PriorityTier=2 PreemptMode=OFF State=UP
""")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        assert self._holder is not None
        logf = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(
            ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", "--", *argv],
            env=self.env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        logf.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def _start_daemons(self) -> None:
        r = self.root
        # A process that holds a private mount namespace with our hosts/resolv.conf.
        setup = (f"mount --bind {r}/etc/hosts /etc/hosts && "
                 f"mount --bind {r}/etc/resolv.conf /etc/resolv.conf && exec sleep infinity")
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup],
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids["namespace"] = self._holder.pid
        self._wait(lambda: self._ns_ready(), 10, "the mount namespace with private /etc/hosts")
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key",
                               f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log",
                               f"--seed-file={r}/munge/munged.seed", "--force"])
        self._wait(lambda: self.munge_socket.exists(), 10, f"munged socket {self.munge_socket}")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0
                   and "UP" in self.run(["scontrol", "ping"], check=False).stdout,
                   20, "slurmctld to answer `scontrol ping`")
        for n in ALL_NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._nodes_idle, 30, f"nodes {ALL_NODES} to be idle in sinfo")

    def _ns_ready(self) -> bool:
        assert self._holder is not None
        if self._holder.poll() is not None:
            raise RuntimeError("could not create a private mount namespace "
                               "(unshare --mount needs root / CAP_SYS_ADMIN)")
        try:
            return os.readlink(f"/proc/{self._holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt") \
                and Path(f"/proc/{self._holder.pid}/comm").read_text().strip() == "sleep"
        except OSError:
            return False

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in ALL_NODES)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}; "
                                       f"logs:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}; logs:\n{self.logs()}")

    # ---------------------------------------------------------------- helpers
    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
            timeout: float = 60, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the cluster's namespace with SLURM_CONF set."""
        assert self._holder is not None
        full_env = {**os.environ, **(env or {}), **self.env}
        wd = os.path.abspath(cwd or os.getcwd())   # entering a mount namespace resets the cwd
        proc = subprocess.run(
            ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", f"--wd={wd}", "--", *argv],
            env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{shlex.join(argv)}` failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, script: str | os.PathLike, *args: str, env: Mapping[str, str] | None = None,
               sbatch_args: Iterable[str] = (), cwd: str | os.PathLike | None = None) -> str:
        """Submit `script` (a path) with `args`; return the job id as a string."""
        out = self.run(["sbatch", "--parsable", *sbatch_args, str(script), *args],
                       env=env, cwd=cwd).stdout.strip()
        job_id = out.split(";")[0]
        self.job_ids.append(job_id)
        return job_id

    def job_state(self, job_id: str) -> dict[str, str]:
        """Fields of `scontrol show job -o <id>` as a dict (for an array: its first task)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if proc.returncode != 0 or not lines:
            raise KeyError(f"job {job_id} unknown to slurmctld: {proc.stderr.strip()}")
        return _parse_record(lines[0])

    def job_states(self, job_id: str) -> list[dict[str, str]]:
        """All records for `job_id` (array tasks give one each)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return [_parse_record(ln) for ln in proc.stdout.splitlines() if ln.strip()]

    def wait_for(self, job_id: str, states: Iterable[str] = TERMINAL_STATES,
                 timeout: float = 120) -> dict[str, str]:
        """Poll every 0.5 s until the job's JobState is in `states`; return its record."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        rec: dict[str, str] = {}
        while time.monotonic() < deadline:
            rec = self.job_state(job_id)
            if rec.get("JobState") in states:
                return rec
            if rec.get("JobState") in TERMINAL_STATES and not states & TERMINAL_STATES:
                break
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {sorted(states)} within {timeout}s; "
                           f"last record: {rec}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------- teardown
    def _namespace_pids(self) -> list[int]:
        """PIDs in our mount namespace: daemons, job scripts, and what jobs left behind."""
        if self._holder is None:
            return []
        try:
            ns = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        if self.job_ids and "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", *self.job_ids], check=False, timeout=10)
            except Exception:  # noqa: BLE001 - best effort on the way down
                pass
        order = [*(f"slurmd-{n}" for n in reversed(ALL_NODES)), "slurmctld", "munged"]
        for name in order:
            p = self._procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name in order:
            p = self._procs.get(name)
            if p is not None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # Job processes that outlived their job (linuxproc can't track detached ones).
        leftovers = [p for p in self._namespace_pids() if p != (self._holder.pid if self._holder else -1)]
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._holder is not None and self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait()


def _parse_record(line: str) -> dict[str, str]:
    """Parse one `scontrol -o` record: space-separated Key=Value (values may contain '=')."""
    rec: dict[str, str] = {}
    key = None
    for tok in line.split(" "):
        if "=" in tok and tok.split("=", 1)[0].replace(":", "").replace("/", "").isalnum():
            key, val = tok.split("=", 1)
            rec[key] = val
        elif key is not None and tok:
            rec[key] += " " + tok            # e.g. Command paths or Reason text with spaces
    return rec


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node cluster for the whole session; skips if Slurm can't be installed."""
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as e:
        pytest.skip(f"real Slurm cluster unavailable: {e}")
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
