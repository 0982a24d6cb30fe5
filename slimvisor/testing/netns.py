"""Several "hosts" on one machine: network namespaces on one Linux bridge (the pool's tests and bench).

`underlay(n)` makes a Linux bridge `svhb<k>` in the root netns and n network namespaces
`svh<k>-<i>`, each with a veth (`eth0` inside, the underlay) into the bridge and the address
10.240.<k>.<i>/24; the bridge has no address, so the hosts reach each other and nothing of the
root netns. Each host also has a UTS namespace of its own (kept in /run/svh<k>/<i>) whose host
name is its name (hostA, hostB, ...). A `NetnsHost` runs a command inside its namespaces with
`nsenter --net --uts`: `ip netns exec` also makes a mount namespace and remounts /sys, which hides
the cgroup v1 hierarchies under /sys/fs/cgroup from a slimvisord started there.

On leaving, any process still in a host's netns is a problem (named, then killed), and the
namespaces, veths, UTS files and bridge are removed whatever happened; the problems are raised
together as one AssertionError after everything is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slimvisor.host import procs
from slimvisor.testing.etcd import EtcdMember

SUBNET = "10.240.{k}.0/24"  # the underlay of run k (never anything else)
UNDERLAY = "eth0"  # each host's veth into the bridge, inside its netns
ETCD_PORT = 2379  # etcd's client port (its default); fixed, since every host has its own netns


@dataclass(frozen=True)
class NetnsHost:
    """One "host": network namespace `netns` (under /run/netns), UTS namespace `uts`, `address` on UNDERLAY."""

    name: str
    netns: str
    address: str  # on UNDERLAY, a /24
    uts: Path  # its UTS namespace, whose host name is `name`

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespaces (nsenter execs it: the process started is argv's own)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--uts={self.uts}", *argv]

    @property
    def port(self) -> str:
        """Its veth's end in the root netns, on the bridge."""
        return f"{self.netns}b"

    def unplug(self) -> None:
        """Cut this host off the underlay (a partition or a dead NIC, as the others see it): its
        veth's bridge end goes down, which nothing inside the host can undo."""
        _ip("link", "set", self.port, "down")

    def plug(self) -> None:
        """Join this host to the underlay again after `unplug`."""
        _ip("link", "set", self.port, "up")

    @property
    def etcd_url(self) -> str:
        """Where this host's member of `etcd_members` serves clients."""
        return f"http://{self.address}:{ETCD_PORT}"

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


def etcd_members(hosts: Sequence[NetnsHost]) -> list[EtcdMember]:
    """An etcd member in each host's netns, on its address (for slimvisor.testing.etcd.EtcdCluster)."""
    return [EtcdMember(f"etcd{h.name}", address=h.address, client_port=ETCD_PORT, netns=h.netns) for h in hosts]


def pool_commands(hosts: Sequence[NetnsHost], ttl: int) -> list[list[str]]:
    """The `slimvisor` arguments that make `hosts` one pool, each host's own, in order: `pool init` on
    the first, `pool join` on the others, each through its own etcd member, with a lease of `ttl` s."""
    return [["pool", "join" if i else "init", "--etcd", h.etcd_url, "--name", h.name, "--ttl", str(ttl)]
            for i, h in enumerate(hosts)]  # fmt: skip


def host_name(i: int) -> str:
    return f"host{chr(ord('A') + i)}"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
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
def underlay(n: int = 3, mtu: int = 1600) -> Iterator[list[NetnsHost]]:
    """n hosts (hostA, hostB, ...) on one underlay of MTU `mtu`; everything goes on exit (module doc)."""
    assert 1 <= n <= 26, n
    k = _claim(n, mtu)
    bridge, utsdir = f"svhb{k}", Path(f"/run/svh{k}")
    hosts: list[NetnsHost] = []
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
            host = NetnsHost(host_name(i - 1), ns, f"10.240.{k}.{i}", uts)
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
            _ip("link", "del", f"svh{k}-{i}b", check=False)  # a host's port: gone already unless its netns was not made
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
