"""Several "hosts" on one machine for the pool tests: network namespaces on one bridge, each with a slimvisord.

`pool_hosts(n)` makes n hosts on one underlay (slimvisor.testing.netns: a Linux bridge in the root
netns, n network namespaces `svh<k>-<i>` with a veth each and the address 10.240.<k>.<i>/24, and a
UTS namespace per host whose host name is its name). Each host is a `NetnsToolstack`: a
tests.toolstack.Toolstack (private run, state and log trees) whose every command runs inside the
host's netns, and so does the daemon the first command autostarts and everything that daemon
starts (supervisors, switches and their TAPs, backends). What a daemon says its host is (`slimvisor
info`'s "host", a migration's "from") tells the hosts apart.

Only the network and UTS namespaces are switched, so the hosts share the file system, the uid
leases (slimvisor.jail.uids) and the cgroup tree (each toolstack has a parent group of its own);
only addresses, ports, links, abstract Unix sockets and the host name are per host.

On a machine where br_netfilter is loaded with bridge-nf-call-iptables=1 (the module's default),
frames crossing the bridge go through the root netns's iptables FORWARD chain: a DROP policy there
(Docker sets one) cuts the hosts off from each other; the test of the harness says so.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from slimvisor.testing.netns import ETCD_PORT, UNDERLAY, NetnsHost, underlay
from slimvisor.toolstack.peers import PEER_PORT  # the pool link between the daemons
from tests.toolstack import Toolstack

__all__ = ["UNDERLAY", "NetnsToolstack", "pool_hosts"]
ETCD_PEER_PORT = 2380  # etcd's peer port (its default)


class NetnsToolstack(Toolstack):
    """A slimvisord of its own inside network namespace `netns`, as pool host `name` at `address`."""

    def __init__(self, place: NetnsHost) -> None:
        super().__init__()
        self.place = place
        self.name, self.netns, self.address, self.uts = place.name, place.netns, place.address, place.uts
        self.port = place.port  # its veth's end in the root netns, on the bridge
        self.etcd_port = ETCD_PORT
        self.etcd_peer_port = ETCD_PEER_PORT
        self.peer_port = PEER_PORT

    @property
    def etcd_url(self) -> str:
        """Where an etcd member of this host serves clients (when the test started one)."""
        return f"http://{self.address}:{self.etcd_port}"

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespaces (nsenter execs it: the process started is argv's own)."""
        return self.place.wrap(argv)

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
        self.place.unplug()

    def plug(self) -> None:
        self.place.plug()

    def netns_inode(self) -> int:
        return self.place.netns_inode()

    def processes(self) -> list[int]:
        return self.place.processes()


@contextmanager
def pool_hosts(n: int = 3, mtu: int = 1600) -> Iterator[list[NetnsToolstack]]:
    """n hosts (hostA, hostB, ...) on one underlay of MTU `mtu`; on exit every host's toolstack is
    closed (failing on its leftovers), then the underlay goes (failing on, and killing, any process
    still in a host's netns; the namespaces, veths and bridge are deleted), whatever happened."""
    closing: list[str] = []
    try:
        with underlay(n, mtu) as places:
            hosts = [NetnsToolstack(place) for place in places]
            try:
                yield hosts
            finally:
                for host in hosts:
                    try:
                        host.close()
                    except AssertionError as e:
                        closing.append(str(e))
    finally:
        if closing:  # raised here, so a failure of the body or of the underlay shows too (as its context)
            raise AssertionError("pool hosts left something behind their teardown:\n" + "\n".join(closing))
