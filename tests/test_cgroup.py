"""Real cgroups (root): per-domain groups, Xen-style weight/cap, accounting, pinning, teardown."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimvisor.host.cgroup import (
    CgroupError,
    CgroupHost,
    DomainCgroup,
    affinity,
    cgroups_available,
    cgroups_status,
    list_groups,
    pin,
    probe,
)

_ok, _why = cgroups_status()
real = pytest.mark.skipif(not _ok, reason=f"cgroups unavailable on this host: {_why}")

THREADED = "import threading, time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(100,)).start()\n" \
    "print('ready', flush=True)\ntime.sleep(100)\n"


@pytest.fixture
def parent() -> Iterator[str]:
    """A parent group private to this test run, removed (with anything left in it) afterwards."""
    name = f"slimvisor-test-{os.getpid()}"
    yield name
    with contextlib.suppress(CgroupError):
        for g in list_groups(name):
            DomainCgroup.open(g, name).destroy()
    probe_group = DomainCgroup(probe(), "x", name)
    for d in probe_group._dirs():
        with contextlib.suppress(FileNotFoundError):
            d.parent.rmdir()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def _start(procs: list[subprocess.Popen[bytes]], *argv: str, ready: bool = False) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdout=subprocess.PIPE if ready else None)
    procs.append(p)
    if ready:
        assert p.stdout is not None
        assert p.stdout.readline().startswith(b"ready")
    return p


def _allowed_list(pid: int, tid: int) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def _raw_sched(g: DomainCgroup) -> tuple[str, ...]:
    if g.host.version == 2:
        return (g.path / "cpu.weight").read_text().strip(), (g.path / "cpu.max").read_text().strip()
    return tuple((g.path / f).read_text().strip() for f in ("cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us"))


@real
def test_probe_describes_host() -> None:
    assert cgroups_available() is True
    host = probe()
    assert host.version in (1, 2)
    assert (host.cpu / "cgroup.procs").exists()
    assert str(host.cpu) in host.describe()


@real
def test_create_add_sched_readback(parent: str, procs: list[subprocess.Popen[bytes]]) -> None:
    g = DomainCgroup.create("dom1", parent)
    assert g.path.is_dir()
    assert list_groups(parent) == ["dom1"]
    sleeper = _start(procs, "sleep", "100")
    threaded = _start(procs, sys.executable, "-c", THREADED, ready=True)
    g.add(sleeper.pid)
    g.add(threaded.pid)
    assert g.pids() == sorted([sleeper.pid, threaded.pid])
    # The whole thread group moved, not just the main thread.
    tids = os.listdir(f"/proc/{threaded.pid}/task")
    assert len(tids) == 4
    for tid in tids:
        cg = Path(f"/proc/{threaded.pid}/task/{tid}/cgroup").read_text()
        assert f"/{g.path.parent.name}/dom1" in cg

    assert g.weight() == 256 and g.cap() == 0  # defaults map to Xen's defaults
    g.set_weight(512)
    g.set_cap(50)
    assert g.weight() == 512 and g.cap() == 50
    if g.host.version == 2:
        assert _raw_sched(g) == ("200", "50000 100000")
    else:
        assert _raw_sched(g) == ("2048", "50000", "100000")
    g.set_cap(0)
    assert g.cap() == 0
    assert _raw_sched(g)[1] in ("max 100000", "-1")
    g.set_weight(65535)
    assert g.weight() == (25600 if g.host.version == 2 else 65535)  # v2 cpu.weight tops out at 10000
    g.set_weight(1)
    assert g.weight() in (1, 3)  # v2: cpu.weight 1 maps back to 2.56 -> 3

    # A restarted daemon re-attaches and sees the real state.
    again = DomainCgroup.open("dom1", parent)
    assert again.pids() == g.pids() and again.weight() == g.weight()
    mem = again.memory_bytes()
    assert mem is None or mem >= 0  # v1 does not move existing charges with the process
    with pytest.raises(CgroupError, match="no cgroup for domain 'nope'"):
        DomainCgroup.open("nope", parent)


@real
def test_bad_inputs_change_nothing(parent: str, procs: list[subprocess.Popen[bytes]]) -> None:
    g = DomainCgroup.create("dom2", parent)
    g.set_weight(512)
    g.set_cap(25)
    before = _raw_sched(g)
    with pytest.raises(ValueError, match=r"weight 0 out of range 1\.\.65535"):
        g.set_weight(0)
    with pytest.raises(ValueError, match=r"weight 70000 out of range 1\.\.65535"):
        g.set_weight(70000)
    with pytest.raises(ValueError, match=r"cap -1 out of range 0\.\.\d+ \(percent of one CPU"):
        g.set_cap(-1)
    assert _raw_sched(g) == before
    p = _start(procs, "sleep", "100")
    was = affinity(p.pid)
    with pytest.raises(ValueError, match="cpu 99 not available on this host"):
        pin([p.pid], {0, 99})
    with pytest.raises(ValueError, match="empty CPU set"):
        pin([p.pid], set())
    with pytest.raises(ValueError, match="bad cgroup name"):
        DomainCgroup.create("../escape", parent)
    assert affinity(p.pid) == was


def test_pin_all_threads(procs: list[subprocess.Popen[bytes]]) -> None:
    threaded = _start(procs, sys.executable, "-c", THREADED, ready=True)
    sleeper = _start(procs, "sleep", "100")
    cpu = min(os.sched_getaffinity(0))  # cpu 0 unless a cpuset hides it
    pin([threaded.pid, sleeper.pid], {cpu})
    assert affinity(threaded.pid) == {cpu} and affinity(sleeper.pid) == {cpu}
    for pid in (threaded.pid, sleeper.pid):
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) == (4 if pid == threaded.pid else 1)
        assert all(_allowed_list(pid, t) == str(cpu) for t in tids), pid
    everything = os.sched_getaffinity(0)
    pin([threaded.pid], everything)
    assert affinity(threaded.pid) == everything


@real
def test_cpu_usage_grows_and_cap_throttles(parent: str, procs: list[subprocess.Popen[bytes]]) -> None:
    g = DomainCgroup.create("busy", parent)
    busy = _start(procs, sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass", ready=True)
    g.add(busy.pid)
    u0 = g.cpu_usage_ns()
    assert u0 is not None
    deadline = time.monotonic() + 20  # on a loaded host the busy loop gets what it gets: wait for it
    while (u1 := g.cpu_usage_ns()) is not None and u1 - u0 < 200_000_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert u1 is not None and u1 - u0 >= 200_000_000, "the group's CPU usage does not grow"
    g.set_cap(20)
    time.sleep(0.2)  # let the first throttled period start
    u2 = g.cpu_usage_ns()
    time.sleep(1.0)
    u3 = g.cpu_usage_ns()
    assert u2 is not None and u3 is not None
    assert (u3 - u2) < 400_000_000, f"cap 20% but used {(u3 - u2) / 1e7:.0f}% of a CPU"


@real
def test_destroy_kills_escaped_tree(parent: str, procs: list[subprocess.Popen[bytes]]) -> None:
    g = DomainCgroup.create("dom3", parent)
    sleeper = _start(procs, "sleep", "100")
    threaded = _start(procs, sys.executable, "-c", THREADED, ready=True)
    # A shell that forks a grandchild and exits: the grandchild has escaped its parent, as UML does.
    script = "read x; sleep 100 >/dev/null & echo $!"
    sh = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(sh)
    for p in (sleeper, threaded, sh):
        g.add(p.pid)
    orphan = int(sh.communicate(b"go\n")[0])
    assert orphan in g.pids()
    dirs = g._dirs()
    g.destroy()
    assert sleeper.wait(5) == -9 and threaded.wait(5) == -9
    deadline = time.monotonic() + 5
    while Path(f"/proc/{orphan}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{orphan}/stat").read_text() if Path(f"/proc/{orphan}").exists() else ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            break  # dead, awaiting reaping by init
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{orphan}").exists()
    assert not any(d.exists() for d in dirs)
    assert "dom3" not in list_groups(parent)
    g.destroy()  # idempotent


def test_v2_file_formats_on_a_fake_tree(tmp_path: Path) -> None:
    """The v2 branch (this host's cgroup2 mount has no cpu controller): files and formats written."""
    root = tmp_path
    (root / "cgroup.subtree_control").write_text("")
    host = CgroupHost(2, root, root, root, root)
    slice_ = root / "sv.slice"
    slice_.mkdir()
    (slice_ / "cgroup.subtree_control").write_text("cpu")
    g = DomainCgroup.create("d", "sv", host=host)
    assert g.path == slice_ / "d" and g.path.is_dir()
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (slice_ / "cgroup.subtree_control").read_text() == "+memory"  # cpu already enabled
    for f, v in (("cpu.weight", "100"), ("cpu.max", "max 100000"), ("cgroup.procs", ""),
                 ("cpu.stat", "usage_usec 1500\nuser_usec 1000\n"), ("memory.current", "4096")):
        (g.path / f).write_text(v)
    assert g.weight() == 256 and g.cap() == 0
    g.set_weight(512)
    g.set_cap(150)
    assert (g.path / "cpu.weight").read_text() == "200"
    assert (g.path / "cpu.max").read_text() == "150000 100000"
    assert g.weight() == 512 and g.cap() == 150
    g.set_weight(65535)
    assert (g.path / "cpu.weight").read_text() == "10000"
    g.set_cap(0)
    assert (g.path / "cpu.max").read_text() == "max 100000"
    assert g.cpu_usage_ns() == 1_500_000 and g.memory_bytes() == 4096
    assert list_groups("sv", host=host) == ["d"]
    assert DomainCgroup.open("d", "sv", host=host).path == g.path
