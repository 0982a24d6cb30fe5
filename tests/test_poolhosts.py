"""The pool tests' harness (tests/poolhosts.py): hosts as network namespaces, each with its own slimvisord."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from slimvisor.jail import uid_range
from slimvisor.testing.expect import ConsoleSession
from tests.poolhosts import UNDERLAY, NetnsToolstack, pool_hosts
from tests.test_toolstack import boot, destroy_and_check, uml_proc, wait_for

ROOT_NETNS = os.stat("/proc/self/ns/net").st_ino


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def links() -> set[str]:
    """The names of the root netns's links."""
    return {link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                                   text=True, check=True).stdout)}  # fmt: skip


def assert_gone(hosts: list[NetnsToolstack], names: set[str], pids: list[int]) -> None:
    """After pool_hosts: no netns, veth or bridge of the run, no process of it, no host tree."""
    netns = {h.netns for h in hosts}
    assert not netns & set(os.listdir("/run/netns")), netns
    assert not names & links(), names
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not [h.root for h in hosts if h.root.exists()]
    assert not [h.uts for h in hosts if h.uts.parent.exists()]


def run_names(hosts: list[NetnsToolstack]) -> set[str]:
    """The root netns links of a run: its bridge and the hosts' ends of their veths."""
    k = hosts[0].netns.removeprefix("svh").split("-")[0]
    return {f"svhb{k}", *(h.port for h in hosts)}


def test_hosts_reach_each_other_over_the_underlay_and_nothing_of_the_root_netns() -> None:
    root_listener = socket.create_server(("127.0.0.1", 0))  # the root netns's loopback: no host reaches it
    roots = [a["local"] for link in json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True,
                                                                text=True, check=True).stdout)
             for a in link["addr_info"] if not a["local"].startswith("127.")]  # fmt: skip
    with root_listener, pool_hosts(3) as hosts:
        assert [h.name for h in hosts] == ["hostA", "hostB", "hostC"]
        a, b, c = hosts
        k = a.address.split(".")[2]
        assert [h.address for h in hosts] == [f"10.240.{k}.{i}" for i in (1, 2, 3)]
        assert len({h.netns_inode() for h in hosts} | {ROOT_NETNS}) == 4
        names = run_names(hosts)
        assert names <= links()
        assert [h.run("hostname").stdout.strip() for h in hosts] == ["hostA", "hostB", "hostC"]
        assert len({os.stat(h.uts).st_ino for h in hosts} | {os.stat("/proc/self/ns/uts").st_ino}) == 4
        for host in hosts:
            shown = json.loads(host.run("ip", "-j", "addr", "show", UNDERLAY).stdout)[0]
            assert shown["mtu"] == 1600 and shown["operstate"] == "UP"
            assert [x["local"] for x in shown["addr_info"] if x["family"] == "inet"] == [host.address]
            routes = json.loads(host.run("ip", "-j", "-4", "route").stdout)
            assert [r["dst"] for r in routes] == [f"10.240.{k}.0/24"]  # no default route: only the underlay
        # Each host reaches the others, with whole 1600-byte frames (the VXLAN underlay's MTU)
        for src in hosts:
            for dst in hosts:
                if dst is not src:
                    src.run("ping", "-c", "1", "-W", "5", "-M", "do", "-s", str(1600 - 28), dst.address)
        too_big = a.run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", str(1601 - 28), b.address, check=False)
        assert too_big.returncode != 0 and "message too long" in too_big.stderr + too_big.stdout
        # ... and nothing of the root netns: neither its addresses nor its loopback
        for address in roots:
            unreachable = a.run("ping", "-c", "1", "-W", "1", address, check=False)
            assert unreachable.returncode != 0, f"{a.name} reached the root netns's {address}"
        port = root_listener.getsockname()[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        refused = c.run(sys.executable, "-c", probe, check=False)
        assert "ConnectionRefusedError" in refused.stderr, refused.stderr
        # A host unplugged is cut off until plugged again; the others still meet
        b.unplug()
        assert a.run("ping", "-c", "1", "-W", "1", b.address, check=False).returncode != 0
        assert b.run("ping", "-c", "1", "-W", "1", c.address, check=False).returncode != 0
        a.run("ping", "-c", "1", "-W", "5", c.address)
        b.plug()
        a.run("ping", "-c", "1", "-W", "5", b.address)
        # A process left in a host's netns is found by the teardown
        assert a.processes() == [] and c.processes() == []
        sleeper = c.popen("sleep", "600")  # nsenter, then (same pid) sleep once it has entered the netns
        assert wait_for(lambda: c.processes(), 10, "the process in hostC's netns") == [sleeper.pid]
        sleeper.terminate()
        sleeper.wait(10)
    assert_gone(hosts, names, [])


def test_teardown_fails_on_a_process_left_in_a_host_and_still_removes_everything() -> None:
    leftover = r"hostA: processes still in netns svh\d+-1: \d+ \(sleep 600\)$"
    with pytest.raises(AssertionError, match=leftover), pool_hosts(1) as hosts:
        left = hosts[0].popen("sleep", "600")
        wait_for(lambda: hosts[0].processes() == [left.pid], 10, "the process in hostA's netns")
        names = run_names(hosts)
    assert left.wait(10) == -9  # killed by the teardown
    assert_gone(hosts, names, [left.pid])


def test_a_bad_mtu_is_refused_leaving_nothing() -> None:
    refused = r"pool hosts' bridge svhb(\d+) \(MTU 30\): Error: mtu less than device minimum"
    with pytest.raises(AssertionError, match=refused) as failed, pool_hosts(2, mtu=30):
        raise AssertionError("not reached")
    m = re.search(refused, str(failed.value))
    assert m is not None
    k = m.group(1)
    assert f"svhb{k}" not in links() and not Path(f"/run/svh{k}").exists()
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"svh{k}-")]


