"""A pool-wide switch's uplink: the switch's TAP bridged to a Linux VXLAN device.

Each host of a pool runs its own switch process of a given name; the hosts' switches of one name
share one L2 segment because each one's TAP uplink sits in a Linux bridge with a VXLAN device of
the switch's VNI. There is no multicast: every other host is a unicast peer, listed as an
all-zeros FDB entry (`00:00:00:00:00:00 dst PEER`), so the kernel sends broadcasts and unknown
destinations to each peer in turn (head-end replication) and learns where each MAC lives from
what arrives. All of it is netlink (pyroute2) in the calling process's network namespace.

The VXLAN header and the outer Ethernet, IPv4 and UDP headers add VXLAN_OVERHEAD bytes to every
frame, so the underlay must carry `mtu + VXLAN_OVERHEAD` for guests to keep `mtu` (docs/pool.md).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from slimvisor.runtime.errors import SlimvisorError

VXLAN_PORT = 4789  # IANA-assigned VXLAN port (RFC 7348 section 5)
VNI_MIN, VNI_MAX = 1, 2**24 - 1  # the VNI is a 24-bit field (RFC 7348 section 5); 0 is kept out as "none"
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 (RFC 7348 section 5, figure 1)
ALL_ZEROS_MAC = "00:00:00:00:00:00"  # the FDB entry Linux floods broadcast and unknown unicast to
MTU_MIN, MTU_MAX = 68, 65535 - VXLAN_OVERHEAD  # IPv4's minimum (RFC 791); the largest a UDP datagram carries
FDB_LIMIT = 4096  # MACs a vxlan device learns at most (the pool's guest NICs); past it, frames are flooded
BRIDGE_PREFIX, VXLAN_PREFIX = "svpb", "svpx"  # "slimvisor pool bridge / vxlan": how attached() finds ours


class VxlanError(SlimvisorError):
    """A pool switch's uplink could not be set up: the message names the device and what failed."""


def _check_vni(vni: int) -> int:
    if isinstance(vni, bool) or not isinstance(vni, int) or not VNI_MIN <= vni <= VNI_MAX:
        raise VxlanError(f"VNI {vni!r}: must be a whole number from {VNI_MIN} to {VNI_MAX} (24 bits, RFC 7348)")
    return vni


def _check_ipv4(address: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except (ipaddress.AddressValueError, ValueError) as e:
        raise VxlanError(f"{what} {address!r} is not an IPv4 address: {e}") from None


def link_names(vni: int) -> tuple[str, str]:
    """(bridge, vxlan) device names of VNI `vni`: at most 12 characters, under Linux's 15."""
    _check_vni(vni)
    return f"{BRIDGE_PREFIX}{vni}", f"{VXLAN_PREFIX}{vni}"


def _netlink(e: NetlinkError) -> str:
    return os.strerror(e.code) if e.code else str(e)


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _vxlan_data(link: Any) -> dict[str, Any]:
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    return {} if data is None else {name: value for name, value in data["attrs"]}


def _link(ipr: IPRoute, name: str) -> Any | None:
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def _ensure_vxlan(ipr: IPRoute, name: str, vni: int, local: str) -> int:
    """The index of `name`, an up-to-date vxlan device: one with other settings is made again."""
    link = _link(ipr, name)
    if link is not None:
        data = _vxlan_data(link) if _kind(link) == "vxlan" else {}
        wanted = {"IFLA_VXLAN_ID": vni, "IFLA_VXLAN_LOCAL": local, "IFLA_VXLAN_PORT": VXLAN_PORT,
                  "IFLA_VXLAN_LEARNING": 1, "IFLA_VXLAN_LIMIT": FDB_LIMIT}  # fmt: skip
        if all(data.get(key) == value for key, value in wanted.items()):
            return int(link["index"])
        ipr.link("del", index=link["index"])
    try:
        ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=local, vxlan_port=VXLAN_PORT,
                 vxlan_learning=1, vxlan_limit=FDB_LIMIT)  # fmt: skip
    except NetlinkError as e:  # EEXIST: another device of this host already has this VNI on this port
        raise VxlanError(f"vxlan {name}: cannot create it (VNI {vni}, local {local}, port {VXLAN_PORT}): "
                         f"{_netlink(e)}") from None  # fmt: skip
    return int(ipr.link_lookup(ifname=name)[0])


