"""vhost-user: the wire parser, the back-end state machine, and the server over a real socket."""

from __future__ import annotations

import fcntl
import gc
import mmap
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from slimvisor.devices.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDevice,
)
from slimvisor.memory import GuestMemory, Region
from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.backend import PROTOCOL_FEATURES, VhostUserBackend
from slimvisor.vhostuser.protocol import (
    CONFIG_HEADER,
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    MEM_REGION,
    MEM_TABLE_HEADER,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_GET_CONFIG,
    VHOST_USER_GET_FEATURES,
    VHOST_USER_GET_MAX_MEM_SLOTS,
    VHOST_USER_GET_PROTOCOL_FEATURES,
    VHOST_USER_GET_QUEUE_NUM,
    VHOST_USER_GET_VRING_BASE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_PROTOCOL_F_CONFIG,
    VHOST_USER_PROTOCOL_F_MQ,
    VHOST_USER_PROTOCOL_F_REPLY_ACK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_RESET_DEVICE,
    VHOST_USER_SET_BACKEND_REQ_FD,
    VHOST_USER_SET_CONFIG,
    VHOST_USER_SET_FEATURES,
    VHOST_USER_SET_MEM_TABLE,
    VHOST_USER_SET_OWNER,
    VHOST_USER_SET_PROTOCOL_FEATURES,
    VHOST_USER_SET_VRING_ADDR,
    VHOST_USER_SET_VRING_BASE,
    VHOST_USER_SET_VRING_CALL,
    VHOST_USER_SET_VRING_ENABLE,
    VHOST_USER_SET_VRING_ERR,
    VHOST_USER_SET_VRING_KICK,
    VHOST_USER_SET_VRING_NUM,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    VRING_ADDR,
    VRING_STATE,
    Message,
    MessageReader,
    ProtocolError,
    request,
)
from slimvisor.vhostuser.server import VhostUserServer
from slimvisor.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit
from tests.vring import Driver

SECTORS = 64
GETS = {
    VHOST_USER_GET_FEATURES,
    VHOST_USER_GET_PROTOCOL_FEATURES,
    VHOST_USER_GET_QUEUE_NUM,
    VHOST_USER_GET_CONFIG,
    VHOST_USER_GET_VRING_BASE,
}


def image_bytes() -> bytes:
    return bytes((i * 7 + i // SECTOR_SIZE) & 0xFF for i in range(SECTORS * SECTOR_SIZE))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> set[str]:
    gc.collect()  # mmaps of guest memory hold an fd until they are collected
    return set(os.listdir("/proc/self/fd"))


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def drain_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(image_bytes())
    return str(path)


@pytest.fixture
def device(image):
    dev = BlockDevice(image, serial="vu-test")
    yield dev
    dev.close()


@pytest.fixture
def backend(device):
    b = VhostUserBackend(device)
    yield b
    b.close()


@pytest.fixture
def eventfds():
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    yield fds  # kick, call, err
    for fd in fds:
        os.close(fd)


# -- MessageReader ------------------------------------------------------------------------------
def test_reader_one_byte_at_a_time():
    wire = request(VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 256), VHOST_USER_NEED_REPLY_MASK)
    r = MessageReader()
    got = None
    for i, b in enumerate(wire):
        assert got is None
        assert r.wanted() == (HEADER.size - i if i < HEADER.size else len(wire) - i)
        got = r.feed(bytes([b]))
    assert got is not None
    assert (got.request, got.payload, got.fds) == (VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 256), [])
    assert got.need_reply and got.name == "SET_VRING_NUM"
    assert r.wanted() == HEADER.size


def test_reader_fds_belong_to_their_message(eventfds):
    wire = request(VHOST_USER_SET_VRING_KICK, U64.pack(0))
    r = MessageReader()
    assert r.feed(wire[:5]) is None
    assert r.feed(wire[5:12]) is None
    assert r.feed(wire[12:14], [eventfds[0]]) is None  # fds may come with any piece of the message
    msg = r.feed(wire[14:])
    assert msg.fds == [eventfds[0]]
    msg2 = r.feed(request(VHOST_USER_GET_FEATURES))  # no payload: complete on its header
    assert msg2 is not None and msg2.fds == [] and msg2.payload == b""


def test_reader_refuses_reading_past_a_message():
    r = MessageReader()
    with pytest.raises(ProtocolError, match="read past the end of a message"):
        r.feed(request(VHOST_USER_GET_FEATURES) + b"x")
    r = MessageReader()
    r.feed(HEADER.pack(VHOST_USER_SET_FEATURES, VHOST_USER_VERSION, 8))
    with pytest.raises(ProtocolError, match="read past the end of a message"):
        r.feed(bytes(9))


def test_reader_payload_limit():
    r = MessageReader()
    assert r.feed(HEADER.pack(VHOST_USER_SET_CONFIG, VHOST_USER_VERSION, MAX_PAYLOAD)) is None
    assert r.wanted() == MAX_PAYLOAD
    r = MessageReader()
    with pytest.raises(ProtocolError, match="payload of 4097 bytes is larger than 4096"):
        r.feed(HEADER.pack(VHOST_USER_SET_CONFIG, VHOST_USER_VERSION, MAX_PAYLOAD + 1))
    r = MessageReader()
    with pytest.raises(ProtocolError, match="payload of 4294967295 bytes is larger than 4096"):
        r.feed(HEADER.pack(VHOST_USER_SET_CONFIG, VHOST_USER_VERSION, 0xFFFFFFFF))


@pytest.mark.parametrize("flags", [0, 2, 3, VHOST_USER_NEED_REPLY_MASK])
def test_reader_bad_version(flags):
    with pytest.raises(ProtocolError, match=r"unsupported vhost-user version [023]"):
        MessageReader().feed(HEADER.pack(VHOST_USER_GET_FEATURES, flags, 0))


def test_reader_reply_flag_from_front_end():
    with pytest.raises(ProtocolError, match="a front-end request must not carry the reply flag"):
        MessageReader().feed(HEADER.pack(VHOST_USER_GET_FEATURES, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 0))


def test_reader_too_many_fds_and_close():
    fds = [os.eventfd(0) for _ in range(MAX_FDS + 1)]
    r = MessageReader()
    r.feed(b"\x05\0", fds[:MAX_FDS])
    with pytest.raises(ProtocolError, match=r"too many file descriptors \(9\) in one message"):
        r.feed(b"\0", fds[MAX_FDS:])
    r.close()  # what an unfinished message brought is closed
    assert not any(fd_is_open(fd) for fd in fds)


