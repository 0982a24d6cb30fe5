"""Several "hosts" on one machine for the pool tests: network namespaces on one bridge, each with a slimvisord.

`pool_hosts(n)` makes a Linux bridge in the root netns and n network namespaces `svh<k>-<i>`, each
with a veth (`eth0` inside, the underlay) into the bridge and the address 10.240.<k>.<i>/24; the
bridge has no address, so the hosts reach each other and nothing of the root netns. Each host is a
`NetnsToolstack`: a tests.toolstack.Toolstack (private run, state and log trees) whose every command
runs inside the host's netns, and so does the daemon the first command autostarts and everything
that daemon starts (supervisors, switches and their TAPs, backends). Each host also has a UTS
namespace of its own (kept in /run/svh<k>/<i>) whose host name is its name, so what a daemon says
its host is (`slimvisor info`'s "host", a migration's "from") tells the hosts apart.

Only the network and UTS namespaces are switched (`nsenter --net --uts`): `ip netns exec` also
makes a mount namespace and remounts /sys, which hides the cgroup v1 hierarchies under
/sys/fs/cgroup from the daemon. So the hosts share the file system, the uid leases
(slimvisor.jail.uids) and the cgroup tree (each toolstack has a parent group of its own); only
addresses, ports, links, abstract Unix sockets and the host name are per host.

On a machine where br_netfilter is loaded with bridge-nf-call-iptables=1 (the module's default),
frames crossing the bridge go through the root netns's iptables FORWARD chain: a DROP policy there
(Docker sets one) cuts the hosts off from each other; the test of the harness says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimvisor.host import procs
from slimvisor.toolstack.peers import PEER_PORT  # the pool link between the daemons
from tests.toolstack import Toolstack

SUBNET = "10.240.{k}.0/24"  # the underlay of run k (docs: pool-design.md; never anything else)
UNDERLAY = "eth0"  # each host's veth into the bridge, inside its netns
ETCD_PORT = 2379  # etcd's client port (its default); fixed, since every host has its own netns
ETCD_PEER_PORT = 2380  # etcd's peer port (its default)


class NetnsToolstack(Toolstack):
    """A slimvisord of its own inside network namespace `netns`, as pool host `name` at `address`."""

    def __init__(self, name: str, netns: str, address: str, uts: Path) -> None:
        super().__init__()
        self.name = name
        self.netns = netns
        self.port = f"{netns}b"  # its veth's end in the root netns, on the bridge
        self.uts = uts  # its UTS namespace, whose host name is `name`
        self.address = address  # on UNDERLAY, a /24
        self.etcd_port = ETCD_PORT
        self.etcd_peer_port = ETCD_PEER_PORT
        self.peer_port = PEER_PORT

    @property
    def etcd_url(self) -> str:
        """Where an etcd member of this host serves clients (when the test started one with `popen`)."""
        return f"http://{self.address}:{self.etcd_port}"

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespaces (nsenter execs it: the process started is argv's own)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--uts={self.uts}", *argv]

    def command(self, *args: str) -> list[str]:
        return self.wrap(super().command(*args))

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Any command inside this host's netns (ping, ip, ...), with this host's SLIMVISOR_* trees in
        its environment; with `check`, a non-zero exit fails the test showing its output."""
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.run(self.wrap(list(argv)), capture_output=True, text=True, timeout=timeout, env=env, **kw)
        if check:
            shown = f"{self.name}: {' '.join(argv)}: exit {proc.returncode}"
            assert proc.returncode == 0, f"{shown}\n{proc.stdout}{proc.stderr}"
        return proc

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """A long-running process inside this host's netns (an etcd member, a listener); its pid is
        argv's own, though it enters the netns (nsenter, then exec) a moment after this returns.
        The caller stops it: pool_hosts' teardown fails on any process left in the netns."""
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        return subprocess.Popen(self.wrap(list(argv)), env=env, **kw)

    def unplug(self) -> None:
        """Cut this host off the underlay (a partition or a dead NIC, as the others see it): its
        veth's bridge end goes down, which nothing inside the host can undo."""
        _ip("link", "set", self.port, "down")

    def plug(self) -> None:
        """Join this host to the underlay again after `unplug`."""
        _ip("link", "set", self.port, "up")

    def netns_inode(self) -> int:
        """The inode of this host's network namespace, as /proc/PID/ns/net of its processes shows it."""
        return os.stat(f"/run/netns/{self.netns}").st_ino

    def processes(self) -> list[int]:
        """The pids of every process now in this host's network namespace."""
        ino = self.netns_inode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                        pids.append(int(entry))
        return pids


