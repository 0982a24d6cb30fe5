"""A TAP device for the switch's uplink: frames with virtio-net headers, offloads on.

The device is not persistent: it disappears when the fd closes, so a crashed switch leaves no
TAP behind. Link state goes through netlink (pyroute2).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct

from pyroute2 import IPRoute

from slimvisor.runtime.errors import SlimvisorError

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_mrg_rxbuf, as the guests use
IFNAMSIZ = 16


class TapError(SlimvisorError):
    """The TAP device could not be made: the message says why."""


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
        raise TapError(f"TAP name {name!r}: use 1-15 letters, digits, '.', '_' or '-'")


class Tap:
    def __init__(self, name: str, offloads: bool = True) -> None:
        check_name(name)
        with IPRoute() as ipr:
            if ipr.link_lookup(ifname=name):
                raise TapError(f"network interface {name} already exists")
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            if offloads:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        except OSError as e:
            os.close(self.fd)
            raise TapError(f"cannot create TAP {name}: {e.strerror}") from e

    def read(self) -> bytes | None:
        """One frame with its 12-byte virtio-net header, or None when there is none."""
        try:
            return os.read(self.fd, VNET_HDR_SIZE + 65536)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> bool:
        """Send a header+frame to the host; False when the host side is full (dropped)."""
        try:
            return os.write(self.fd, packet) == len(packet)
        except (BlockingIOError, OSError):
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