def test_reader_close_unfinished_message():
    fd = os.eventfd(0)
    r = MessageReader()
    wire = request(VHOST_USER_SET_VRING_CALL, U64.pack(0))
    r.feed(wire[:12])
    r.feed(wire[12:13], [fd])
    r.close()
    assert not fd_is_open(fd)


def test_message_helpers():
    m = Message(VHOST_USER_SET_FEATURES, VHOST_USER_VERSION, U64.pack(42))
    assert m.u64() == 42 and not m.need_reply
    with pytest.raises(ProtocolError, match="SET_FEATURES: payload of 4 bytes, expected 8"):
        Message(VHOST_USER_SET_FEATURES, VHOST_USER_VERSION, b"\0" * 4).u64()
    assert Message(9999, VHOST_USER_VERSION, b"").name == "request 9999"


# -- a front-end, over a backend object or a socket ---------------------------------------------
def parse_reply(req: int, raw: bytes) -> bytes:
    r, flags, size = HEADER.unpack_from(raw)
    assert r == req
    assert flags == VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
    assert len(raw) == HEADER.size + size
    return raw[HEADER.size :]


class BackendLink:
    """Hands Messages straight to a VhostUserBackend (fds are duplicated: it owns what it gets)."""

    def __init__(self, backend: VhostUserBackend):
        self.backend = backend

    def exchange(self, req, flags, payload, fds, expect_reply):
        out = self.backend.handle(Message(req, VHOST_USER_VERSION | flags, payload, [os.dup(f) for f in fds]))
        if not expect_reply:
            assert out is None
            return None
        assert out is not None
        return parse_reply(req, out)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("back-end closed the connection")
        out += chunk
    return out


class SocketLink:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)

    def exchange(self, req, flags, payload, fds, expect_reply):
        data = request(req, payload, flags)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        if not expect_reply:
            return None
        header = recv_exact(self.sock, HEADER.size)
        return parse_reply(req, header + recv_exact(self.sock, HEADER.unpack(header)[2]))

    def closed_by_peer(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self):
        self.sock.close()


class Guest:
    """Guest RAM in a memfd, as QEMU or UML would share it, with the test driver's rings in it."""

    GPA = 0x4000_0000
    UVA = 0x7F12_3400_0000
    SIZE = 1 << 20
    HDR, STATUS, DATA = GPA + 0x1000, GPA + 0x1100, GPA + 0x2000

    def __init__(self, qsize: int = 16, start_idx: int = 0):
        self.fd = os.memfd_create("slimvisor-test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.SIZE)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # as QEMU's seal=on
        self.map = mmap.mmap(self.fd, self.SIZE)
        self.view = memoryview(self.map)
        self.mem = GuestMemory([Region(self.GPA, self.UVA, self.view)])
        self.qsize = qsize
        self.drv = Driver(self.mem, qsize, self.GPA, start_idx=start_idx)

    def uva(self, gpa: int) -> int:
        return gpa - self.GPA + self.UVA

    def mem_table(self) -> bytes:
        return MEM_TABLE_HEADER.pack(1, 0) + MEM_REGION.pack(self.GPA, self.SIZE, self.UVA, 0)

    def vring_addr(self, index: int = 0) -> bytes:
        lay = self.drv.layout
        return VRING_ADDR.pack(index, 0, self.uva(lay.desc), self.uva(lay.used), self.uva(lay.avail), 0)

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.view(gpa, len(data))[:] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem.view(gpa, n))

    def blk_request(self, rtype: int, sector: int, nsec: int) -> int:
        self.write(self.HDR, struct.pack("<IIQ", rtype, 0, sector))
        self.write(self.STATUS, b"\xff")
        n = nsec * SECTOR_SIZE
        return self.drv.add([(self.HDR, 16, False), (self.DATA, n, rtype == VIRTIO_BLK_T_IN), (self.STATUS, 1, True)])

    def status(self) -> int:
        return self.read(self.STATUS, 1)[0]

    def close(self):
        self.drv = self.mem = None
        self.view.release()
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


class FrontEnd:
    def __init__(self, link):
        self.link = link
        self.reply_ack = False

    def call(self, req, payload=b"", fds=(), *, ack=True):
        """Send one request; returns the reply payload of GET_* requests, and checks REPLY_ACKs."""
        need_reply = ack and self.reply_ack and req not in GETS
        flags = VHOST_USER_NEED_REPLY_MASK if need_reply else 0
        out = self.link.exchange(req, flags, payload, fds, req in GETS or need_reply)
        if need_reply:
            assert out == U64.pack(0)
            return None
        return out

    def get_u64(self, req) -> int:
        return U64.unpack(self.call(req))[0]

    def handshake(self, guest: Guest, *, event_idx: bool = True, protocol: bool = True) -> int:
        offered = self.get_u64(VHOST_USER_GET_FEATURES)
        assert offered & bit(VHOST_USER_F_PROTOCOL_FEATURES)
        features = offered if event_idx else offered & ~bit(VIRTIO_F_EVENT_IDX)
        if not protocol:
            features &= ~bit(VHOST_USER_F_PROTOCOL_FEATURES)
        self.call(VHOST_USER_SET_FEATURES, U64.pack(features))
        if protocol:
            assert self.get_u64(VHOST_USER_GET_PROTOCOL_FEATURES) == PROTOCOL_FEATURES
            want = bit(VHOST_USER_PROTOCOL_F_REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F_CONFIG)
            self.call(VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(want | bit(VHOST_USER_PROTOCOL_F_MQ)))
            self.reply_ack = True
            assert self.get_u64(VHOST_USER_GET_QUEUE_NUM) == 1
        self.call(VHOST_USER_SET_OWNER)
        self.call(VHOST_USER_SET_MEM_TABLE, guest.mem_table(), [guest.fd])
        return features

    def start_ring(self, guest: Guest, kick: int, call: int, err: int, *, base: int = 0, enable: bool = True):
        self.call(VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, guest.qsize))
        self.call(VHOST_USER_SET_VRING_BASE, VRING_STATE.pack(0, base))
        self.call(VHOST_USER_SET_VRING_ADDR, guest.vring_addr())
        self.call(VHOST_USER_SET_VRING_KICK, U64.pack(0), [kick])
        self.call(VHOST_USER_SET_VRING_CALL, U64.pack(0), [call])
        self.call(VHOST_USER_SET_VRING_ERR, U64.pack(0), [err])
        if enable:
            self.call(VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(0, 1))