def host_name(i: int) -> str:
    return f"host{chr(ord('A') + i)}"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}"
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", *args, check=check)


def _claim(n: int, mtu: int) -> int:
    """Make this run's bridge `svhb<k>` for the first free k (the kernel refuses a second link of a name,
    so the bridge is the claim: parallel runs get different k); returns k."""
    start = os.getpid() % 254
    for step in range(254):
        k = (start + step) % 254 + 1
        if os.path.exists(f"/run/svh{k}") or any(os.path.exists(f"/run/netns/svh{k}-{i}") for i in range(1, n + 1)):
            continue  # left by a run that died: not ours to remove
        made = _ip("link", "add", f"svhb{k}", "mtu", str(mtu), "type", "bridge", check=False)
        if made.returncode == 0:
            return k
        if "exists" not in made.stderr:
            raise AssertionError(f"pool hosts' bridge svhb{k} (MTU {mtu}): {made.stderr.strip()}")
    raise AssertionError("no free 10.240.<k>.0/24 for pool hosts: svhb1..svhb254 all exist")


@contextmanager
def pool_hosts(n: int = 3, mtu: int = 1600) -> Iterator[list[NetnsToolstack]]:
    """n hosts (hostA, hostB, ...) on one underlay of MTU `mtu`; on exit every host's toolstack is
    closed (failing on its leftovers), any process still in a host's netns fails the run (and is
    killed), and the namespaces, veths and bridge are deleted, whatever happened."""
    assert 1 <= n <= 26, n
    k = _claim(n, mtu)
    bridge, utsdir = f"svhb{k}", Path(f"/run/svh{k}")
    hosts: list[NetnsToolstack] = []
    made: list[str] = []
    problems: list[str] = []
    try:
        utsdir.mkdir()
        for i in range(1, n + 1):
            ns, uts = f"svh{k}-{i}", utsdir / str(i)
            uts.touch()
            _run("unshare", f"--uts={uts}", "hostname", host_name(i - 1))  # bind-mounts the namespace on `uts`
            _ip("netns", "add", ns)
            made.append(ns)
            host = NetnsToolstack(host_name(i - 1), ns, f"10.240.{k}.{i}", uts)
            hosts.append(host)
            _ip("link", "add", host.port, "mtu", str(mtu), "type", "veth", "peer", "name", UNDERLAY, "mtu", str(mtu),
                "netns", ns)  # fmt: skip
            _ip("link", "set", host.port, "master", bridge, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", UNDERLAY)
            _ip("-n", ns, "link", "set", UNDERLAY, "up")
        _ip("link", "set", bridge, "mtu", str(mtu), "up")
        yield hosts
    finally:
        for host in hosts:
            try:
                host.close()
            except AssertionError as e:
                problems.append(str(e))
        for host in hosts:
            if stray := host.processes():
                described = ", ".join(f"{pid} ({procs.title(pid)})" for pid in stray)
                problems.append(f"{host.name}: processes still in netns {host.netns}: {described}")
                for pid in stray:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for ns in made:
            deleted = _ip("netns", "del", ns, check=False)  # its end of the veth goes with it, and so the pair
            if deleted.returncode != 0:
                problems.append(f"ip netns del {ns}: {deleted.stderr.strip()}")
        for i in range(1, n + 1):
            _ip("link", "del", f"svh{k}-{i}b", check=False)  # gone already unless the netns was not made
            if (uts := utsdir / str(i)).exists():
                if os.path.ismount(uts) and (unmounted := _run("umount", str(uts), check=False)).returncode != 0:
                    problems.append(f"umount {uts}: {unmounted.stderr.strip()}")
                    continue
                uts.unlink()
        try:
            utsdir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(f"{utsdir}: {e}")
        removed = _ip("link", "del", bridge, check=False)
        if removed.returncode != 0:
            problems.append(f"ip link del {bridge}: {removed.stderr.strip()}")
        if problems:  # raised here, so a failure of the body shows too (as this one's context)
            raise AssertionError("pool hosts left something behind their teardown:\n" + "\n".join(problems))