def _ensure_bridge(ipr: IPRoute, name: str) -> int:
    """The index of bridge `name`, without multicast snooping: a snooping bridge joins the
    all-snoopers group (RFC 4286 section 2) and sends the host's IGMP reports onto the segment."""
    link = _link(ipr, name)
    if link is not None and _kind(link) == "bridge":
        ipr.link("set", index=link["index"], kind="bridge", br_mcast_snooping=0)
        return int(link["index"])
    if link is not None:
        ipr.link("del", index=link["index"])
    try:
        ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0)
    except NetlinkError as e:
        raise VxlanError(f"bridge {name}: cannot create it: {_netlink(e)}") from None
    return int(ipr.link_lookup(ifname=name)[0])


def _keep_host_out(name: str, bridge: bool) -> None:
    """Make device `name` pure L2 for the host: the segment is the guests', not a way into dom0.

    A bridge hands frames up to the host's stack, which would answer ARP for the host's own
    addresses and take packets (a VXLAN datagram to port 4789 among them) from any guest. So no
    IPv6 on the bridge or its ports (no link-local address, no ND or MLD sent onto the segment),
    and on the bridge strict reverse-path filtering (RFC 3704 section 2.2: nothing is routed
    through it, so every source fails) and no ARP replies (arp_ignore 8). Linux's sysctls, per
    network namespace: a host without IPv6 has no such file to write.
    """
    settings = [(f"ipv6/conf/{name}/disable_ipv6", "1")]
    if bridge:
        settings += [(f"ipv4/conf/{name}/rp_filter", "1"), (f"ipv4/conf/{name}/arp_ignore", "8")]
    for key, value in settings:
        path = Path("/proc/sys/net") / key
        if key.startswith("ipv6/") and not path.parent.parent.exists():
            continue
        try:
            path.write_text(value)
        except OSError as e:
            raise VxlanError(f"{name}: cannot set net.{key.replace('/', '.')} = {value}: {e.strerror}") from None


def attach(tap: str, vni: int, local: str, peers: Iterable[str], mtu: int = 1500) -> None:
    """Join switch uplink `tap` to VNI `vni`'s segment, sent from `local` to `peers`. Idempotent.

    Makes (or keeps) the vxlan device and the bridge, puts the vxlan device and `tap` in the bridge
    and brings all up, then sets the peers. `mtu` is what the segment carries (the guests' MTU),
    set on the vxlan device and the TAP; the underlay must carry `mtu + VXLAN_OVERHEAD`. The TAP is
    the switch's and goes with it: after a switch restart, call attach again to put the new one in.
    """
    bridge, vxlan = link_names(vni)
    local = _check_ipv4(local, f"vxlan {vxlan}: local address")
    peers = [_check_ipv4(p, f"vxlan {vxlan}: peer") for p in peers]
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
        raise VxlanError(f"vxlan {vxlan}: MTU {mtu!r} must be from {MTU_MIN} to {MTU_MAX}")
    with IPRoute() as ipr:
        tap_link = _link(ipr, tap)
        if tap_link is None:
            raise VxlanError(f"vxlan {vxlan}: the switch's TAP {tap} does not exist (is the switch running with "
                             f"--uplink {tap} in this network namespace?)")  # fmt: skip
        if _kind(tap_link) != "tun":  # never enslave the host's own links (its underlay) by a typo
            raise VxlanError(f"vxlan {vxlan}: {tap} is a {_kind(tap_link) or 'physical'} device, not a switch's TAP")
        if not ipr.get_addr(family=socket.AF_INET, address=local):
            raise VxlanError(f"vxlan {vxlan}: local address {local} is not on this host")
        new = not ipr.link_lookup(ifname=vxlan) and not ipr.link_lookup(ifname=bridge)
        try:
            _join(ipr, tap, int(tap_link["index"]), vni, local, mtu)
            set_peers(vni, peers)
        except VxlanError:
            if new:  # a first attach that failed half-way leaves nothing; a repeated one keeps what worked
                detach(vni)
            raise