def msg(req: int, payload: bytes = b"", fds=(), flags: int = 0) -> Message:
    return Message(req, VHOST_USER_VERSION | flags, payload, list(fds))


# -- the back-end driven with Messages ----------------------------------------------------------
def test_feature_negotiation(backend, device):
    fe = FrontEnd(BackendLink(backend))
    offered = fe.get_u64(VHOST_USER_GET_FEATURES)
    assert offered == device.features() | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL)
    for f in (VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC):
        assert offered & bit(f)
    fe.call(VHOST_USER_SET_FEATURES, U64.pack(bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)))
    assert backend.features == bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    assert device.acked_features == bit(VIRTIO_F_VERSION_1)
    assert not backend.vrings[0].enabled  # with protocol features, rings start disabled
    with pytest.raises(ProtocolError, match="front-end acked features 0x8000000000000000 that were not offered"):
        backend.handle(msg(VHOST_USER_SET_FEATURES, U64.pack(offered | bit(63))))


def test_without_protocol_features_rings_start_enabled(backend):
    fe = FrontEnd(BackendLink(backend))
    fe.call(VHOST_USER_SET_FEATURES, U64.pack(bit(VIRTIO_F_VERSION_1)))
    assert all(v.enabled for v in backend.vrings)


def test_protocol_features(backend):
    fe = FrontEnd(BackendLink(backend))
    assert fe.get_u64(VHOST_USER_GET_PROTOCOL_FEATURES) == PROTOCOL_FEATURES
    unoffered = PROTOCOL_FEATURES | bit(8)  # VHOST_USER_PROTOCOL_F_PAGEFAULT: no postcopy here
    with pytest.raises(ProtocolError, match=f"front-end set protocol features {unoffered:#x} that were not offered"):
        backend.handle(msg(VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(unoffered)))
    fe.call(VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(bit(VHOST_USER_PROTOCOL_F_CONFIG)))
    assert backend.protocol_features == bit(VHOST_USER_PROTOCOL_F_CONFIG)


def test_reply_ack(backend):
    # not negotiated: need_reply is ignored
    assert backend.handle(msg(VHOST_USER_SET_OWNER, flags=VHOST_USER_NEED_REPLY_MASK)) is None
    backend.handle(msg(VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(bit(VHOST_USER_PROTOCOL_F_REPLY_ACK))))
    out = backend.handle(msg(VHOST_USER_SET_OWNER, flags=VHOST_USER_NEED_REPLY_MASK))
    assert parse_reply(VHOST_USER_SET_OWNER, out) == U64.pack(0)
    assert backend.handle(msg(VHOST_USER_SET_OWNER)) is None  # only when asked
    # a request with a reply of its own answers with that, not with an ack
    out = backend.handle(msg(VHOST_USER_GET_QUEUE_NUM, flags=VHOST_USER_NEED_REPLY_MASK))
    assert parse_reply(VHOST_USER_GET_QUEUE_NUM, out) == U64.pack(1)


def test_get_config(backend, device):
    space = device.config()
    fe = FrontEnd(BackendLink(backend))
    out = fe.call(VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(0, len(space), 0) + bytes(len(space)))
    assert out == CONFIG_HEADER.pack(0, len(space), 0) + space
    assert struct.unpack_from("<Q", out, CONFIG_HEADER.size)[0] == SECTORS
    out = fe.call(VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(12, 4, 0) + bytes(4))
    assert out[CONFIG_HEADER.size :] == space[12:16]
    out = fe.call(VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(56, 8, 0) + bytes(8))  # past the end: zeros
    assert out[CONFIG_HEADER.size :] == space[56:] + bytes(8 - len(space[56:]))
    assert fe.call(VHOST_USER_SET_CONFIG, CONFIG_HEADER.pack(0, 1, 0) + b"\1") is None  # ignored
    assert device.config() == space


def test_get_queue_num(image):
    dev = BlockDevice(image, num_queues=4)
    b = VhostUserBackend(dev)
    try:
        assert FrontEnd(BackendLink(b)).get_u64(VHOST_USER_GET_QUEUE_NUM) == 4
        assert len(b.vrings) == 4
    finally:
        b.close()
        dev.close()


def test_set_backend_req_fd(backend, eventfds):
    backend.handle(msg(VHOST_USER_SET_BACKEND_REQ_FD, fds=[os.dup(eventfds[0])]))
    first = backend.backend_req_fd
    assert fd_is_open(first)
    backend.handle(msg(VHOST_USER_SET_BACKEND_REQ_FD, fds=[os.dup(eventfds[1])]))
    assert backend.backend_req_fd >= 0
    backend.close()
    assert backend.backend_req_fd == -1


MEM1 = MEM_TABLE_HEADER.pack(1, 0) + MEM_REGION.pack(0, 4096, 0, 0)


