"""A real etcd cluster of N members for the tests and the benchmarks (Debian's etcd-server).

The pool's tests run against etcd itself, not a fake: `EtcdCluster` starts each member as its own
`/usr/bin/etcd` process with a static `--initial-cluster`, optionally inside a network namespace
(`nsenter --net=/run/netns/NAME`, so a "host" of the pool tests owns its member), each with its
data under WORKDIR/<name>/data and its log in WORKDIR/<name>/etcd.log. Election timeouts are
short (100 ms heartbeat, 1 s election) so a test that kills the leader sees a new one within
seconds. `close()` (or leaving the `with` block) SIGKILLs every member and removes the data dirs;
the logs stay for a post-mortem. Members also get PDEATHSIG, so a test runner that dies takes
its etcd members along: start the cluster from a thread that outlives it (the main thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from slimvisor.jail import linux
from slimvisor.runtime.errors import SlimvisorError

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
NSENTER = "/usr/bin/nsenter"
HEARTBEAT_MS = 100  # --heartbeat-interval: short, for tests
ELECTION_MS = 1000  # --election-timeout: 10 heartbeats, as etcd's tuning guide advises
POLL_S = 0.1  # how often wait_healthy asks a member that is not yet healthy
LOG_TAIL = 2000  # characters of a member's log quoted when it fails to come up


class EtcdClusterError(SlimvisorError):
    """A member would not start or did not become healthy in time."""


@dataclass(frozen=True)
class EtcdMember:
    """Where one member runs: its name, the address both its URLs bind, its two ports, its netns."""

    name: str
    address: str = "127.0.0.1"
    client_port: int = 2379
    peer_port: int = 2380
    netns: str | None = None  # a name under /run/netns (`ip netns add`); None: this process's netns

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on `address` right now (the kernel's pick; another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def local_members(count: int, prefix: str = "etcd") -> list[EtcdMember]:
    """`count` members on 127.0.0.1 with free client and peer ports, named PREFIX0, PREFIX1, ..."""
    return [EtcdMember(f"{prefix}{i}", client_port=free_port(), peer_port=free_port()) for i in range(count)]


def _arm_pdeathsig() -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)


class EtcdCluster:
    """N etcd members started as one cluster; a context manager that leaves nothing running."""

    def __init__(self, members: Sequence[EtcdMember], workdir: Path, token: str = "slimvisor-test") -> None:
        if not members:
            raise ValueError("an etcd cluster needs at least one member")
        if len({m.name for m in members}) != len(members):
            raise ValueError(f"etcd member names must be distinct: {[m.name for m in members]}")
        self.members = list(members)
        self.workdir = workdir
        self.token = token
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * len(self.members)
        self._killed: set[int] = set()  # members kill() stopped on purpose: wait_healthy skips them
        self._lock = threading.Lock()
        try:
            for i in range(len(self.members)):
                self._start(i, state="new")
        except BaseException:
            self.close()
            raise

    # -- where things are --------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, killed ones included (a client must cope with dead ones)."""
        return [m.client_url for m in self.members]

    def member_dir(self, i: int) -> Path:
        return self.workdir / self.members[i].name

    def log_path(self, i: int) -> Path:
        return self.member_dir(i) / "etcd.log"

    def running(self, i: int) -> bool:
        proc = self._procs[i]
        return proc is not None and proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------------
    def _command(self, member: EtcdMember, state: str) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        cmd = [
            ETCD,
            f"--name={member.name}",
            f"--data-dir={self.member_dir(self.members.index(member)) / 'data'}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.token}",
            f"--heartbeat-interval={HEARTBEAT_MS}",
            f"--election-timeout={ELECTION_MS}",
            "--pre-vote",  # a member back from a partition does not depose the leader (docs/pool.md)
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        return ([NSENTER, f"--net=/run/netns/{member.netns}"] if member.netns else []) + cmd

    def _start(self, i: int, state: str) -> None:
        member = self.members[i]
        self.member_dir(i).mkdir(parents=True, exist_ok=True)
        # etcd reads ETCD_* variables as flags: a stray one in the caller's environment must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path(i), "ab") as log:
            self._procs[i] = subprocess.Popen(
                self._command(member, state),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                preexec_fn=_arm_pdeathsig,  # only a prctl runs between fork and exec
            )

    def kill(self, i: int) -> None:
        """SIGKILL member `i` (a crash, not a clean leave: the others keep it in their membership)."""
        with self._lock:
            proc = self._procs[i]
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()
            self._killed.add(i)

    def restart(self, i: int) -> None:
        """Start a killed member again on its old data dir; it rejoins the cluster it was in."""
        self.kill(i)
        self._start(i, state="existing")
        self._killed.discard(i)

    def close(self) -> None:
        """Kill every member, wait for each, remove the data dirs (the logs stay)."""
        for i in range(len(self.members)):
            self.kill(i)
        for i in range(len(self.members)):
            shutil.rmtree(self.member_dir(i) / "data", ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- health ------------------------------------------------------------------------------------
    def _etcdctl(self, i: int, *args: str) -> subprocess.CompletedProcess[bytes] | None:
        """etcdctl ARGS against member `i` (from inside its netns); None if it hangs past 5 s."""
        member = self.members[i]
        cmd = [ETCDCTL, f"--endpoints={member.client_url}", "--dial-timeout=1s", "--command-timeout=1s", *args]
        if member.netns:
            cmd = [NSENTER, f"--net=/run/netns/{member.netns}", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        try:
            return subprocess.run(cmd, capture_output=True, env=env, timeout=5, check=False)
        except subprocess.TimeoutExpired:
            return None

    def healthy(self, i: int) -> bool:
        """Whether member `i` answers etcdctl's health check (a quorum read through it)."""
        done = self._etcdctl(i, "endpoint", "health")
        return done is not None and done.returncode == 0

    def leader(self) -> int | None:
        """The index of the running member that says it leads; None while none does (an election)."""
        for i in range(len(self.members)):
            if not self.running(i):
                continue
            done = self._etcdctl(i, "endpoint", "status", "--write-out=json")
            if done is None or done.returncode != 0:
                continue
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                status = json.loads(done.stdout)[0]["Status"]
                if status["leader"] == status["header"]["member_id"]:
                    return i
        return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every member not killed on purpose is healthy; EtcdClusterError (with its log) if one
        exits or time runs out."""
        deadline = time.monotonic() + timeout
        waiting = [i for i in range(len(self.members)) if i not in self._killed]
        pause = threading.Event()  # never set: a bounded wait between polls
        while True:
            for i in list(waiting):
                proc = self._procs[i]
                if proc is None or proc.poll() is not None:
                    raise EtcdClusterError(f"etcd member {self.members[i].name} exited: {self._log_tail(i)}")
                if self.healthy(i):
                    waiting.remove(i)
            if not waiting:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(self.members[i].name for i in waiting)
                raise EtcdClusterError(
                    f"etcd members {names} not healthy after {timeout:g} s: {self._log_tail(waiting[0])}"
                )
            pause.wait(POLL_S)

    def _log_tail(self, i: int) -> str:
        with contextlib.suppress(OSError):
            return self.log_path(i).read_text(errors="replace")[-LOG_TAIL:]
        return "(no log)"
