"""A pool-wide switch across two "hosts": slimvisor.network.vxlan, end to end.

Each host is a network namespace with its own slimvisor switch (private run, state and log trees)
whose TAP uplink `attach` puts in a VXLAN segment; the hosts are joined by a veth pair, the
underlay (10.239.<k>.0/24). Guests are UML domains on the switches: their frames cross the real
path, guest -> switch -> TAP -> bridge -> vxlan -> veth -> vxlan -> bridge -> TAP -> switch -> guest.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netns import popns, pushns

from slimvisor.network.vxlan import VXLAN_OVERHEAD, VxlanError, attach, attached, detach, link_names, set_peers
from tests import leaks
from tests.guest import Console, poweroff

_count = itertools.count()
TAP = "uplink0"
UP = r"slimvisor: \S+ is up"


@dataclass
class Host:
    ns: str  # the network namespace, under /run/netns
    address: str  # on the underlay
    root: Path  # its private run, state and log trees

    @property
    def env(self) -> dict[str, str]:
        return {"SLIMVISOR_RUN_DIR": str(self.root / "run"), "SLIMVISOR_STATE_DIR": str(self.root / "state"),
                "SLIMVISOR_LOG_DIR": str(self.root / "log")}  # fmt: skip

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`argv` inside this host's network namespace, with its slimvisor trees."""
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL)  # fmt: skip
        assert not check or proc.returncode == 0, f"{self.ns}: {' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}"
        return proc

    def sv(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "slimvisor", *args, check=check)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run this thread in the host's network namespace, as slimvisord runs in its host's."""
        pushns(self.ns)
        try:
            yield
        finally:
            popns()

    def ip_counters(self, protocol: str = "Ip") -> dict[str, int]:
        """`protocol`'s counters in /proc/net/snmp (IPv4 fragments made, reassemblies, ICMP echoes)."""
        lines = [line.split() for line in self.run("cat", "/proc/net/snmp").stdout.splitlines()]
        names, values = [line[1:] for line in lines if line[0] == f"{protocol}:"][:2]
        return dict(zip(names, map(int, values), strict=True))

    def fdb(self, name: str) -> list[tuple[str, str | None]]:
        """(MAC, remote) of the FDB entries that device `name` learned (not permanent): a bridge's
        are those naming it as master, a vxlan device's its own."""
        with self.inside(), IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            entries = [m for m in ipr.fdb("dump") if not m["state"] & 0x80]  # NUD_PERMANENT
        mine = [m for m in entries if (m.get_attr("NDA_MASTER") or m["ifindex"]) == index]
        return [(m.get_attr("NDA_LLADDR"), m.get_attr("NDA_DST")) for m in mine]

    def link_info(self, name: str) -> tuple[str, list[str]]:
        """Device `name`'s MAC address and its IPv6 addresses."""
        with self.inside(), IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
            return mac, [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET6)]

    def links(self) -> list[str]:
        with self.inside(), IPRoute() as ipr:
            return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())

    def index(self, name: str) -> int:
        with self.inside(), IPRoute() as ipr:
            return int(ipr.link_lookup(ifname=name)[0])

    def master(self, name: str) -> str | None:
        """The bridge device `name` is in, if any."""
        with self.inside(), IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=name)[0])[0]
            master = link.get_attr("IFLA_MASTER")
            return None if master is None else ipr.get_links(master)[0].get_attr("IFLA_IFNAME")