@pytest.mark.parametrize(
    "req, payload, nfds, why",
    [
        (VHOST_USER_GET_FEATURES, b"\0", 0, "GET_FEATURES: payload of 1 bytes, expected 0"),
        (VHOST_USER_GET_FEATURES, b"", 1, "GET_FEATURES: 1 file descriptors, expected at most 0"),
        (VHOST_USER_SET_FEATURES, b"\0" * 4, 0, "SET_FEATURES: payload of 4 bytes, expected 8"),
        (VHOST_USER_SET_FEATURES, b"\0" * 9, 0, "SET_FEATURES: payload of 9 bytes, expected 8"),
        (VHOST_USER_SET_PROTOCOL_FEATURES, b"", 0, "SET_PROTOCOL_FEATURES: payload of 0 bytes, expected 8"),
        (VHOST_USER_SET_OWNER, b"x", 0, "SET_OWNER: payload of 1 bytes, expected 0"),
        (VHOST_USER_GET_QUEUE_NUM, b"\0" * 8, 0, "GET_QUEUE_NUM: payload of 8 bytes, expected 0"),
        (VHOST_USER_SET_VRING_NUM, b"\0" * 4, 0, "SET_VRING_NUM: payload of 4 bytes, expected 8"),
        (VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 0), 0, "SET_VRING_NUM: bad queue size 0"),
        (VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 3), 0, "SET_VRING_NUM: bad queue size 3"),
        (VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 2048), 0, "SET_VRING_NUM: bad queue size 2048"),
        (VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(1, 16), 0, "vring index 1 out of range (device has 1)"),
        (VHOST_USER_SET_VRING_ADDR, b"\0" * (VRING_ADDR.size - 1), 0, "payload of 39 bytes, expected 40"),
        (VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(7, 0, 0, 0, 0, 0), 0, "vring index 7 out of range (device has 1)"),
        (VHOST_USER_SET_VRING_BASE, b"\0" * 12, 0, "SET_VRING_BASE: payload of 12 bytes, expected 8"),
        (VHOST_USER_GET_VRING_BASE, b"", 0, "GET_VRING_BASE: payload of 0 bytes, expected 8"),
        (VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(255, 0), 0, "vring index 255 out of range (device has 1)"),
        (VHOST_USER_SET_VRING_ENABLE, b"", 0, "SET_VRING_ENABLE: payload of 0 bytes, expected 8"),
        (VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(0, 2), 0, "SET_VRING_ENABLE: bad value 2"),
        (VHOST_USER_SET_VRING_KICK, U64.pack(0), 0, "SET_VRING_KICK: fd presence does not match the NOFD"),
        (VHOST_USER_SET_VRING_KICK, U64.pack(VHOST_USER_VRING_NOFD_MASK), 0, "without an fd (polling mode) is not"),
        (VHOST_USER_SET_VRING_CALL, U64.pack(VHOST_USER_VRING_NOFD_MASK), 1, "CALL: fd presence does not match"),
        (VHOST_USER_SET_VRING_CALL, U64.pack(0x200), 1, "SET_VRING_CALL: unknown bits in 0x200"),  # unknown bits
        (VHOST_USER_SET_VRING_ERR, U64.pack(5), 1, "vring index 5 out of range (device has 1)"),  # no such ring
        (VHOST_USER_SET_VRING_CALL, U64.pack(0), 2, "SET_VRING_CALL: 2 file descriptors, expected at most 1"),
        (VHOST_USER_SET_MEM_TABLE, b"\0" * 4, 0, "SET_MEM_TABLE: short payload"),
        (VHOST_USER_SET_MEM_TABLE, MEM_TABLE_HEADER.pack(0, 0), 0, "SET_MEM_TABLE: 0 regions with 0 fds"),
        (VHOST_USER_SET_MEM_TABLE, MEM1, 0, "SET_MEM_TABLE: 1 regions with 0 fds"),  # a region without its fd
        (VHOST_USER_SET_MEM_TABLE, MEM1, 2, "SET_MEM_TABLE: 1 regions with 2 fds"),
        (VHOST_USER_SET_MEM_TABLE, MEM1[:-1], 1, "SET_MEM_TABLE: payload shorter than its regions"),
        (VHOST_USER_SET_MEM_TABLE, MEM_TABLE_HEADER.pack(9, 0) + MEM_REGION.pack(0, 1, 0, 0) * 9, 8, "9 regions"),
        (VHOST_USER_SET_BACKEND_REQ_FD, b"", 0, "SET_BACKEND_REQ_FD without an fd"),
        (VHOST_USER_GET_CONFIG, b"\0" * 8, 0, "GET_CONFIG: short payload"),
        (VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(0, 4, 0) + bytes(3), 0, "GET_CONFIG: bad config range 0+4"),
        (VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(0, 257, 0) + bytes(257), 0, "GET_CONFIG: bad config range 0+257"),
        (VHOST_USER_GET_CONFIG, CONFIG_HEADER.pack(1000, 4, 0) + bytes(4), 0, "GET_CONFIG: bad config range 1000+4"),
        (VHOST_USER_RESET_DEVICE, b"\0", 0, "RESET_DEVICE: payload of 1 bytes, expected 0"),
    ],
)
def test_malformed_requests(backend, req, payload, nfds, why):
    fds = [os.eventfd(0) for _ in range(nfds)]
    with pytest.raises(ProtocolError, match=re.escape(why)):
        backend.handle(msg(req, payload, fds))
    assert not any(fd_is_open(fd) for fd in fds)  # whatever came with it is closed


@pytest.mark.parametrize("req", [0, 9999, 0xFFFFFFFF, VHOST_USER_GET_MAX_MEM_SLOTS, 23])
def test_unknown_request(backend, req):
    fd = os.eventfd(0)
    with pytest.raises(ProtocolError, match=r"^unsupported vhost-user request: (request \d+|[A-Z_]+)$"):
        backend.handle(msg(req, b"\0" * 8, [fd]))
    assert not fd_is_open(fd)


def test_mem_table_beyond_the_memfd(backend, guest):
    bad = MEM_TABLE_HEADER.pack(1, 0) + MEM_REGION.pack(0, guest.SIZE + 4096, 0, 0)
    with pytest.raises(ProtocolError, match=r"memory region 0x0\+0x101000 is beyond the end of its file \(0x100000\)"):
        backend.handle(msg(VHOST_USER_SET_MEM_TABLE, bad, [os.dup(guest.fd)]))
    overlapping = MEM_TABLE_HEADER.pack(2, 0) + MEM_REGION.pack(0, 8192, 0, 0) + MEM_REGION.pack(4096, 8192, 1 << 30, 0)
    with pytest.raises(ProtocolError, match="overlapping regions at 0x1000"):
        backend.handle(msg(VHOST_USER_SET_MEM_TABLE, overlapping, [os.dup(guest.fd), os.dup(guest.fd)]))
    assert backend.mem.regions == []


def test_mem_table_maps_the_memfd(backend, guest):
    backend.handle(msg(VHOST_USER_SET_MEM_TABLE, guest.mem_table(), [os.dup(guest.fd)]))
    guest.write(guest.GPA + 100, b"shared!")
    assert bytes(backend.mem.view(guest.GPA + 100, 7)) == b"shared!"
    assert backend.mem.user_to_guest(guest.UVA + 5) == guest.GPA + 5


def _request_served(backend, guest, kick_index=0):
    """One read of sectors 2..3 through the ring; returns what the driver saw."""
    head = guest.blk_request(VIRTIO_BLK_T_IN, 2, 2)
    backend.kick(kick_index)
    used = guest.drv.used()
    assert used == [(head, 2 * SECTOR_SIZE + 1)]
    assert guest.status() == VIRTIO_BLK_S_OK
    assert guest.read(guest.DATA, 2 * SECTOR_SIZE) == image_bytes()[2 * SECTOR_SIZE : 4 * SECTOR_SIZE]


