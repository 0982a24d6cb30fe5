"""A migrated NIC announces where it is now: vhost-user SEND_RARP -> the net device's RARP frame ->
switches learn its MAC on the new port at once (issue 16)."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimvisor.devices.blk import BlockDevice
from slimvisor.devices.net import ETH_P_RARP, PLAIN, NetDevice, VnetHeader, rarp_announcement
from slimvisor.engines.qemu.qmp import Qmp
from slimvisor.network.switch import Switch
from slimvisor.network.switchd import switch_dir
from slimvisor.runtime.control import request
from slimvisor.runtime.ratelimit import RateLimiter, TokenBucket
from slimvisor.vhostuser.backend import PROTOCOL_FEATURES, VhostUserBackend
from slimvisor.vhostuser.protocol import (
    HEADER,
    U64,
    VHOST_USER_GET_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_PROTOCOL_F_RARP,
    VHOST_USER_PROTOCOL_F_REPLY_ACK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_SEND_RARP,
    VHOST_USER_SET_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    Message,
    ProtocolError,
)
from slimvisor.virtio.spec import bit

MAC = bytes.fromhex("00163e0000aa")
OTHER = bytes.fromhex("00163e0000bb")
PEER = bytes.fromhex("5254000000cc")
# QEMU's announce frame for 00:16:3e:00:00:aa (net/announce.c), written out by hand: broadcast,
# from the MAC, ethertype 0x8035; RARP: Ethernet/IPv4, lengths 6/4, op 3 (reverse request),
# sender and target hardware address the MAC, protocol addresses 0; zero padding to 60 bytes.
RARP_FRAME = bytes.fromhex(
    "ffffffffffff" "00163e0000aa" "8035"
    "0001" "0800" "06" "04" "0003"
    "00163e0000aa" "00000000" "00163e0000aa" "00000000"
) + bytes(18)  # fmt: skip


def msg(req: int, payload: bytes = b"", flags: int = 0) -> Message:
    return Message(req, VHOST_USER_VERSION | flags, payload)


def ack(out: bytes | None) -> int:
    assert out is not None
    req, flags, size = HEADER.unpack_from(out)
    assert (req, flags, size) == (VHOST_USER_SEND_RARP, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 8)
    return int(U64.unpack_from(out, HEADER.size)[0])


class Port:
    """A NetDevice wired to a list instead of a switch."""

    def __init__(self, **kw) -> None:
        self.dev = NetDevice(MAC, **kw)
        self.sent: list[tuple[VnetHeader, bytes]] = []
        self.dev.on_transmit = lambda h, f: self.sent.append((h, f))


# -- the frame ------------------------------------------------------------------------------------
def test_the_announcement_is_qemus_rarp_frame():
    assert rarp_announcement(MAC) == RARP_FRAME and len(RARP_FRAME) == 60


def test_net_device_broadcasts_it_for_its_own_mac_only():
    port = Port()
    assert port.dev.announces
    assert port.dev.announce(MAC)
    assert port.sent == [(PLAIN, RARP_FRAME)]
    stats = port.dev.stats()
    assert (stats["tx_packets"], stats["tx_bytes"], stats["tx_dropped"]) == (1, 60, 0)
    assert not port.dev.announce(OTHER)  # another MAC: refused, nothing goes out, nothing counted
    assert len(port.sent) == 1 and port.dev.stats()["tx_dropped"] == 0


def test_no_announcement_with_the_link_down_or_over_the_rate_limit():
    clock = [0.0]
    bucket = TokenBucket(size=1, refill_time=1.0)
    bucket.last = 0.0
    port = Port(tx_limiter=RateLimiter(ops=bucket), clock=lambda: clock[0])
    port.dev.link_up = False
    assert not port.dev.announce(MAC)
    port.dev.link_up = True
    assert port.dev.announce(MAC)
    assert not port.dev.announce(MAC)  # the bucket's one token is spent
    assert len(port.sent) == 1 and port.dev.stats()["tx_dropped"] == 2
    clock[0] = 1.0
    assert port.dev.announce(MAC) and len(port.sent) == 2


def test_other_devices_do_not_announce(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    dev = BlockDevice(str(disk))
    try:
        assert not dev.announces and not dev.announce(MAC)
    finally:
        dev.close()


# -- vhost-user SEND_RARP -------------------------------------------------------------------------
@pytest.fixture
def port():
    p = Port()
    backend = VhostUserBackend(p.dev)
    p.backend = backend  # type: ignore[attr-defined]
    yield p
    backend.close()


def negotiate(backend: VhostUserBackend, features: int) -> None:
    assert backend.handle(msg(VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(features))) is None


def test_rarp_is_offered_for_net_only(port, tmp_path):
    offered = U64.unpack_from(port.backend.handle(msg(VHOST_USER_GET_PROTOCOL_FEATURES)), HEADER.size)[0]
    assert offered == PROTOCOL_FEATURES | bit(VHOST_USER_PROTOCOL_F_RARP)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    blk = VhostUserBackend(BlockDevice(str(disk)))
    try:
        out = blk.handle(msg(VHOST_USER_GET_PROTOCOL_FEATURES))
        assert U64.unpack_from(out, HEADER.size)[0] == PROTOCOL_FEATURES
        assert not PROTOCOL_FEATURES & bit(VHOST_USER_PROTOCOL_F_RARP)
        with pytest.raises(ProtocolError, match="set protocol features 0x4 that were not offered"):
            negotiate(blk, bit(VHOST_USER_PROTOCOL_F_RARP))
    finally:
        blk.device.close()
        blk.close()


def test_send_rarp_emits_the_frame(port):
    negotiate(port.backend, bit(VHOST_USER_PROTOCOL_F_RARP))
    # QEMU copies the 6 bytes of the MAC into a u64 and leaves the other two as they were
    assert port.backend.handle(msg(VHOST_USER_SEND_RARP, MAC + b"\xde\xad")) is None  # reply payload: N/A
    assert port.sent == [(PLAIN, RARP_FRAME)]


def test_send_rarp_with_reply_ack(port):
    negotiate(port.backend, bit(VHOST_USER_PROTOCOL_F_RARP) | bit(VHOST_USER_PROTOCOL_F_REPLY_ACK))
    assert ack(port.backend.handle(msg(VHOST_USER_SEND_RARP, MAC + b"\0\0", VHOST_USER_NEED_REPLY_MASK))) == 0
    assert port.sent == [(PLAIN, RARP_FRAME)]


def test_send_rarp_for_another_mac_is_refused_and_the_link_stays(port, caplog):
    negotiate(port.backend, bit(VHOST_USER_PROTOCOL_F_RARP) | bit(VHOST_USER_PROTOCOL_F_REPLY_ACK))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            out = port.backend.handle(msg(VHOST_USER_SEND_RARP, OTHER + b"\0\0", VHOST_USER_NEED_REPLY_MASK))
            assert ack(out) != 0
    assert port.sent == [] and port.backend.refused_announcements == 3 and port.backend.broken is None
    warnings = [r.getMessage() for r in caplog.records if "SEND_RARP" in r.getMessage()]
    assert len(warnings) == 1  # a front-end repeating it does not fill the log
    assert "00:16:3e:00:00:bb not sent (not the device's MAC" in warnings[0]
    assert port.backend.handle(msg(VHOST_USER_SEND_RARP, OTHER + b"\0\0")) is None  # no ack asked, none sent
    assert ack(port.backend.handle(msg(VHOST_USER_SEND_RARP, MAC + b"\0\0", VHOST_USER_NEED_REPLY_MASK))) == 0
    assert port.sent == [(PLAIN, RARP_FRAME)]


def test_send_rarp_needs_the_feature_and_a_u64(port):
    with pytest.raises(ProtocolError, match="SEND_RARP without VHOST_USER_PROTOCOL_F_RARP negotiated"):
        port.backend.handle(msg(VHOST_USER_SEND_RARP, MAC + b"\0\0"))
    negotiate(port.backend, bit(VHOST_USER_PROTOCOL_F_RARP))
    with pytest.raises(ProtocolError, match="SEND_RARP: payload of 6 bytes, expected 8"):
        port.backend.handle(msg(VHOST_USER_SEND_RARP, MAC))
    assert port.sent == []


# -- switches learn the new port at once ----------------------------------------------------------
def test_switches_learn_a_migrated_mac_from_its_announcement():
    """Two hosts' switches (A and B, each with a TAP uplink) joined by a learning bridge H, as two
    slimvisord on one machine with their uplinks bridged. The guest's MAC lives on A, and H has
    learned it on A's TAP; the guest moves to B. Without an announcement H would send its traffic
    to A until the entry aged out (300 s); with it, H and A know at once."""
    now = 0.0
    h, a, b = (Switch(clock=lambda: now) for _ in range(3))
    got: dict[str, list[bytes]] = {"peer": []}

    def wire(dst: Switch, port: str):
        return lambda header, frame: dst.receive(port, header, frame) or True

    h.add_port("tapA", None, wire(a, "uplink"), enforce_mac=False)
    h.add_port("tapB", None, wire(b, "uplink"), enforce_mac=False)
    a.add_port("uplink", None, wire(h, "tapA"), enforce_mac=False)
    b.add_port("uplink", None, wire(h, "tapB"), enforce_mac=False)
    h.add_port("peer", PEER, lambda header, frame: got["peer"].append(frame) or True)

    src = NetDevice(MAC)
    a.add_port("vif", MAC, src.deliver)
    src.on_transmit = lambda header, frame: a.receive("vif", header, frame)
    assert src.announce(MAC)  # the guest spoke once on A (its announcement at boot, say)
    assert h.table()[MAC] == "tapA" and got["peer"] == [RARP_FRAME]

    # migrated: B's switch gets the port (with its MAC), A's loses it, the target announces
    dst = NetDevice(MAC)
    b.add_port("vif", MAC, dst.deliver)
    a.remove_port("vif")
    assert h.table()[MAC] == "tapA"  # stale: the peer's frames would go to A
    dst.on_transmit = lambda header, frame: b.receive("vif", header, frame)
    now = 1.0
    assert dst.announce(MAC)
    assert h.table()[MAC] == "tapB" and a.table()[MAC] == "uplink" and b.table()[MAC] == "vif"
    assert got["peer"][-1] == RARP_FRAME
    # and another MAC from the target's port is refused before it reaches any switch
    assert not dst.announce(OTHER) and OTHER not in h.table()


# -- a real QEMU's announce-self, through the switch process to its TAP uplink ---------------------
def _cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "slimvisor", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _qmp(path: Path, qemu: subprocess.Popen[bytes], timeout: float = 30) -> Qmp:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert qemu.poll() is None and time.monotonic() < deadline, "QEMU's monitor did not come up"
        select.select([], [], [], 0.02)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    qmp = Qmp(sock)
    while not qmp.ready:
        assert time.monotonic() < deadline and not qmp.eof, "QEMU's monitor did not greet"
        select.select([qmp], [], [], 1.0)
        qmp.pump()
    return qmp


@pytest.mark.guest
def test_qemu_announce_self_reaches_the_switch_uplink(domname: str, tmp_path: Path) -> None:
    """QEMU 7.2 on a switch port (vhost-user NIC, no guest driver: nothing acked GUEST_ANNOUNCE;
    running, as QEMU queues a stopped VM's frames): QMP announce-self makes it send SEND_RARP,
    and the RARP frame leaves the switch by its TAP uplink, byte for byte, counted on the port and
    on the uplink."""
    name, tap = f"sw{domname}", f"an{os.getpid() % 100000}"
    mac = "00:16:3e:00:00:aa"
    _cli("switch", "start", name, "--uplink", tap)
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
    qemu = None
    try:
        sniff.bind((tap, 0))
        sock = request(str(switch_dir(name) / "control.sock"),
                       {"op": "add-port", "port": "vif", "mac": mac, "owner": os.getpid()})["socket"]  # fmt: skip
        monitor = tmp_path / "qmp.sock"
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-accel", "tcg",
             "-machine", "q35,memory-backend=mem", "-m", "64M",
             "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
             "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
             "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=", "-qmp", f"unix:{monitor},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        qmp = _qmp(monitor, qemu)
        try:
            qmp.execute("announce-self", {"initial": 50, "max": 550, "rounds": 1, "step": 100})
        finally:
            qmp.close()
        sniff.settimeout(10)
        frame = sniff.recv(2048)
        assert frame == RARP_FRAME
        ports = json.loads(_cli("switch", "show", name, "--json"))["ports"]
        assert ports["vif"]["rx_packets"] == 1 and ports["vif"]["dev_tx_packets"] == 1
        assert ports["uplink"]["tx_packets"] == 1 and ports["vif"]["forged"] == 0
    finally:
        sniff.close()
        if qemu is not None:
            qemu.kill()
            qemu.wait(10)
        _cli("switch", "stop", name)