def _join(ipr: IPRoute, tap: str, tap_index: int, vni: int, local: str, mtu: int) -> None:
    """attach's netlink work, once its input is checked."""
    bridge, vxlan = link_names(vni)
    vxlan_index = _ensure_vxlan(ipr, vxlan, vni, local)
    bridge_index = _ensure_bridge(ipr, bridge)
    for name in (bridge, vxlan, tap):
        _keep_host_out(name, bridge=name == bridge)
    try:
        ipr.link("set", index=bridge_index, state="up")
        for index in (vxlan_index, tap_index):
            ipr.link("set", index=index, mtu=mtu)
            ipr.link("set", index=index, master=bridge_index, state="up")
            # Two ports: each frame goes to the other one, so the bridge needs no table (which
            # nothing would bound); the vxlan device learns, up to FDB_LIMIT.
            ipr.brport("set", index=index, learning=0)
    except NetlinkError as e:
        raise VxlanError(f"bridge {bridge}: cannot put {vxlan} and {tap} in it (MTU {mtu}): {_netlink(e)}") from None


def _remote_entries(ipr: IPRoute, index: int) -> list[tuple[str, str]]:
    """(MAC, destination) of `index`'s FDB entries that name a remote host: the all-zeros ones and
    those learned. The dump is filtered here: the kernel gives every device's entries."""
    return [
        (msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST"))
        for msg in ipr.fdb("dump", ifindex=index)
        if msg["ifindex"] == index and msg.get_attr("NDA_DST")
    ]


def set_peers(vni: int, peers: Iterable[str]) -> None:
    """Make the all-zeros FDB entries of VNI `vni`'s vxlan device exactly `peers`: add what is
    missing, remove what is stale, leave the rest (so unchanged peers see no gap in flooding).

    MACs learned behind a host that is no longer a peer are forgotten too: its domains are gone
    or elsewhere, and a learned entry would otherwise keep sending to it until it ages out.
    """
    _, vxlan = link_names(vni)
    wanted = {_check_ipv4(p, f"vxlan {vxlan}: peer") for p in peers}
    with IPRoute() as ipr:
        link = _link(ipr, vxlan)
        if link is None or _kind(link) != "vxlan":
            raise VxlanError(f"vxlan {vxlan}: no such vxlan device (attach first)")
        local = _vxlan_data(link).get("IFLA_VXLAN_LOCAL")
        if local in wanted:
            raise VxlanError(f"vxlan {vxlan}: peer {local} is this host's own local address")
        index = int(link["index"])
        entries = _remote_entries(ipr, index)
        have = {dst for mac, dst in entries if mac == ALL_ZEROS_MAC}
        changes = [("append", ALL_ZEROS_MAC, dst) for dst in sorted(wanted - have)]
        changes += [("del", mac, dst) for mac, dst in sorted(entries) if dst not in wanted]
        for op, mac, dst in changes:
            try:
                ipr.fdb(op, ifindex=index, lladdr=mac, dst=dst)
            except NetlinkError as e:
                if op == "del" and e.code == errno.ENOENT:  # a learned entry that aged out meanwhile
                    continue
                raise VxlanError(f"vxlan {vxlan}: cannot {'add' if op == 'append' else 'remove'} "
                                 f"{mac} dst {dst}: {_netlink(e)}") from None  # fmt: skip


def detach(vni: int) -> None:
    """Remove VNI `vni`'s bridge and vxlan device (the TAP stays the switch's); absent is fine."""
    with IPRoute() as ipr:
        for name in link_names(vni):
            for index in ipr.link_lookup(ifname=name):
                try:
                    ipr.link("del", index=index)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:  # gone meanwhile
                        raise VxlanError(f"{name}: cannot remove it: {_netlink(e)}") from None


def attached() -> list[int]:
    """The VNIs that have a slimvisor vxlan device in this network namespace, in order."""
    with IPRoute() as ipr:
        links = ipr.get_links()
    found = set()
    for link in links:
        name = link.get_attr("IFLA_IFNAME") or ""
        if name.startswith(VXLAN_PREFIX) and _kind(link) == "vxlan":
            vni = _vxlan_data(link).get("IFLA_VXLAN_ID")
            if isinstance(vni, int) and name == f"{VXLAN_PREFIX}{vni}":
                found.add(vni)
    return sorted(found)