@pytest.mark.parametrize("event_idx", [False, True])
def test_block_request_end_to_end(backend, guest, eventfds, event_idx):
    kick, call, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    features = fe.handshake(guest, event_idx=event_idx)
    assert bool(features & bit(VIRTIO_F_EVENT_IDX)) == event_idx
    fe.start_ring(guest, kick, call, err, enable=False)
    assert backend.kick_fds() == {}  # not enabled yet
    fe.call(VHOST_USER_SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
    assert list(backend.kick_fds().values()) == [0]
    assert backend.vrings[0].queue.event_idx == event_idx
    drain_eventfd(call)  # an interrupt on start is allowed
    _request_served(backend, guest)
    assert readable(call)  # the driver is interrupted
    drain_eventfd(call)
    # a write, then reading it back
    guest.write(guest.DATA, b"\x42" * SECTOR_SIZE)
    head = guest.blk_request(VIRTIO_BLK_T_OUT, 5, 1)
    backend.kick(0)
    assert guest.drv.used() == [(head, 1)] and guest.status() == VIRTIO_BLK_S_OK
    assert readable(call)
    assert os.pread(backend.device.fd, SECTOR_SIZE, 5 * SECTOR_SIZE) == b"\x42" * SECTOR_SIZE
    assert not readable(err) and backend.broken is None


def test_no_interrupt_when_the_driver_says_so(backend, guest, eventfds):
    kick, call, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest, event_idx=False)
    fe.start_ring(guest, kick, call, err)
    drain_eventfd(call)
    guest.drv.avail_flags = 1  # VIRTQ_AVAIL_F_NO_INTERRUPT
    _request_served(backend, guest)
    assert not readable(call)


def test_a_quiet_queue_is_interrupted_at_once_a_busy_one_at_the_end_of_the_loop_turn(device, guest, eventfds):
    kick, call, err = eventfds
    server = VhostUserServer()
    backend = VhostUserBackend(device, loop=server)
    try:
        fe = FrontEnd(BackendLink(backend))
        fe.handshake(guest, event_idx=False)
        fe.start_ring(guest, kick, call, err)
        _request_served(backend, guest)  # an interrupt was asked for: the queue is not quiet
        server.run_once(0)
        drain_eventfd(call)
        backend.irq_quiet = 3600.0  # nothing is quiet now: every interrupt waits for the loop
        _request_served(backend, guest)
        assert not readable(call)  # served, and the interrupt waits for the end of the loop turn
        _request_served(backend, guest)
        server.run_once(0)
        assert drain_eventfd(call) == 1  # one for both requests
        backend.irq_quiet = 0.0  # every queue is quiet now: no waiting for the loop
        _request_served(backend, guest)
        assert drain_eventfd(call) == 1
        server.run_once(0)
        assert not readable(call)  # and nothing more at the end of the turn
    finally:
        backend.close()
        server.close()


def test_queued_requests_served_when_ring_starts(backend, guest, eventfds):
    kick, call, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    head = guest.blk_request(VIRTIO_BLK_T_IN, 0, 1)  # made available before the ring runs
    fe.start_ring(guest, kick, call, err)
    assert guest.drv.used() == [(head, SECTOR_SIZE + 1)]
    assert readable(call)


def test_vring_base_round_trip_and_remap(backend, guest, eventfds):
    kick, call, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    fe.start_ring(guest, kick, call, err)
    for _ in range(3):
        _request_served(backend, guest)
    # SET_MEM_TABLE again while running: the queue restarts where it was
    fe.call(VHOST_USER_SET_MEM_TABLE, guest.mem_table(), [guest.fd])
    _request_served(backend, guest)
    # GET_VRING_BASE stops the ring and says where to resume
    assert fe.call(VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(0, 0)) == VRING_STATE.pack(0, 4)
    assert backend.kick_fds() == {} and backend.vrings[0].queue is None
    head = guest.blk_request(VIRTIO_BLK_T_IN, 0, 1)
    backend.kick(0)
    assert guest.drv.used() == []  # stopped
    fe.start_ring(guest, kick, call, err, base=4)
    assert guest.drv.used() == [(head, SECTOR_SIZE + 1)]


def test_new_kick_fd_keeps_the_ring_position(backend, guest, eventfds):
    """SET_VRING_KICK on a running ring swaps the fd; it must not rewind last_avail_idx.

    Rewinding to the SET_VRING_BASE value makes the device serve old available entries again:
    requests already completed are re-executed (a stale write hits the disk once more) and their
    heads come back as used a second time while the driver may have reused those descriptors.
    """
    kick, call, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    fe.start_ring(guest, kick, call, err)
    for _ in range(2):
        _request_served(backend, guest)
    kick2 = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fe.call(VHOST_USER_SET_VRING_KICK, U64.pack(0), [kick2])  # serves anything pending
        assert guest.drv.used() == [], "completed requests were served a second time"
        assert backend.vrings[0].queue.last_avail_idx == 2
        _request_served(backend, guest)
    finally:
        os.close(kick2)


def test_guest_error_stops_the_device_until_reset(backend, guest, eventfds):
    kick, call, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    fe.start_ring(guest, kick, call, err)
    guest.drv.add([(guest.GPA + guest.SIZE, 16, False), (guest.STATUS, 1, True)])  # outside guest RAM
    backend.kick(0)  # must not raise
    assert backend.broken and readable(err)
    guest.drv.free = list(range(guest.qsize))
    head = guest.blk_request(VIRTIO_BLK_T_IN, 0, 1)
    backend.kick(0)
    assert guest.drv.used() == []  # ignored while broken
    fe.call(VHOST_USER_RESET_DEVICE)
    assert backend.broken is None and backend.kick_fds() == {}
    # the driver starts over on fresh rings
    guest.drv = Driver(guest.mem, guest.qsize, guest.GPA)
    fe.handshake(guest)
    fe.start_ring(guest, kick, call, err)
    head = guest.blk_request(VIRTIO_BLK_T_IN, 0, 1)
    backend.kick(0)
    assert guest.drv.used() == [(head, SECTOR_SIZE + 1)]


def test_ring_outside_memory_breaks_instead_of_raising(backend, guest, eventfds):
    kick, _, err = eventfds
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    fe.call(VHOST_USER_SET_VRING_NUM, VRING_STATE.pack(0, 16))
    fe.call(VHOST_USER_SET_VRING_ADDR, VRING_ADDR.pack(0, 0, 0x1000, 0x2000, 0x3000, 0))  # not UVAs
    fe.call(VHOST_USER_SET_VRING_ERR, U64.pack(0), [err])
    fe.call(VHOST_USER_SET_VRING_KICK, U64.pack(0), [kick])
    assert backend.broken and backend.vrings[0].queue is None
    assert readable(err)