@contextlib.contextmanager
def two_hosts(underlay_mtu: int) -> Iterator[tuple[Host, Host]]:
    """Hosts .1 and .2 of 10.239.<k>.0/24 joined by a veth pair of `underlay_mtu`, each running a
    switch named `switch` with TAP uplink TAP; switches, namespaces and trees all go at the end."""
    k = next(_count)
    tag = f"{os.getpid() % 100000}x{k}"
    hosts = [Host(f"svx{tag}{side}", f"10.239.{k}.{i}", Path(tempfile.mkdtemp(prefix="svx", dir="/run")))
             for i, side in ((1, "a"), (2, "b"))]  # fmt: skip
    for host in hosts:
        leaks.record_paths(f"{host.root}/")
    a, b = hosts
    try:
        for host in hosts:
            subprocess.run(["ip", "netns", "add", host.ns], check=True)
        subprocess.run(["ip", "link", "add", "ul0", "netns", a.ns, "mtu", str(underlay_mtu), "type", "veth",
                        "peer", "name", "ul0", "netns", b.ns, "mtu", str(underlay_mtu)], check=True)  # fmt: skip
        for host in hosts:
            host.run("ip", "link", "set", "lo", "up")
            host.run("ip", "addr", "add", f"{host.address}/24", "dev", "ul0")
            host.run("ip", "link", "set", "ul0", "up")
            host.sv("switch", "start", "pool", "--uplink", TAP)
        yield a, b
    finally:
        for host in hosts:
            if Path(f"/run/netns/{host.ns}").exists():
                host.sv("switch", "stop", "pool", check=False)
                subprocess.run(["ip", "netns", "del", host.ns], check=False)
            shutil.rmtree(host.root, ignore_errors=True)
    assert all(not Path(f"/run/netns/{host.ns}").exists() for host in hosts)


def test_link_names_fit_linux_and_bad_vnis_are_refused() -> None:
    assert link_names(42) == ("svpb42", "svpx42")
    assert all(len(name) <= 15 for name in link_names(2**24 - 1))
    for vni in (0, 2**24, -1):
        with pytest.raises(VxlanError, match=rf"VNI {vni}: must be a whole number from 1 to 16777215"):
            link_names(vni)


def test_bad_input_names_what_and_leaves_nothing() -> None:
    with two_hosts(1600) as (a, b), a.inside():
        before = a.links()
        for vni in (0, 2**24):
            with pytest.raises(VxlanError, match=rf"VNI {vni}: must be"):
                attach(TAP, vni, a.address, [b.address])
        with pytest.raises(VxlanError, match=r"vxlan svpx7: local address 10\.239\.\d+\.9 is not on this host"):
            attach(TAP, 7, a.address.rsplit(".", 1)[0] + ".9", [b.address])
        with pytest.raises(VxlanError, match=r"vxlan svpx7: peer 'host-b' is not an IPv4 address"):
            attach(TAP, 7, a.address, ["host-b"])
        with pytest.raises(VxlanError, match=r"vxlan svpx7: local address '10\.239\.1' is not an IPv4 address"):
            attach(TAP, 7, "10.239.1", [b.address])
        with pytest.raises(VxlanError, match=r"vxlan svpx7: the switch's TAP nosuchtap does not exist"):
            attach("nosuchtap", 7, a.address, [b.address])
        with pytest.raises(VxlanError, match=r"vxlan svpx7: ul0 is a veth device, not a switch's TAP"):
            attach("ul0", 7, a.address, [b.address])
        with pytest.raises(VxlanError, match=r"vxlan svpx7: MTU 40 must be from 68"):
            attach(TAP, 7, a.address, [b.address], mtu=40)
        with pytest.raises(VxlanError, match=r"vxlan svpx7: no such vxlan device \(attach first\)"):
            set_peers(7, [b.address])
        assert a.links() == before and attached() == []
        # Another device already has VNI 7 on the VXLAN port: the kernel refuses a second one.
        a.run("ip", "link", "add", "other7", "type", "vxlan", "id", "7", "dstport", "4789", "local", a.address)
        with pytest.raises(VxlanError, match=r"vxlan svpx7: cannot create it \(VNI 7, .*port 4789\): File exists"):
            attach(TAP, 7, a.address, [b.address])
        a.run("ip", "link", "del", "other7")
        assert a.links() == before and attached() == []
        attach(TAP, 7, a.address, [b.address])
        with pytest.raises(VxlanError, match=rf"vxlan svpx7: peer {re.escape(a.address)} is this host's own"):
            set_peers(7, [a.address, b.address])
        detach(7)
        detach(7)  # absent is fine
        assert a.links() == before and attached() == []


