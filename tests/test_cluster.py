"""`slimvisor cluster up 4`: four real UML nodes on one switch, talking by name; `cluster down` clears all."""

from __future__ import annotations

import re
import time

import pytest

from slimvisor.testing.expect import ConsoleSession
from tests.toolstack import Toolstack

pytestmark = pytest.mark.guest

NODES = [f"node{k}" for k in range(1, 5)]


def _wait_up(toolstack: Toolstack, node: str, timeout: float = 90) -> None:
    log = toolstack.log_dir / f"{node}.console.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and f"slimvisor: {node} is up" in log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{node} not up:\n{log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.2)


def test_cluster_of_four(toolstack: Toolstack) -> None:
    out = toolstack.sv("cluster", "up", "4", "--name", "lab").stdout
    assert out.split() == [w for k in range(1, 5) for w in (f"node{k}", f"10.77.0.{k}")]
    assert [d for d in toolstack.domains()] == NODES
    overlays = sorted((toolstack.root / "state" / "clusters" / "lab").iterdir())
    assert [p.name for p in overlays] == [f"{n}.overlay" for n in NODES]
    assert toolstack.sv("xenstore-read", "/tool/slimvisor/cluster/lab/node3/ip").stdout.strip() == "10.77.0.3"
    consoles: dict[str, ConsoleSession] = {}
    try:
        for node in NODES:
            _wait_up(toolstack, node)
            consoles[node] = toolstack.console(node)
        for node, console in consoles.items():
            console.expect(f"slimvisor: {node} is up")
            assert console.run("xenstore-read attr/ip").strip() == f"10.77.0.{node[-1]}"
            for other in NODES:
                console.run(f"ping -c 1 -W 5 {other} > /dev/null")
                assert console.last_status == 0, f"{node} cannot ping {other}"
        receiver = consoles["node1"]
        for k in (2, 3, 4):
            receiver.send(f"socat -u TCP-LISTEN:{5000 + k},reuseaddr OPEN:/tmp/from{k},creat,trunc &")
        time.sleep(0.5)
        sent = {}
        for k in (2, 3, 4):
            sender = consoles[f"node{k}"]
            sender.run("dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null")
            sent[k] = sender.run("md5sum /tmp/blob").split()[0]
            sender.run(f"socat -u OPEN:/tmp/blob TCP:node1:{5000 + k}")
            assert sender.last_status == 0
        for k in (2, 3, 4):
            deadline = time.monotonic() + 30
            while (got := receiver.run(f"md5sum /tmp/from{k}").split()[0]) != sent[k]:
                assert time.monotonic() < deadline, f"node{k}'s file arrived as {got}, sent {sent[k]}"
                time.sleep(0.5)
        assert re.fullmatch(r"[0-9a-f]{32}", sent[2]) and len(set(sent.values())) == 3
    finally:
        for console in consoles.values():
            console.kill()
    # The daemon stops while the cluster runs: the next command starts another (the cluster's switch,
    # which the daemon forked, must not keep its lock), and that one finds every node again.
    old = toolstack.daemon_pid()
    assert toolstack.sv("daemon", "stop").stderr == f"slimvisord (pid {old}) stopped\n"
    assert list(toolstack.domains()) == NODES
    assert toolstack.daemon_pid() != old
    down = toolstack.sv("cluster", "down", "lab")
    assert "4 nodes destroyed" in down.stderr
    assert toolstack.domains() == {}
    assert toolstack.leftovers(NODES) == []
    assert not (toolstack.root / "state" / "clusters" / "lab").exists()
    assert not (toolstack.run_dir / "switch" / "lab").exists()
    assert toolstack.sv("cluster", "list", "--json").stdout.strip() == "[]"