# -- the server over a real socket --------------------------------------------------------------
class Served:
    """A Server with one BlockDevice, run_once-looping in a thread until stopped."""

    def __init__(self, image: str):
        self.dir = tempfile.mkdtemp(prefix="svt-", dir="/tmp")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "blk.sock")
        self.server = VhostUserServer()
        self.server.add(BlockDevice(image), listen_unix(self.path), "blk0", self.path)
        self.stop = threading.Event()
        self.loops = 0
        self.errors: list[BaseException] = []
        self.links: list[SocketLink] = []
        self.thread = threading.Thread(target=self._run, name="vhost-user-server", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set():
                self.server.run_once(0.05)
                self.loops += 1
        except BaseException as e:  # the test checks this list
            self.errors.append(e)

    def connect(self) -> SocketLink:
        link = SocketLink(self.path)
        self.links.append(link)
        return link

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.errors

    def shutdown(self):
        self.stop.set()
        self.thread.join(5)
        for link in self.links:
            link.close()
        if not self.thread.is_alive():
            self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def served(image):
    before = open_fds()
    s = Served(image)
    yield s
    s.shutdown()
    assert not s.thread.is_alive()
    assert not s.errors
    assert not os.path.exists(s.path)
    assert open_fds() == before, "the server leaked file descriptors"


def wait_readable(fd: int) -> bool:
    return readable(fd, timeout=5)


def socket_request(guest: Guest, kick: int, call: int) -> None:
    head = guest.blk_request(VIRTIO_BLK_T_IN, 2, 2)
    os.eventfd_write(kick, 1)
    assert wait_readable(call)
    drain_eventfd(call)
    assert guest.drv.used() == [(head, 2 * SECTOR_SIZE + 1)]
    assert guest.status() == VIRTIO_BLK_S_OK
    assert guest.read(guest.DATA, 2 * SECTOR_SIZE) == image_bytes()[2 * SECTOR_SIZE : 4 * SECTOR_SIZE]


def fresh_session_works(served: Served) -> None:
    g = Guest()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        link = served.connect()
        fe = FrontEnd(link)
        fe.handshake(g)
        fe.start_ring(g, *fds)
        drain_eventfd(fds[1])
        socket_request(g, fds[0], fds[1])
        link.close()
    finally:
        for fd in fds:
            os.close(fd)
        g.close()


def test_socket_end_to_end(served):
    fresh_session_works(served)
    fresh_session_works(served)  # a front-end may reconnect (UML does after a reboot)
    assert served.alive()


def _garbage(link: SocketLink):
    link.sock.sendall(b"\xde\xad\xbe\xef" * 3)


def _truncated_header(link: SocketLink):
    link.sock.sendall(request(VHOST_USER_GET_FEATURES)[:5])
    link.sock.shutdown(socket.SHUT_WR)


def _truncated_payload(link: SocketLink):
    link.sock.sendall(request(VHOST_USER_SET_FEATURES, U64.pack(0))[:15])
    link.sock.shutdown(socket.SHUT_WR)


def _unknown_request(link: SocketLink):
    link.sock.sendall(request(9999, b"\0" * 8))


def _oversize(link: SocketLink):
    link.sock.sendall(HEADER.pack(VHOST_USER_SET_CONFIG, VHOST_USER_VERSION, MAX_PAYLOAD + 1))


def _reply_flag(link: SocketLink):
    link.sock.sendall(HEADER.pack(VHOST_USER_GET_FEATURES, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 0))


def _fds_where_none_belong(link: SocketLink):
    fds = [os.eventfd(0) for _ in range(3)]
    socket.send_fds(link.sock, [request(VHOST_USER_GET_FEATURES)], fds)
    for fd in fds:
        os.close(fd)


def _bad_mem_table(link: SocketLink):
    fd = os.memfd_create("tiny")
    os.ftruncate(fd, 4096)
    socket.send_fds(
        link.sock,
        [request(VHOST_USER_SET_MEM_TABLE, MEM_TABLE_HEADER.pack(1, 0) + MEM_REGION.pack(0, 1 << 30, 0, 0))],
        [fd],
    )
    os.close(fd)


def _err_fd_read_only_then_kick(link: SocketLink):
    """The issue's reproducer: an err fd nobody can write (O_RDONLY /dev/null), then a kick."""
    fd = os.open("/dev/null", os.O_RDONLY)
    socket.send_fds(link.sock, [request(VHOST_USER_SET_VRING_ERR, U64.pack(0))], [fd])
    os.close(fd)
    kick = os.eventfd(0)
    try:  # the back-end may have hung up already
        socket.send_fds(link.sock, [request(VHOST_USER_SET_VRING_KICK, U64.pack(0))], [kick])
    except BrokenPipeError:
        pass
    finally:
        os.close(kick)


def _kick_fd_regular_file(link: SocketLink):
    """A regular file as kick fd: epoll would refuse it (EPERM) when the ring starts."""
    fd = os.memfd_create("not-an-eventfd")
    socket.send_fds(link.sock, [request(VHOST_USER_SET_VRING_KICK, U64.pack(0))], [fd])
    os.close(fd)


def _call_fd_read_end_of_a_pipe(link: SocketLink):
    r, w = os.pipe()
    socket.send_fds(link.sock, [request(VHOST_USER_SET_VRING_CALL, U64.pack(0))], [r])
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(
    "attack",
    [
        _err_fd_read_only_then_kick,
        _kick_fd_regular_file,
        _call_fd_read_end_of_a_pipe,
        _garbage,
        _truncated_header,
        _truncated_payload,
        _unknown_request,
        _oversize,
        _reply_flag,
        _fds_where_none_belong,
        _bad_mem_table,
    ],
)
@pytest.mark.parametrize("after_handshake", [False, True])
def test_socket_misbehaving_front_end(served, attack, after_handshake):
    g = Guest()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        link = served.connect()
        if after_handshake:
            fe = FrontEnd(link)
            fe.handshake(g)
            fe.start_ring(g, *fds)
        attack(link)
        assert link.closed_by_peer(), "the back-end kept a misbehaving front-end connected"
        link.close()
    finally:
        for fd in fds:
            os.close(fd)
        g.close()
    assert served.alive()
    fresh_session_works(served)
    assert served.alive()


def test_socket_second_front_end_refused_while_one_is_connected(served):
    first = served.connect()
    fe = FrontEnd(first)
    assert fe.get_u64(VHOST_USER_GET_QUEUE_NUM) == 1  # the server has accepted `first`
    second = served.connect()
    assert second.closed_by_peer()
    assert fe.get_u64(VHOST_USER_GET_QUEUE_NUM) == 1  # the first one is undisturbed
    first.close()
    fresh_session_works(served)


def test_socket_disconnect_mid_message_then_reconnect(served):
    link = served.connect()
    fd = os.eventfd(0)
    socket.send_fds(link.sock, [request(VHOST_USER_SET_VRING_CALL, U64.pack(0))[:14]], [fd])
    os.close(fd)
    link.sock.shutdown(socket.SHUT_WR)  # the eventfd sent with the unfinished message must be closed
    assert link.closed_by_peer()
    fresh_session_works(served)


def _wait_for_loop_turns(served: Served, turns: int) -> None:
    """Until the server's loop has completed `turns` more turns (each runs at most 0.05 s idle)."""
    until = served.loops + turns
    deadline = time.monotonic() + 10
    while served.loops < until:
        assert time.monotonic() < deadline and served.alive(), "the server loop stopped turning"
        time.sleep(0.01)


def _idle_loops(served: Served, seconds: float = 0.4) -> int:
    """How many turns the server's loop makes in `seconds` (a rate: the sleep is the window)."""
    start = served.loops
    time.sleep(seconds)
    return served.loops - start


@pytest.mark.parametrize("how", ["disconnect", "get_vring_base", "new_kick_fd", "reset_device"])
def test_server_does_not_spin_on_a_stale_kick_fd(served, how):
    """After the back-end lets go of a kick fd, kicks on it must not wake the server any more.

    run_once(0.05) loops ~20 times a second when idle. If the epoll registration of a kick fd
    outlives the fd (it does when the fd is closed before it is unregistered, and the front-end
    still holds its copy), a pending kick makes epoll_wait return at once, forever: a busy loop.
    """
    g = Guest()
    kick, call, err, kick2 = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4))
    try:
        link = served.connect()
        fe = FrontEnd(link)
        fe.handshake(g)
        fe.start_ring(g, kick, call, err)
        drain_eventfd(call)
        socket_request(g, kick, call)
        if how == "disconnect":
            link.sock.shutdown(socket.SHUT_WR)
            assert link.closed_by_peer()
        elif how == "get_vring_base":
            assert fe.call(VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(0, 0)) == VRING_STATE.pack(0, 1)
        elif how == "new_kick_fd":
            fe.call(VHOST_USER_SET_VRING_KICK, U64.pack(0), [kick2])
        else:
            fe.call(VHOST_USER_RESET_DEVICE)
        _wait_for_loop_turns(served, 2)  # the turn that handled it has ended, and one more
        os.eventfd_write(kick, 1)  # the front-end kicks its old eventfd
        loops = _idle_loops(served)
        assert loops < 100, f"server loop ran {loops} times in 0.4 s: it is spinning on a stale kick fd"
        link.close()
    finally:
        for fd in (kick, call, err, kick2):
            os.close(fd)
        g.close()
    assert served.alive()