def test_switch_restart_drops_its_tap_and_attach_puts_it_back() -> None:
    """The TAP is the switch process's: a restarted switch has a new one, outside the bridge."""
    with two_hosts(1600) as (a, b):
        with a.inside():
            attach(TAP, 7, a.address, [b.address])
            index = a.index("svpx7")
            attach(TAP, 7, a.address, [b.address])  # idempotent: the same device
            assert attached() == [7] and a.index("svpx7") == index
        assert a.master(TAP) == "svpb7" and a.master("svpx7") == "svpb7"
        a.sv("switch", "stop", "pool")
        a.sv("switch", "start", "pool", "--uplink", TAP)
        assert a.master(TAP) is None and a.master("svpx7") == "svpb7"
        with a.inside():
            attach(TAP, 7, a.address, [b.address])
        assert a.master(TAP) == "svpb7"
        # A new local address (the host's pool address changed): the vxlan device is made again.
        other = a.address.rsplit(".", 1)[0] + ".11"
        a.run("ip", "addr", "add", f"{other}/24", "dev", "ul0")
        with a.inside():
            attach(TAP, 7, other, [b.address])
        assert a.index("svpx7") != index and a.master("svpx7") == "svpb7"
        assert re.search(
            rf"vxlan id 7 local {re.escape(other)} .*dstport 4789", a.run("ip", "-d", "link", "show", "svpx7").stdout
        )
        with a.inside():
            detach(7)
            assert attached() == []
        assert "svpb7" not in a.links() and TAP in a.links()


@contextlib.contextmanager
def guests(hosts: tuple[Host, Host], rootfs: Path, tmp_path: Path, domname: str) -> Iterator[tuple[Console, Console]]:
    """A busybox domain on each host's switch, 10.239.100.1 and .2 on the pool-wide segment."""
    cons: list[Console] = []
    try:
        for i, host in enumerate(hosts, 1):
            disk = tmp_path / f"g{i}.ext4"
            shutil.copyfile(rootfs, disk)
            cmdline = f"quiet sv.hostname={domname}g{i} sv.ip=10.239.100.{i}/24"
            cons.append(Console("--disk", str(disk), "--memory", "64M", "--cmdline", cmdline, "--net", "switch=pool",
                                name=f"{domname}g{i}", env=host.env))  # fmt: skip
        for con in cons:
            con.expect(UP)
        yield cons[0], cons[1]
    finally:
        poweroff(*cons)


def ping(con: Console, size: int = 56, count: int = 1) -> int:
    """Echo replies guest `con` got from 10.239.100.2 for `count` requests of `size` data bytes."""
    out = con.run(f"ping -c {count} -W 3 -s {size} 10.239.100.2")
    print(out)  # shown when the test fails
    return int(re.search(r"(\d+) packets received", out).group(1))  # type: ignore[union-attr]


def reachable(con: Console, tries: int = 5) -> bool:
    """Whether a ping crosses within `tries` attempts: the first packet after a change may be lost
    while the guest resolves the address again (an ARP entry that failed before is retried)."""
    return any(ping(con) == 1 for _ in range(tries))


def guest_frag_creates(con: Console) -> int:
    """Fragments the guest's own IP layer made (FragCreates of its /proc/net/snmp)."""
    names, values = [line.split()[1:] for line in con.run("grep ^Ip: /proc/net/snmp").splitlines()[:2]]
    return int(dict(zip(names, values, strict=True))["FragCreates"])


def attach_both(a: Host, b: Host, vni: int = 7) -> None:
    for host, peer in ((a, b), (b, a)):
        with host.inside():
            attach(TAP, vni, host.address, [peer.address])


def set_peers_both(a: Host, b: Host, vni: int, joined: bool) -> None:
    for host, peer in ((a, b), (b, a)):
        with host.inside():
            set_peers(vni, [peer.address] if joined else [])


