"""Chaos: slimvisord SIGKILLed in the middle of `create`, `destroy`, `mem-set` and `cluster up`.

Each kill happens at a point inside the operation, found from what the operation leaves on the
host as it goes (the domain's run directory, its state.json, its engine's exit). Afterwards the
next command starts a new daemon that re-attaches, and the state must be consistent: `list`, the
xenstore, the domains' cgroups and run directories agree; a domain is either fully there (its
console answers) or fully gone; `destroy` of what is left works; nothing is leaked.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from slimvisor.domain.supervisor import Record
from tests.toolstack import Toolstack

BOOT_TIMEOUT = 240


def kill_daemon_during(ts: Toolstack, point: Callable[[], bool], *args: str,
                       jitter: float = 0.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run `slimvisor ARGS` against a running daemon; SIGKILL the daemon once `point()` holds
    (and a random `jitter` of up to that many seconds more), while the command still waits."""
    daemon = psutil.Process(ts.daemon_pid())
    cli = subprocess.Popen(
        [sys.executable, "-m", "slimvisor", *args], env={**os.environ, **ts.env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not point():
            assert cli.poll() is None, f"slimvisor {' '.join(args)} ended before the kill point: {cli.stderr.read()}"
            assert time.monotonic() < deadline, f"slimvisor {' '.join(args)}: kill point not reached"
            time.sleep(0.005)
        if jitter:
            time.sleep(random.uniform(0, jitter))  # a random moment after the point, not a synchronisation
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    return subprocess.CompletedProcess(cli.args, cli.returncode, out, err)


def state_json(ts: Toolstack, name: str) -> Path:
    return ts.run_dir / "domains" / name / "state.json"


def xenstore_domids(ts: Toolstack) -> dict[int, str]:
    """The domains under /local/domain in the xenstore, by domid: their name node (or "")."""
    listed = ts.sv("xenstore-ls", "/local/domain", check=False)
    if listed.returncode != 0:  # no domain ever written, or all removed with their parent
        assert "ENOENT" in listed.stderr, listed.stderr
        return {}
    out = listed.stdout
    found: dict[int, str] = {}
    domid = None
    for line in out.splitlines():
        if m := re.match(r"^(\d+) = ", line):
            domid = int(m[1])
            found[domid] = ""
        elif domid is not None and (m := re.match(r"^ name = \"(.*)\"$", line)):
            found[domid] = m[1]
    found.pop(0, None)
    return found


def check_consistent(ts: Toolstack, names: list[str]) -> dict[str, dict[str, Any]]:
    """The new daemon's view agrees with the host's: every domain of `names` is fully there and
    usable, or fully gone. Returns the rows of those that are there."""
    for name in names:  # one that was being destroyed when the daemon died finishes going
        ts.wait_state(name, ("running", "blocked", "paused", "gone"), timeout=60)
    rows = {n: r for n, r in ts.domains().items() if n in names}
    rundirs = {d.name for d in (ts.run_dir / "domains").iterdir()} if (ts.run_dir / "domains").exists() else set()
    assert rundirs == set(rows), f"run dirs {rundirs} but listed {set(rows)}"
    assert xenstore_domids(ts) == {r["domid"]: n for n, r in rows.items()}, ts.sv("xenstore-ls", "/").stdout
    from slimvisor.host.cgroup import cgroups_available

    if cgroups_available():
        assert set(ts.cgroups()) == set(rows), f"cgroups {ts.cgroups()} but listed {set(rows)}"
    for name, row in rows.items():
        assert Record.load(state_json(ts, name)).domid == row["domid"]
        target = ts.sv("xenstore-read", f"/local/domain/{row['domid']}/memory/target").stdout.strip()
        assert int(target) == row["memory_mib"] * 1024, f"{name}: xenstore memory/target {target} KiB, listed {row}"
        console = ts.console(name)
        try:
            console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
            assert console.run("echo $((6 * 7))").strip() == "42"
        finally:
            console.kill()
    for name in set(names) - set(rows):  # leftovers() names every run dir: those listed are not left over
        left = [x for x in ts.leftovers([name]) if not any(x.endswith(f"/domains/{r}") for r in rows)]
        assert left == [], name
    return rows


def destroy_all(ts: Toolstack, names: list[str]) -> None:
    for name in ts.domains():
        if name in names:
            ts.sv("destroy", name)
    assert not set(names) & set(ts.domains())
    assert ts.leftovers(names) == []
    assert xenstore_domids(ts) == {}


def test_starting_lock(tmp_path: Path) -> None:
    """A run dir whose creator still holds its starting lock is waited for; once it is let go (its
    holder closed it, or died), not."""
    from slimvisor.domain.supervisor import hold_starting, wait_started

    fd = hold_starting(tmp_path)
    t0 = time.monotonic()
    wait_started(tmp_path, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    os.close(fd)
    t0 = time.monotonic()
    wait_started(tmp_path, timeout=30)
    assert time.monotonic() - t0 < 5
    wait_started(tmp_path / "none")  # no lock at all: nothing to wait for


@pytest.mark.guest
def test_daemon_killed_during_create_mem_set_destroy(toolstack: Toolstack, rootfs: Path, domname: str,
                                                    tmp_path: Path) -> None:  # fmt: skip
    ts = toolstack
    early, rand, late = f"{domname}e", f"{domname}r", f"{domname}l"
    # create, killed as soon as the run directory exists (before or while the supervisor forks)
    cfg = ts.config(tmp_path / "e.cfg", early, rootfs)
    killed = kill_daemon_during(ts, lambda: (ts.run_dir / "domains" / early).exists(), "create", str(cfg))
    assert killed.returncode != 0, killed.stderr
    check_consistent(ts, [early])
    destroy_all(ts, [early])
    # create, killed at a random moment after that; then destroy, killed at a random moment too
    # (perhaps before the request reached the daemon: the command then starts a new one)
    cfg = ts.config(tmp_path / "r.cfg", rand, rootfs)
    kill_daemon_during(ts, lambda: (ts.run_dir / "domains" / rand).exists(), "create", str(cfg), jitter=1.0)
    if rand in check_consistent(ts, [rand]):
        kill_daemon_during(ts, lambda: True, "destroy", rand, jitter=1.0)
        check_consistent(ts, [rand])
    destroy_all(ts, [rand])
    # create, killed once the domain's supervisor runs (it opened the console log and is booting the
    # domain): from then on the domain is the supervisor's, and it must live on under the next daemon
    cfg = ts.config(tmp_path / "l.cfg", late, rootfs, "maxmem = 96")
    killed = kill_daemon_during(ts, lambda: (ts.log_dir / f"{late}.console.log").exists(), "create", str(cfg))
    assert killed.returncode != 0, killed.stderr
    assert late in check_consistent(ts, [late])
    # mem-set, killed once the supervisor took the new target (the daemon then writes the xenstore)
    killed = kill_daemon_during(ts, lambda: Record.load(state_json(ts, late)).memory_mib == 80,
                                "mem-set", late, "80m")  # fmt: skip
    rows = check_consistent(ts, [late])
    assert rows[late]["memory_mib"] == 80
    # destroy, killed once the domain's engine is gone (the daemon waits for its supervisor to finish)
    engine = psutil.Process(int(ts.domain_info(late)["pids"][0]))
    killed = kill_daemon_during(ts, lambda: not engine.is_running(), "destroy", late)
    assert killed.returncode != 0, killed.stderr
    check_consistent(ts, [late])
    destroy_all(ts, [late])
    assert ts.leftovers([early, rand, late]) == []


@pytest.mark.guest
def test_daemon_killed_during_cluster_up(toolstack: Toolstack) -> None:
    ts = toolstack
    nodes = ["cn1", "cn2"]
    # killed while it creates the second node (the first is up, its cluster records written)
    killed = kill_daemon_during(ts, lambda: (ts.run_dir / "domains" / "cn2").exists(),
                                "cluster", "up", "2", "--name", "chaos", "--prefix", "cn")  # fmt: skip
    assert killed.returncode != 0, killed.stderr
    check_consistent(ts, nodes)
    assert [c["name"] for c in ts.json("cluster", "list")] == ["chaos"]
    ts.sv("cluster", "down", "chaos")
    assert ts.json("cluster", "list") == []
    assert not (ts.root / "state" / "clusters" / "chaos").exists()
    assert ts.leftovers(nodes) == []
    assert xenstore_domids(ts) == {}
    assert ts.sv("xenstore-ls", "/tool/slimvisor/cluster", check=False).stdout.strip() == ""
