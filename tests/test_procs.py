"""The processes of a run tree, found without command lines or environments (slimvisor.host.procs),
and the teardown check built on them (tests/leaks.py, Toolstack.close)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimvisor.host import procs
from tests import leaks
from tests.toolstack import Toolstack

# Prints "ready" once it holds what it was told to: a deleted open file, or a bound Unix socket.
HOLDER = """
import os, socket, sys
kind, path = sys.argv[1], sys.argv[2]
if kind == "file":
    held = open(path, "w")
    os.unlink(path)
else:
    held = socket.socket(socket.AF_UNIX)
    held.bind(path)
    held.listen()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[str]]]:
    """Start processes for a test; whatever is left of them is killed and reaped after it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.returncode is None:  # not reaped yet, so its pid is still its group's and no one else's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the group: a shell's child too
        p.wait(10)


def _start(started: list[subprocess.Popen[str]], argv: list[str], cwd: Path | str = "/") -> subprocess.Popen[str]:
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    started.append(p)
    if argv[0] == sys.executable:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


def test_members_by_cwd_deleted_file_socket_record_and_descent(tmp_path: Path,
                                                              spawn: list[subprocess.Popen[str]]) -> None:  # fmt: skip
    tree = tmp_path / "tree"
    tree.mkdir()
    in_cwd = _start(spawn, ["sleep", "600"], cwd=tree)
    deleted = _start(spawn, [sys.executable, "-c", HOLDER, "file", str(tree / "lock")])
    bound = _start(spawn, [sys.executable, "-c", HOLDER, "socket", str(tree / "api.sock")])
    parent = _start(spawn, ["sh", "-c", "sleep 600 & wait"])
    other = _start(spawn, ["sleep", "600"])

    found = procs.members([f"{tree}/"])
    assert found.get(in_cwd.pid) == f"cwd {tree}"
    assert found.get(deleted.pid) == f"open file {tree}/lock (deleted)"
    assert found.get(bound.pid) == f"socket {tree}/api.sock"
    assert parent.pid not in found and other.pid not in found

    ident = procs.process_id(parent.pid)
    assert ident is not None
    by_pid = procs.members([], [ident])
    assert by_pid[parent.pid] == "recorded"
    [child] = [pid for pid, why in by_pid.items() if why == f"child of {parent.pid}"]
    assert set(by_pid) == {parent.pid, child}
    assert procs.members([], [(parent.pid, ident[1] + 1)]) == {}  # the same pid, another process: not it

    assert procs.kill([in_cwd.pid, deleted.pid]) == []  # returns once they have exited
    assert in_cwd.wait(10) == deleted.wait(10) == -signal.SIGKILL
    assert set(procs.members([f"{tree}/"])) == {bound.pid}


def test_members_by_a_socket_in_another_network_namespace(tmp_path: Path,
                                                          spawn: list[subprocess.Popen[str]]) -> None:  # fmt: skip
    """A daemon in a netns of its own (a pool test's "host") is known by its socket too: its Unix
    sockets are in its namespace's table, not in the one this process's /proc/net/unix shows."""
    bound = _start(spawn, ["unshare", "--net", sys.executable, "-c", HOLDER, "socket", str(tmp_path / "api.sock")])
    assert bound.stdout is not None and bound.stdout.readline() == "ready\n"
    assert os.stat(f"/proc/{bound.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert str(tmp_path / "api.sock") not in Path("/proc/net/unix").read_text()
    assert procs.members([f"{tmp_path}/"]) == {bound.pid: f"socket {tmp_path}/api.sock"}


def test_wait_gone_waits_for_the_exit(spawn: list[subprocess.Popen[str]]) -> None:
    p = _start(spawn, ["sleep", "600"])
    assert procs.wait_gone([p.pid], 0.2) == [p.pid]
    p.terminate()
    assert procs.wait_gone([p.pid], 30) == []
    assert p.wait(10) == -signal.SIGTERM


def test_toolstack_teardown_fails_when_a_process_of_its_tree_survives(spawn: list[subprocess.Popen[str]]) -> None:
    ts = Toolstack()
    ts.settle = 0.5
    ts.run_dir.mkdir(parents=True)
    stray = _start(spawn, ["sleep", "600"], cwd=ts.run_dir)
    with pytest.raises(AssertionError, match=rf"pid {stray.pid} \(sleep 600\): cwd {ts.run_dir}"):
        ts.close()
    assert stray.wait(10) == -signal.SIGKILL  # killed, so that it does not outlive the test either
    assert not ts.root.exists()
    assert leaks.survivors([f"{ts.root}/"], settle=0) == {}