@pytest.mark.guest
def test_guests_on_two_hosts_share_one_segment(rootfs: Path, tmp_path: Path, domname: str) -> None:
    with two_hosts(1600) as (a, b), guests((a, b), rootfs, tmp_path, domname) as (ga, gb):
        assert ping(ga) == 0  # two switches of one name, not yet joined
        attach_both(a, b)
        assert reachable(ga)
        before = a.ip_counters(), b.ip_counters(), guest_frag_creates(ga)
        # A full-size frame: 1472 + 8 ICMP + 20 IPv4 = 1500 bytes of IP, 1550 on the underlay.
        assert ping(ga, 1472, count=3) == 3
        after = a.ip_counters(), b.ip_counters(), guest_frag_creates(ga)
        for host, old, new in ((a, before[0], after[0]), (b, before[1], after[1])):
            assert (new["FragCreates"], new["ReasmReqds"]) == (old["FragCreates"], old["ReasmReqds"]), host.ns
        assert after[2] == before[2]  # nor did the guest split it
        # Host A's vxlan device learned where guest b lives, and nothing else: host B sent nothing
        # onto the segment (no IGMP, no IPv6). The two-port bridge keeps no table.
        mac_b = gb.run("cat /sys/class/net/eth0/address").strip()
        assert a.fdb("svpx7") == [(mac_b, b.address)] and a.fdb("svpb7") == []
        # The segment is the guests' alone: host A's bridge answers no ARP and takes no packet for
        # the host's own address even sent to its MAC, and neither it nor its ports speak IPv6.
        mac, _ = a.link_info("svpb7")
        echoes = a.ip_counters("Icmp")["InEchos"]
        out = ga.run(f"ip route add {a.address}/32 dev eth0; ping -c 1 -W 2 {a.address}; arp -n {a.address}")
        assert "incomplete" in out, out
        ga.run(f"arp -s {a.address} {mac}; ping -c 2 -W 2 {a.address}")
        assert a.ip_counters("Icmp")["InEchos"] == echoes
        assert [a.link_info(name)[1] for name in ("svpb7", "svpx7", TAP)] == [[], [], []]
        # A port's MAC anti-spoofing holds across hosts: a forged source never reaches the tunnel.
        mac_a = ga.run("cat /sys/class/net/eth0/address").strip()
        ga.run("ip link set eth0 down; ip link set eth0 address 52:54:00:66:66:66; ip link set eth0 up")
        assert ping(ga, count=2) == 0
        assert "52:54:00:66:66:66" not in {mac for mac, _ in a.fdb("svpx7") + b.fdb("svpx7")}
        ga.run(f"ip link set eth0 down; ip link set eth0 address {mac_a}; ip link set eth0 up")
        assert reachable(ga)
        set_peers_both(a, b, 7, joined=False)
        assert ping(ga, count=2) == 0  # learned MACs behind a removed peer are forgotten with it
        set_peers_both(a, b, 7, joined=True)
        assert reachable(ga)
        for host in (a, b):
            with host.inside():
                detach(7)
                assert attached() == []
            assert not {"svpb7", "svpx7"} & set(host.links())
        assert ping(ga) == 0


@pytest.mark.guest
def test_underlay_of_1500_loses_the_first_full_frame_then_fragments(rootfs: Path, tmp_path: Path,
                                                                    domname: str) -> None:  # fmt: skip
    """What docs/pool.md says of an underlay without room for VXLAN_OVERHEAD."""
    assert VXLAN_OVERHEAD == 50
    with two_hosts(1500) as (a, b), guests((a, b), rootfs, tmp_path, domname) as (ga, _):
        attach_both(a, b)
        assert reachable(ga)  # small frames fit
        frags = guest_frag_creates(ga), b.ip_counters()["FragCreates"]
        # The request (DF set) does not fit: host A's vxlan drops it and answers the guest with
        # ICMP "fragmentation needed", so the guest's next requests are split to its learned PMTU.
        assert ping(ga, 1472) == 0
        assert ping(ga, 1472, count=2) == 2
        assert guest_frag_creates(ga) > frags[0]
        # The guest's echo reply has no DF: host B's vxlan sends it and B's IP layer splits the UDP datagram.
        assert b.ip_counters()["FragCreates"] > frags[1]