@pytest.mark.guest
def test_a_pv_domain_boots_inside_host_b(rootfs: Path, domname: str, tmp_path: Path,
                                         consoles: list[ConsoleSession]) -> None:  # fmt: skip
    with pool_hosts(2) as hosts:
        a, b = hosts
        names = run_names(hosts)
        consoles.append(console := boot(b, b.config(tmp_path / "d.cfg", domname, rootfs), domname))
        assert console.run("echo $((6 * 7))").strip() == "42"
        assert console.run("xenstore-read name").strip() == domname  # host B's xenstore, through its daemon
        daemon = b.daemon_pid()
        info = b.domain_info(domname)
        assert netns_of(daemon) == netns_of(info["supervisor"]) == b.netns_inode() != ROOT_NETNS
        assert a.record_daemon() is None  # host A's daemon was never started: B's commands went to B's
        assert b.json("info")["host"] == "hostB"  # the daemon knows which host it is
        # its cgroup: the domain's group under host B's parent, holding the engine
        uml = uml_proc(b, domname)
        assert domname in b.cgroups()
        held = {int(pid) for d in b.cgroup_dirs(domname) for top, _, _ in os.walk(d)
                for pid in Path(top, "cgroup.procs").read_text().split()}  # fmt: skip
        assert uml.pid in held
        # its jail: an unprivileged uid of the range, seccomp'd, in a netns of its own (not even host B's)
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{uml.pid}/status").read_text().splitlines())
        assert uml.uids().real >= uid_range()[0] and status["Seccomp"].strip() == "2"
        assert int(status["CapEff"], 16) == 0
        assert netns_of(uml.pid) not in (b.netns_inode(), ROOT_NETNS)
        pids = [daemon, info["supervisor"], *info["pids"]]
        destroy_and_check(b, domname)
    assert_gone(hosts, names, pids)


@pytest.mark.guest
def test_two_hosts_run_domains_of_one_name(rootfs: Path, domname: str, tmp_path: Path,
                                           consoles: list[ConsoleSession]) -> None:  # fmt: skip
    """Until the pool exists, names are per host: hostA's and hostB's domain of one name are two domains."""
    other = tmp_path / "other.ext4"
    other.write_bytes(rootfs.read_bytes())
    with pool_hosts(2) as hosts:
        a, b = hosts
        consoles.append(on_a := boot(a, a.config(tmp_path / "a.cfg", domname, rootfs), domname))
        consoles.append(on_b := boot(b, b.config(tmp_path / "b.cfg", domname, other), domname))
        on_a.run("echo from-a > /marker")
        on_b.run("echo from-b > /marker")
        assert on_a.run("cat /marker").strip() == "from-a" and on_b.run("cat /marker").strip() == "from-b"
        assert a.daemon_pid() != b.daemon_pid()
        assert list(a.domains()) == [domname] == list(b.domains())
        assert a.domains()[domname]["uuid"] != b.domains()[domname]["uuid"]
        destroy_and_check(a, domname)
        assert list(b.domains()) == [domname]
        assert on_b.run("cat /marker").strip() == "from-b"  # B's still runs


@pytest.mark.guest
def test_a_switch_uplink_tap_is_in_its_host(rootfs: Path, domname: str, tmp_path: Path,
                                            consoles: list[ConsoleSession]) -> None:  # fmt: skip
    """A switch started on host A has its TAP in host A's netns: host A (only) reaches a domain on it."""
    tap = f"svt{os.getpid() % 100000}"
    with pool_hosts(2) as [a, b]:
        started = a.sv("switch", "start", "swpool", "--uplink", tap)
        assert f"uplink {tap}" in started.stdout
        try:
            shown = json.loads(a.run("ip", "-j", "link", "show", tap).stdout)
            assert shown[0]["ifname"] == tap
            assert tap not in links() and b.run("ip", "link", "show", tap, check=False).returncode != 0
            pid = next(s["pid"] for s in a.json("switch", "list") if s["name"] == "swpool")
            assert netns_of(pid) == a.netns_inode()
            a.run("ip", "addr", "add", "10.9.7.1/24", "dev", tap)
            vif = ["vif = ['bridge=swpool']", 'extra = "sv.ip=10.9.7.2/24"']
            cfg = a.config(tmp_path / "d.cfg", domname, rootfs, *vif)
            consoles.append(console := boot(a, cfg, domname))
            a.run("ping", "-c", "2", "-W", "5", "10.9.7.2")
            assert "0% packet loss" in console.run("ping -c 2 -W 5 10.9.7.1")
            unrouted = subprocess.run(["ip", "route", "get", "10.9.7.2"], capture_output=True, text=True)
            assert tap not in unrouted.stdout  # the root netns has no way to the domain's switch
            destroy_and_check(a, domname)
        finally:
            a.sv("switch", "stop", "swpool")
        assert a.run("ip", "link", "show", tap, check=False).returncode != 0