def test_listen_unix_refuses_a_live_socket_and_replaces_a_stale_one():
    d = tempfile.mkdtemp(prefix="svt-", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        live = listen_unix(path)
        with pytest.raises(FileExistsError, match="another backend is already listening there"):
            listen_unix(path)
        live.close()  # the file stays behind: stale
        assert os.path.exists(path)
        again = listen_unix(path)
        again.close()
    finally:
        shutil.rmtree(d)


def test_server_close_without_connections(image):
    d = tempfile.mkdtemp(prefix="svt-", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        server = VhostUserServer()
        server.add(BlockDevice(image), listen_unix(path), "blk0", path)
        server.run_once(0)
        server.close()
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(d)


def test_event_loop_readers_writers_timers_and_a_reused_fd_number():
    """The loop's own bookkeeping: both directions of one fd, a callback that raises (logged, the
    loop goes on), and an fd closed without being unwatched whose number comes back."""
    server = VhostUserServer()
    r, w = os.pipe()
    seen: list[str] = []
    try:
        server.add_reader(r, lambda: seen.append(os.read(r, 8).decode()))
        server.add_writer(w, lambda: seen.append("writable"))
        server.run_once(0)
        assert seen == ["writable"]
        server.remove_writer(w)
        os.write(w, b"x")
        server.call_soon(lambda: 1 / 0)  # a device bug: logged, not raised
        server.call_later(0, lambda: seen.append("timer"))
        server.run_once(0)
        assert seen == ["writable", "x", "timer"]
        assert server.watching(r) and not server.watching(w)
        os.close(r)  # closed while watched: epoll forgets it, the loop does not know yet
        r2, w2 = os.pipe()
        assert r2 == r  # the number is reused
        server.add_reader(r2, lambda: seen.append("again " + os.read(r2, 8).decode()))
        os.write(w2, b"y")
        server.run_once(0)
        assert seen[-1] == "again y"
        server.remove_reader(r2)
        os.close(r2)
        os.close(w2)
    finally:
        os.close(w)
        server.close()
    assert server.closed


# -- the drain budget ----------------------------------------------------------------------------
BUF = Guest.GPA + 0x80000  # past the rings of even a 1024-entry queue


def _rng_ring(server: VhostUserServer, qsize: int):
    """An rng device served on `server`'s loop, its ring started, its kick fd watched."""
    from slimvisor.devices.rng import RngDevice

    g = Guest(qsize=qsize)
    kick, call, err = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    backend = VhostUserBackend(RngDevice(), loop=server)
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(g)
    fe.start_ring(g, kick, call, err)
    server.add_reader(kick, lambda: (drain_eventfd(kick), backend.kick(0)))
    return g, backend, (kick, call, err)


def test_a_flooding_queue_takes_one_budget_per_loop_turn_and_the_others_get_theirs():
    """One driver posts a full ring of 1024 requests, another one request, both kick: the lone
    request is served in the first loop turn, and the flood goes on 64 chains a turn (fair
    round-robin through the loop), never all in one call."""
    from slimvisor.virtio.device import DRAIN_BUDGET_CHAINS

    server = VhostUserServer()
    flood, quiet = _rng_ring(server, 1024), _rng_ring(server, 16)
    try:
        (fg, fb, ffds), (qg, qb, qfds) = flood, quiet
        for _ in range(1024):
            fg.drv.add([(BUF, 16, True)])
        head = qg.drv.add([(BUF, 16, True)])
        os.eventfd_write(ffds[0], 1)
        os.eventfd_write(qfds[0], 1)
        server.run_once(0)
        assert qg.drv.used() == [(head, 16)]
        served = [len(fg.drv.used())]
        for _ in range(1024 // DRAIN_BUDGET_CHAINS - 1):
            server.run_once(0)
            served.append(len(fg.drv.used()))
        assert served == [DRAIN_BUDGET_CHAINS] * (1024 // DRAIN_BUDGET_CHAINS)
        server.run_once(0)
        assert not fb._resumes and fb.broken is None and qb.broken is None
        # a kick while the flood is being resumed still gets the quiet queue served in one turn
        for _ in range(200):
            fg.drv.add([(BUF, 16, True)])
        os.eventfd_write(ffds[0], 1)
        server.run_once(0)
        head = qg.drv.add([(BUF, 16, True)])
        os.eventfd_write(qfds[0], 1)
        server.run_once(0)
        assert qg.drv.used() == [(head, 16)]
        assert len(fg.drv.used()) == 2 * DRAIN_BUDGET_CHAINS
    finally:
        for g, b, fds in (flood, quiet):
            server.remove_reader(fds[0])
            b.close()
            g.close()
            for fd in fds:
                os.close(fd)
        server.close()


def test_without_a_loop_a_kick_serves_the_whole_ring(guest):
    """Driven directly (no loop to share), a kick still serves everything that is available."""
    from slimvisor.devices.rng import RngDevice

    g = Guest(qsize=256)
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    backend = VhostUserBackend(RngDevice())
    try:
        fe = FrontEnd(BackendLink(backend))
        fe.handshake(g)
        fe.start_ring(g, *fds)
        for _ in range(256):
            g.drv.add([(BUF, 16, True)])
        backend.kick(0)
        assert len(g.drv.used()) == 256
    finally:
        backend.close()
        g.close()
        for fd in fds:
            os.close(fd)


def _one_end(which: int) -> int:
    ends = os.pipe()
    os.close(ends[1 - which])
    return ends[which]


@pytest.mark.parametrize(
    ("req", "opener", "why"),
    [
        (VHOST_USER_SET_VRING_ERR, lambda: os.open("/dev/null", os.O_RDONLY), "not an eventfd"),
        (VHOST_USER_SET_VRING_CALL, lambda: os.open("/dev/null", os.O_WRONLY), "not an eventfd"),
        (VHOST_USER_SET_VRING_KICK, lambda: os.memfd_create("f"), "not an eventfd"),
        (VHOST_USER_SET_VRING_KICK, lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY), "not an eventfd"),
        (VHOST_USER_SET_VRING_CALL, lambda: _one_end(0), "pipe is not open for writing"),
        (VHOST_USER_SET_VRING_KICK, lambda: _one_end(1), "pipe is not open for reading"),
    ],
)
def test_vring_fds_must_be_eventfds_or_pipes_open_the_right_way(backend, guest, req, opener, why):
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    fd = opener()
    with pytest.raises(ProtocolError, match=why):
        backend.handle(msg(req, U64.pack(0), [fd]))
    assert not fd_is_open(fd)  # the refused fd is closed with its message


def test_vring_fds_that_are_accepted(backend, guest):
    """eventfds for everything; a socketpair end for call (UML), a pipe's write end for err, the
    read end for kick."""
    fe = FrontEnd(BackendLink(backend))
    fe.handshake(guest)
    r, w = os.pipe()
    a, b = socket.socketpair()
    backend.handle(msg(VHOST_USER_SET_VRING_CALL, U64.pack(0), [a.detach()]))
    b.close()
    backend.handle(msg(VHOST_USER_SET_VRING_ERR, U64.pack(0), [w]))
    backend.handle(msg(VHOST_USER_SET_VRING_KICK, U64.pack(0), [r]))
    assert backend.vrings[0].err == w and backend.vrings[0].kick == r


# -- guest memory must be sealed against shrinking -----------------------------------------------
def _unsealed_memfd() -> int:
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, Guest.SIZE)
    return fd


def _memfd_that_cannot_be_sealed() -> int:
    fd = os.memfd_create("unsealable")  # without MFD_ALLOW_SEALING: F_SEAL_SEAL from the start
    os.ftruncate(fd, Guest.SIZE)
    return fd


def _tmpfile() -> int:
    """What UML shares: an O_TMPFILE (on tmpfs it has F_SEAL_SEAL; elsewhere no seals at all)."""
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.ftruncate(fd, Guest.SIZE)
    return fd


@pytest.mark.parametrize("make", [_unsealed_memfd, _memfd_that_cannot_be_sealed, _tmpfile])
def test_memory_not_sealed_against_shrinking_is_refused(device, make):
    """A front-end that truncates a mapped file kills the backend with SIGBUS: refuse the file."""
    backend = VhostUserBackend(device)
    fd = make()
    try:
        table = MEM_TABLE_HEADER.pack(1, 0) + MEM_REGION.pack(Guest.GPA, Guest.SIZE, Guest.UVA, 0)
        with pytest.raises(ProtocolError, match="region 0's memory file is not sealed against shrinking"):
            backend.handle(msg(VHOST_USER_SET_MEM_TABLE, table, [os.dup(fd)]))
        assert backend.mem.regions == []
        # a backend told its front-end cannot shrink memory (a jailed UML) maps it
        trusting = VhostUserBackend(device, unsealed_memory=True)
        trusting.handle(msg(VHOST_USER_SET_MEM_TABLE, table, [os.dup(fd)]))
        assert [r.size for r in trusting.mem.regions] == [Guest.SIZE]
        trusting.close()
    finally:
        backend.close()
        os.close(fd)


def test_sealed_memory_is_mapped_and_cannot_shrink(backend, guest):
    FrontEnd(BackendLink(backend)).handshake(guest)
    assert [r.size for r in backend.mem.regions] == [Guest.SIZE]
    with pytest.raises(PermissionError, match="Operation not permitted"):
        os.ftruncate(guest.fd, 4096)  # what the seal buys: the front-end cannot pull pages away


def test_a_truncated_unsealed_memory_file_kills_a_process_with_sigbus(tmp_path):
    """Why the seal is required: shown in a child process, since SIGBUS cannot be survived."""
    code = (
        "import os, mmap; fd = os.memfd_create('m'); os.ftruncate(fd, 65536);"
        "m = mmap.mmap(fd, 65536); os.ftruncate(fd, 0); m[0]"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGBUS
