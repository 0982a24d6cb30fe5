"""virtio-vsock (5.10): a test guest on real split rings, the device on a real event loop, and
real Unix sockets for the host side, as Firecracker maps them (`CONNECT <port>`, `<uds>_<port>`).

The `rig` fixture runs the device on an EventLoop that calls both of an fd's callbacks whenever it is
ready, so the device must bear wake-ups it did not ask for; the tests that build a `Rig` directly
use slimvisor's EventLoop as it is.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimvisor.devices.vsock import (
    EVENT_QUEUE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_F_STREAM,
)
from slimvisor.devices.vsock_muxer import (
    CONN_BUF_ALLOC,
    LOCAL_PORT_MIN,
    MAX_RST_QUEUE,
    MAX_TO_GUEST,
    U32,
    VIRTIO_VSOCK_HDR_SIZE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_SEQPACKET,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
    Muxer,
    State,
    parse_connect,
)
from slimvisor.devices.vsock_unix import unix_vsock
from slimvisor.runtime.loop import EventLoop
from slimvisor.vhostuser.backend import VhostUserBackend
from slimvisor.virtio.device import COMMON_FEATURES
from slimvisor.virtio.queue import SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_VSOCK, bit
from tests.vring import Driver, GuardedMemory

CID = 7
GUEST_BUF = 64 * 1024  # what the test guest advertises unless told otherwise
BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
RINGS, RXBUF, TXBUF, EVBUF = 0x0, 0x100000, 0x200000, 0x400000
RX_Q, TX_Q, EV_Q = 64, 16, 4
RX_SLOT, TX_SLOT = VIRTIO_VSOCK_HDR_SIZE + 4096, 0x10100  # Linux's rx buffers; a 64 KiB packet


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def hdr(op: int, src_port: int, dst_port: int, payload: bytes = b"", **over: int) -> Header:
    """A packet from the test guest: to the host, stream type, its own credit unless overridden."""
    fields = dict(
        src_cid=CID, dst_cid=VMADDR_CID_HOST, src_port=src_port, dst_port=dst_port, len=len(payload),
        type=VIRTIO_VSOCK_TYPE_STREAM, op=op, flags=0, buf_alloc=GUEST_BUF, fwd_cnt=0,
    )  # fmt: skip
    fields.update(over)
    return Header(**fields)


class WriterServer(EventLoop):
    """slimvisor's EventLoop, except that a ready fd gets both its callbacks called whatever the
    event mask says: the device must also bear wake-ups it did not ask for."""

    def __init__(self) -> None:
        super().__init__()
        self.io: dict[int, list[Callable[[], None] | None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._set(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, 0, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._set(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, 1, None)

    def _set(self, fd: int, which: int, callback: Callable[[], None] | None) -> None:
        cbs = self.io.setdefault(fd, [None, None])
        cbs[which] = callback
        fire = partial(self._fire, fd)
        for wanted, add, remove in ((cbs[0], super().add_reader, super().remove_reader),
                                    (cbs[1], super().add_writer, super().remove_writer)):  # fmt: skip
            if wanted is not None:
                add(fd, fire)
            else:
                remove(fd)
        if cbs == [None, None]:
            del self.io[fd]

    def _fire(self, fd: int) -> None:
        for which in (0, 1):
            cb = self.io.get(fd, [None, None])[which]
            if cb is not None:
                cb()


class Rig:
    """A guest with the three vsock rings, and the Transport of the device under test."""

    def __init__(self, uds: str, *, loop: EventLoop | None = None, **dev_kw: Any) -> None:
        self.loop = loop or EventLoop()
        self.g = GuardedMemory([(RINGS, 0x4000), (RXBUF, RX_Q * RX_SLOT), (TXBUF, TX_Q * TX_SLOT), (EVBUF, 0x100)])
        self.drivers = [Driver(self.g.mem, n, RINGS + 0x1000 * i) for i, n in enumerate((RX_Q, TX_Q, EV_Q))]
        self.queues = [d.queue(event_idx=True, indirect=True) for d in self.drivers]
        self.broken: str | None = None
        self.interrupts = [0, 0, 0]
        self.uds = uds
        self.dev = unix_vsock(CID, uds, **dev_kw)
        self.dev.attach(self)

    # -- Transport ------------------------------------------------------------------------------
    def queue(self, index: int) -> SplitQueue | None:
        return None if self.broken else self.queues[index]

    def interrupt(self, index: int) -> None:
        self.interrupts[index] += 1

    def fail(self, why: str) -> None:
        self.broken = why

    def config_changed(self) -> None:
        pass

    def resume(self, index: int) -> None:
        self.loop.call_later(0.0, lambda: self.dev.serve(index))

    def discard_memory(self, addr: int, length: int) -> None:
        pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.loop.call_later(delay, callback)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        self.loop.remove_writer(fd)

    # -- the guest ------------------------------------------------------------------------------
    def kick(self, index: int) -> None:
        """What VhostUserBackend.kick does: drain, and a VirtqueueError breaks the device."""
        if self.broken:
            return
        try:
            self.dev.drain(index, self.queues[index])
        except VirtqueueError as e:
            self.broken = str(e)

    def send(self, h: Header, payload: bytes = b"") -> None:
        d = self.drivers[TX_QUEUE]
        raw = h.pack() + payload
        addr = TXBUF + d.free[0] * TX_SLOT
        self.g.write(addr, raw)
        d.add([(addr, len(raw), False)])
        self.kick(TX_QUEUE)
        d.used()

    def post_rx(self, n: int = 16, size: int = RX_SLOT) -> None:
        d = self.drivers[RX_QUEUE]
        for _ in range(n):
            d.add([(RXBUF + d.free[0] * RX_SLOT, size, True)])
        self.kick(RX_QUEUE)

    def recv(self, refill: bool = True) -> list[tuple[Header, bytes]]:
        """Packets the device delivered; their buffers go back to the ring unless told not."""
        out = []
        for head, n in self.drivers[RX_QUEUE].used():
            raw = self.g.read(RXBUF + head * RX_SLOT, n)
            h = Header.unpack(raw[:VIRTIO_VSOCK_HDR_SIZE])
            assert (h.src_cid, h.dst_cid, h.len) == (VMADDR_CID_HOST, CID, n - VIRTIO_VSOCK_HDR_SIZE)
            out.append((h, raw[VIRTIO_VSOCK_HDR_SIZE:]))
        if refill and out:
            self.post_rx(len(out))
        return out

    def run(self, until: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            self.loop.run_once(0.01)

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.loop.run_once(0.005)

    def settle(self, seconds: float = 0.05) -> list[tuple[Header, bytes]]:
        """Run the loop a while; what the guest got meanwhile."""
        self.spin(seconds)
        return self.recv()

    def expect(self, n: int = 1) -> list[tuple[Header, bytes]]:
        got: list[tuple[Header, bytes]] = []

        def enough() -> bool:
            got.extend(self.recv())
            return len(got) >= n

        self.run(enough)
        return got

    def close(self) -> None:
        self.dev.detach()
        self.dev.close()
        self.loop.close()


@pytest.fixture
def make_rig(tmp_path):
    rigs: list[Rig] = []

    def make(**dev_kw: Any) -> Rig:
        uds = str(tmp_path / f"v{len(rigs)}.sock")
        rig = Rig(uds, loop=WriterServer(), **dev_kw)
        rigs.append(rig)
        rig.post_rx(32)
        return rig

    before = fds()
    yield make
    for rig in rigs:
        rig.close()
        assert rig.g.guards_intact()
    assert fds() == before, "file descriptors leaked"


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


# -- host helpers -------------------------------------------------------------------------------
def client(rig: Rig, *lines: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(rig.uds)
    s.setblocking(False)
    for line in lines:
        s.send(line)
        rig.spin(0.01)
    return s


def read_host(rig: Rig, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()

    def done() -> bool:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf.extend(chunk)
        return len(buf) >= n

    rig.run(done)
    return bytes(buf)


def host_closed(rig: Rig, sock: socket.socket) -> bool:
    """Whether the device's end of `sock` is gone (EOF or reset, after any data)."""
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            if sock.recv(65536) == b"":
                return True
        except BlockingIOError:
            rig.loop.run_once(0.01)
        except ConnectionResetError:
            return True
    return False


def host_connection(
    rig: Rig, port: int = 52, buf_alloc: int = GUEST_BUF, tail: bytes = b""
) -> tuple[socket.socket, int]:
    """A host program's connection to guest port `port`, accepted by the guest."""
    c = client(rig, b"CONNECT %d\n" % port + tail)
    [(h, _)] = rig.expect(1)
    assert (h.op, h.type, h.dst_port, h.len) == (VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_TYPE_STREAM, port, 0)
    assert LOCAL_PORT_MIN <= h.src_port < 2 * LOCAL_PORT_MIN
    assert (h.buf_alloc, h.fwd_cnt) == (CONN_BUF_ALLOC, 0)
    rig.send(hdr(VIRTIO_VSOCK_OP_RESPONSE, port, h.src_port, buf_alloc=buf_alloc))
    ok = b"OK %d\n" % h.src_port
    assert read_host(rig, c, len(ok)) == ok
    return c, h.src_port


def guest_connection(rig: Rig, port: int = 5000, guest_port: int = 1234) -> socket.socket:
    """The guest connects to host port `port`, where a host program listens."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{rig.uds}_{port}")
    lst.listen()
    rig.send(hdr(VIRTIO_VSOCK_OP_REQUEST, guest_port, port))
    [(h, _)] = rig.expect(1)
    assert (h.op, h.src_port, h.dst_port, h.buf_alloc) == (
        VIRTIO_VSOCK_OP_RESPONSE,
        port,
        guest_port,
        rig.dev.muxer.buf_alloc,
    )
    peer, _ = lst.accept()
    peer.setblocking(False)
    lst.close()
    return peer


# -- identity -----------------------------------------------------------------------------------
def test_identity_config_and_socket(tmp_path):
    uds = str(tmp_path / "v.sock")
    dev = unix_vsock(CID, uds)
    try:
        assert (dev.device_id, VIRTIO_ID_VSOCK, dev.max_queues) == (19, 19, 3)
        assert dev.config() == CID.to_bytes(8, "little")
        assert dev.features() & bit(VIRTIO_VSOCK_F_STREAM)
        assert dev.features() & COMMON_FEATURES == COMMON_FEATURES
        assert os.path.exists(uds)
    finally:
        dev.close()
    dev.close()  # idempotent
    assert not os.path.exists(uds)


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 32])
def test_reserved_cids_refused(tmp_path, cid):
    with pytest.raises(ValueError, match=r"is reserved or too large \(3 to 4294967294\)"):
        unix_vsock(cid, str(tmp_path / "v.sock"))
    assert not os.path.exists(tmp_path / "v.sock")


def test_header_layout():
    h = Header(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert VIRTIO_VSOCK_HDR_SIZE == 44 and len(h.pack()) == 44
    assert Header.unpack(h.pack()) == h
    assert h.pack()[:8] == (1).to_bytes(8, "little") and h.pack()[-4:] == (10).to_bytes(4, "little")


@pytest.mark.parametrize(
    "line, port",
    [
        (b"CONNECT 52\n", 52), (b"connect 0\n", 0), (b"Connect 4294967295\n", U32), (b"CONNECT 7 extra\n", 7),
        (b"CONNECT 4294967296\n", None), (b"CONNECT\n", None), (b"CONNEC 5\n", None), (b"CONNECT -1\n", None),
        (b"CONNECT x\n", None), (b"CONNECT 5" + b" " * 30 + b"\n", None), (b"\n", None), (b"CONNECT \xff\n", None),
    ],
)  # fmt: skip
def test_parse_connect(line, port):
    assert parse_connect(line) == port


# -- host-initiated -----------------------------------------------------------------------------
def test_host_connects_to_guest_and_both_sides_talk(rig):
    c, local = host_connection(rig)
    c.send(b"hello")
    [(h, data)] = rig.expect(1)
    assert (h.op, h.src_port, h.dst_port, data) == (VIRTIO_VSOCK_OP_RW, local, 52, b"hello")
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 52, local, b"world"), b"world")
    assert read_host(rig, c, 5) == b"world"
    # the guest shuts its sending side: the host program reads EOF and may still send
    rig.send(hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 52, local, flags=VIRTIO_VSOCK_SHUTDOWN_SEND))
    assert host_closed(rig, c)
    c.send(b"more")
    [(h, data)] = rig.expect(1)
    assert (h.op, data) == (VIRTIO_VSOCK_OP_RW, b"more")
    # the host program closes: SHUTDOWN(SEND) to the guest, then RST (nothing flows either way)
    c.close()
    got = rig.expect(2)
    assert [(h.op, h.flags) for h, _ in got] == [
        (VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND),
        (VIRTIO_VSOCK_OP_RST, 0),
    ]
    assert rig.dev.muxer.conns == {}
    assert rig.settle() == []


def test_guest_refuses_host_connection(rig):
    c = client(rig, b"CONNECT 99\n")
    [(h, _)] = rig.expect(1)
    rig.send(hdr(VIRTIO_VSOCK_OP_RST, 99, h.src_port))
    assert host_closed(rig, c)
    c.close()
    assert rig.dev.muxer.conns == {}
    assert rig.settle() == []  # no RST answers an RST


def test_connect_line_in_pieces_and_data_right_behind_it(rig):
    c = client(rig, b"conn", b"ect 9\nearly bytes")
    [(h, _)] = rig.expect(1)
    assert h.dst_port == 9
    rig.send(hdr(VIRTIO_VSOCK_OP_RESPONSE, 9, h.src_port))
    [(h2, data)] = rig.expect(1)
    assert (h2.op, data) == (VIRTIO_VSOCK_OP_RW, b"early bytes")
    assert read_host(rig, c, 1) == b"OK %d\n" % h.src_port
    c.close()


@pytest.mark.parametrize(
    "lines", [[b"HELLO 9\n"], [b"CONNECT 9" + b"9" * 40], [b"CONNECT"], [b"CONNECT 1 2 3 4 5 6 7 8 9 10 11 12\n"]]
)
def test_bad_connect_line_closes_the_host_socket(rig, lines):
    c = client(rig, *lines)
    if lines == [b"CONNECT"]:
        c.shutdown(socket.SHUT_WR)  # EOF before the newline
    assert host_closed(rig, c)
    c.close()
    assert rig.recv() == [] and rig.dev.muxer.conns == {}


def test_request_timeout_resets_both_sides(make_rig):
    rig = make_rig(request_timeout=0.05)
    c = client(rig, b"CONNECT 3\n")
    [(h, _)] = rig.expect(1)
    assert h.op == VIRTIO_VSOCK_OP_REQUEST
    assert host_closed(rig, c)
    [(rst, _)] = rig.expect(1)
    assert (rst.op, rst.src_port, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, h.src_port, 3)
    c.close()


# -- guest-initiated ----------------------------------------------------------------------------
def test_guest_connects_to_host_listener(rig):
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, b"ping"), b"ping")
    assert read_host(rig, peer, 4) == b"ping"
    peer.send(b"pong")
    [(h, data)] = rig.expect(1)
    assert (h.op, h.src_port, h.dst_port, data) == (VIRTIO_VSOCK_OP_RW, 5000, 1234, b"pong")
    # the guest closes (5.10.6.5): SHUTDOWN with both flags, answered with RST; the host reads EOF
    rig.send(hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 1234, 5000, flags=BOTH))
    [(h, _)] = rig.expect(1)
    assert (h.op, h.src_port, h.dst_port) == (VIRTIO_VSOCK_OP_RST, 5000, 1234)
    assert host_closed(rig, peer)
    peer.close()
    assert rig.dev.muxer.conns == {}


@pytest.mark.parametrize("what", ["nothing", "file", "stale socket"])
def test_guest_connect_without_listener_is_reset(rig, what):
    path = f"{rig.uds}_6000"
    if what == "file":
        open(path, "w").close()
    elif what == "stale socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
    rig.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 77, 6000))
    [(h, _)] = rig.expect(1)
    assert (h.op, h.src_port, h.dst_port) == (VIRTIO_VSOCK_OP_RST, 6000, 77)
    assert rig.dev.muxer.conns == {}


def test_host_closes_first(rig):
    peer = guest_connection(rig)
    peer.send(b"last words")
    peer.close()
    got = rig.expect(2)
    assert [(h.op, h.flags, d) for h, d in got] == [
        (VIRTIO_VSOCK_OP_RW, 0, b"last words"), (VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND, b"")
    ]  # fmt: skip
    # the guest may still write: the host socket is gone, so that resets the connection
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, b"x"), b"x")
    [(h, _)] = rig.expect(1)
    assert h.op == VIRTIO_VSOCK_OP_RST
    assert rig.dev.muxer.conns == {}


def test_guest_rst_closes_the_host_socket(rig):
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_RST, 1234, 5000))
    assert host_closed(rig, peer)
    peer.close()
    assert rig.settle() == [] and rig.dev.muxer.conns == {}


def test_guest_shutdown_receive_stops_the_host_writer(rig):
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 1234, 5000, flags=VIRTIO_VSOCK_SHUTDOWN_RCV))
    rig.settle()
    with pytest.raises(BrokenPipeError):
        for _ in range(100):
            peer.send(b"unwanted")
            rig.settle(0.005)
    assert all(h.op != VIRTIO_VSOCK_OP_RW for h, _ in rig.settle())
    # the guest still sends; then it shuts its sending side too: RST
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, b"still"), b"still")
    assert read_host(rig, peer, 5) == b"still"
    rig.send(hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 1234, 5000, flags=VIRTIO_VSOCK_SHUTDOWN_SEND))
    assert [h.op for h, _ in rig.expect(1)] == [VIRTIO_VSOCK_OP_RST]
    peer.close()


def test_credit_request_is_answered(rig):
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 1234, 5000))
    [(h, _)] = rig.expect(1)
    assert (h.op, h.buf_alloc, h.fwd_cnt) == (VIRTIO_VSOCK_OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 0)
    peer.close()


# -- credit -------------------------------------------------------------------------------------
def test_guest_credit_is_never_exceeded(rig):
    credit = 1000
    c, local = host_connection(rig, buf_alloc=credit)
    data = random.Random(1).randbytes(20_000)
    c.send(data)
    conn = rig.dev.muxer.conns[(local, 52)]
    received, fwd = bytearray(), 0
    while len(received) < len(data):
        for h, payload in rig.expect(1) + rig.settle(0.02):
            assert h.op == VIRTIO_VSOCK_OP_RW
            received += payload
            assert len(received) - fwd <= credit, "the device sent beyond the guest's credit"
        assert len(conn.to_guest) + len(received) - fwd <= credit  # it does not even read beyond it
        fwd = len(received)  # the guest's application read it all
        rig.send(hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 52, local, buf_alloc=credit, fwd_cnt=fwd))
    assert received == data
    c.close()


def test_credit_request_when_data_waits_without_credit(rig):
    c, local = host_connection(rig, buf_alloc=10, tail=b"0123456789abcdef")
    got = rig.expect(2)
    assert [(h.op, d) for h, d in got] == [(VIRTIO_VSOCK_OP_RW, b"0123456789"), (VIRTIO_VSOCK_OP_CREDIT_REQUEST, b"")]
    assert rig.settle() == []  # asked once, not again until the credit changes
    rig.send(hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 52, local, buf_alloc=10, fwd_cnt=10))
    [(h, d)] = rig.expect(1)
    assert (h.op, d) == (VIRTIO_VSOCK_OP_RW, b"abcdef")
    c.close()


def test_our_credit_bounds_what_we_hold_for_the_host(rig):
    """The host program does not read: the guest may fill our buffer and no more, then it waits
    for a CREDIT_UPDATE that comes once the host reads (add_writer)."""
    peer = guest_connection(rig)
    conn = rig.dev.muxer.conns[(5000, 1234)]
    data = random.Random(2).randbytes(1 << 20)
    sent, fwd, got, updates = 0, 0, bytearray(), 0

    def guest_step() -> None:
        nonlocal sent, fwd, updates
        for h, _ in rig.recv():
            assert h.buf_alloc == CONN_BUF_ALLOC
            fwd = max(fwd, h.fwd_cnt)
            updates += h.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE
        free = CONN_BUF_ALLOC - (sent - fwd)
        n = min(free, 65536, len(data) - sent)
        if n > 0:
            rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, data[sent : sent + n]), data[sent : sent + n])
            sent += n
        assert len(conn.to_host) <= CONN_BUF_ALLOC

    for _ in range(40):  # the host is not reading yet
        guest_step()
        rig.loop.run_once(0.001)
    assert sent < len(data), "the host socket took a whole MiB without reading?"
    assert conn.to_host, "nothing waits for the host: the test did not fill its socket"
    while len(got) < len(data):
        try:
            got += peer.recv(1 << 16)
        except BlockingIOError:
            rig.loop.run_once(0.001)
        guest_step()
    assert got == data and updates > 0
    peer.close()


# -- hostile packets ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "h, payload, answer",
    [
        (hdr(VIRTIO_VSOCK_OP_RW, 10, 20, b"abc"), b"abc", VIRTIO_VSOCK_OP_RST),  # no such connection
        (hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 10, 20), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 10, 20, flags=BOTH), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(VIRTIO_VSOCK_OP_RESPONSE, 10, 20), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(0, 10, 20), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(99, 10, 20), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(VIRTIO_VSOCK_OP_RST, 10, 20), b"", None),  # never an RST for an RST
        (hdr(VIRTIO_VSOCK_OP_REQUEST, 10, 20, src_cid=CID + 1), b"", None),  # not the guest's CID
        (hdr(VIRTIO_VSOCK_OP_REQUEST, 10, 20, src_cid=CID | 1 << 32), b"", None),  # reserved upper bits
        (hdr(VIRTIO_VSOCK_OP_REQUEST, 10, 20, dst_cid=3), b"", None),  # not for the host
        (hdr(VIRTIO_VSOCK_OP_REQUEST, 10, 20, type=VIRTIO_VSOCK_TYPE_SEQPACKET), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(VIRTIO_VSOCK_OP_REQUEST, 10, 20, type=0), b"", VIRTIO_VSOCK_OP_RST),
        (hdr(VIRTIO_VSOCK_OP_RST, 10, 20, type=9), b"", None),
        (hdr(VIRTIO_VSOCK_OP_RW, 10, 20, len=4), b"abc", VIRTIO_VSOCK_OP_RST),  # len beyond the chain
        (hdr(VIRTIO_VSOCK_OP_RW, 10, 20, len=U32), b"", VIRTIO_VSOCK_OP_RST),
    ],
)
def test_unroutable_packets(rig, h, payload, answer):
    rig.send(h, payload)
    got = rig.settle()
    assert rig.broken is None and rig.dev.muxer.conns == {}
    if answer is None:
        assert got == []
    else:
        [(r, _)] = got
        assert (r.op, r.src_port, r.dst_port, r.type, r.len) == (answer, 20, 10, h.type, 0)


@pytest.mark.parametrize(
    "h, payload",
    [
        (hdr(VIRTIO_VSOCK_OP_REQUEST, 1234, 5000), b""),  # again, on a live connection
        (hdr(VIRTIO_VSOCK_OP_RESPONSE, 1234, 5000), b""),
        (hdr(0, 1234, 5000), b""),
        (hdr(42, 1234, 5000), b""),
        (hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, len=10), b"short"),
    ],
)
def test_bad_packet_on_a_connection_resets_it(rig, h, payload):
    peer = guest_connection(rig)
    rig.send(h, payload)
    [(r, _)] = rig.expect(1)
    assert (r.op, r.src_port, r.dst_port) == (VIRTIO_VSOCK_OP_RST, 5000, 1234)
    assert host_closed(rig, peer)
    peer.close()
    assert rig.dev.muxer.conns == {} and rig.broken is None


def test_data_after_the_guest_said_it_sends_no_more_resets(rig):
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_SHUTDOWN, 1234, 5000, flags=VIRTIO_VSOCK_SHUTDOWN_SEND))
    assert host_closed(rig, peer)  # EOF
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, b"late"), b"late")
    assert [h.op for h, _ in rig.expect(1)] == [VIRTIO_VSOCK_OP_RST]
    peer.close()


def test_packet_beyond_our_credit_resets(make_rig):
    rig = make_rig(buf_alloc=1000)
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, b"x" * 1001), b"x" * 1001)
    [(r, _)] = rig.expect(1)
    assert (r.op, r.buf_alloc) == (VIRTIO_VSOCK_OP_RST, 0)
    assert host_closed(rig, peer)
    peer.close()


def test_longer_chain_than_len_is_fine(rig):
    """5.10.6: buffers may be longer than len; only len bytes are payload."""
    peer = guest_connection(rig)
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 1234, 5000, len=3), b"abcdef")
    assert read_host(rig, peer, 3) == b"abc"
    assert rig.settle() == []
    peer.close()


@pytest.mark.parametrize(
    "bufs",
    [
        [(TXBUF, VIRTIO_VSOCK_HDR_SIZE - 1, False)],
        [(TXBUF, 20, False), (TXBUF + 20, 23, False)],
        [(TXBUF, 64, True)],  # device-writable only: nothing to read
    ],
)
def test_tx_chain_without_a_header_breaks_the_device(rig, bufs):
    rig.drivers[TX_QUEUE].add(bufs)
    rig.kick(TX_QUEUE)
    assert rig.broken and "header" in rig.broken


def test_header_split_across_descriptors_is_fine(rig):
    raw = hdr(VIRTIO_VSOCK_OP_RW, 10, 20, b"abc").pack() + b"abc"
    rig.g.write(TXBUF, raw)
    rig.drivers[TX_QUEUE].add([(TXBUF, 5, False), (TXBUF + 5, 30, False), (TXBUF + 35, len(raw) - 35, False)])
    rig.kick(TX_QUEUE)
    [(r, _)] = rig.settle()
    assert r.op == VIRTIO_VSOCK_OP_RST and rig.broken is None


def test_rx_buffer_without_room_for_a_header_breaks_the_device(rig):
    for _ in range(32):  # RSTs use up the good buffers
        rig.send(hdr(VIRTIO_VSOCK_OP_RW, 10, 20))
    assert len(rig.recv(refill=False)) == 32
    rig.post_rx(1, size=VIRTIO_VSOCK_HDR_SIZE - 1)
    rig.send(hdr(VIRTIO_VSOCK_OP_RW, 10, 20))
    assert rig.broken and "header" in rig.broken


# -- rx queue and event queue -------------------------------------------------------------------
def test_packets_wait_for_rx_buffers(make_rig):
    rig = make_rig()
    for _ in range(32):
        rig.send(hdr(VIRTIO_VSOCK_OP_RW, 10, 20))  # 32 RSTs use up every buffer
    assert len(rig.recv(refill=False)) == 32
    c = client(rig, b"CONNECT 8\n")
    for port in range(3):
        rig.send(hdr(VIRTIO_VSOCK_OP_RW, 100 + port, 20))
    assert rig.settle() == []
    assert rig.drivers[RX_QUEUE].avail_event == rig.drivers[RX_QUEUE].avail_idx  # a kick is asked for
    rig.post_rx(8)
    got = rig.recv(refill=False)
    assert sorted((h.op, h.dst_port) for h, _ in got) == [
        (VIRTIO_VSOCK_OP_REQUEST, 8), (VIRTIO_VSOCK_OP_RST, 100), (VIRTIO_VSOCK_OP_RST, 101), (VIRTIO_VSOCK_OP_RST, 102)
    ]  # fmt: skip
    assert rig.interrupts[RX_QUEUE] > 0
    c.close()


def test_transport_reset_event_on_reset_and_detach(make_rig):
    rig = make_rig()
    ev = rig.drivers[EVENT_QUEUE]
    for i in range(2):
        ev.add([(EVBUF + 8 * i, 8, True)])
    rig.kick(EVENT_QUEUE)
    assert ev.used() == []  # held, not consumed
    peer = guest_connection(rig)
    c, _ = host_connection(rig)
    rig.dev.reset()
    assert [n for _, n in ev.used()] == [4]
    assert rig.g.read(EVBUF, 4) == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_bytes(4, "little")
    assert rig.interrupts[EVENT_QUEUE] == 1
    assert host_closed(rig, peer) and host_closed(rig, c)
    assert rig.dev.muxer.conns == {}
    rig.dev.detach()
    assert [n for _, n in ev.used()] == [4]
    rig.dev.detach()  # no transport, no buffer: nothing happens
    rig.dev.attach(rig)  # the fixture's close detaches again
    peer.close()
    c.close()


def test_event_buffer_too_small_breaks_the_device(rig):
    rig.drivers[EVENT_QUEUE].add([(EVBUF, 3, True)])
    rig.dev.reset()
    assert rig.broken and "event" in rig.broken


def test_many_connections_then_close_leaks_nothing(tmp_path):
    before = fds()
    rig = Rig(str(tmp_path / "v.sock"))
    rig.post_rx(32)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{rig.uds}_5000")
    lst.listen(16)
    clients = [client(rig, b"CONNECT %d\n" % p) for p in range(4)]
    clients.append(client(rig, b"CONN"))  # still greeting
    requests = rig.expect(4)
    for h, _ in requests[:2]:
        rig.send(hdr(VIRTIO_VSOCK_OP_RESPONSE, h.dst_port, h.src_port))
    for port in range(3):
        rig.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 2000 + port, 5000))
    rig.send(hdr(VIRTIO_VSOCK_OP_REQUEST, 3000, 5001))  # nobody listens: RST
    rig.settle()
    assert len(rig.dev.muxer.conns) == 7
    rig.close()
    assert not os.path.exists(rig.uds)
    for c in clients:
        assert c.recv(100, socket.MSG_PEEK) is not None
        c.close()
    lst.close()
    assert fds() == before
    assert rig.g.guards_intact()


def test_on_a_vhost_user_backend(tmp_path):
    """The real Transport, ordered as EventLoop orders it: attach on connect; detach, reset, close."""
    before = fds()
    loop = EventLoop()
    dev = unix_vsock(CID, str(tmp_path / "v.sock"))
    backend = VhostUserBackend(dev, "vsock", loop=loop)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(dev.host.uds_path)
    c.sendall(b"CONNECT 5\n")
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        loop.run_once(0.01)
    assert len(dev.muxer.conns) == 1  # its REQUEST waits for rings the front-end has not set up
    backend.close()
    dev.reset()
    c.settimeout(1)
    assert c.recv(1) == b""
    c.close()
    dev.close()
    loop.close()
    assert fds() == before


# -- the sans-IO muxer on its own ---------------------------------------------------------------
def packet(m: Muxer, room: int = 4096) -> tuple[Header, bytes]:
    out = m.next_packet(room)
    assert out is not None
    return out


def test_muxer_connection_limit_and_rst_bound():
    m = Muxer(CID, max_connections=2)
    for port in range(3):
        m.from_guest(hdr(VIRTIO_VSOCK_OP_REQUEST, 100 + port, 5000))
    assert [c.peer_port for c in m.take_connects()] == [100, 101]
    assert m.host_connect(1) is None
    rst, _ = packet(m)
    assert (rst.op, rst.dst_port) == (VIRTIO_VSOCK_OP_RST, 102)
    for port in range(MAX_RST_QUEUE + 10):
        m.from_guest(hdr(VIRTIO_VSOCK_OP_RW, port, 1))
    n = 0
    while m.next_packet(0) is not None:
        n += 1
    assert n == MAX_RST_QUEUE


def test_muxer_local_ports_are_fresh_and_wrap():
    m = Muxer(CID)
    a, b = m.host_connect(5), m.host_connect(5)
    assert a and b and (a.local_port, b.local_port) == (LOCAL_PORT_MIN, LOCAL_PORT_MIN + 1)
    m._last_port = 2 * LOCAL_PORT_MIN - 1
    c = m.host_connect(5)
    assert c and c.local_port == LOCAL_PORT_MIN + 2  # wrapped, past the ports in use
    m.request_timeout(a)  # its REQUEST never went out: no RST either
    assert a.state is State.CLOSED
    assert [packet(m)[0][:5] for _ in range(2)] == [
        (VMADDR_CID_HOST, CID, LOCAL_PORT_MIN + 1, 5, 0), (VMADDR_CID_HOST, CID, LOCAL_PORT_MIN + 2, 5, 0)
    ]  # fmt: skip
    assert m.next_packet(4096) is None
    m._last_port = 2 * LOCAL_PORT_MIN - 1
    d = m.host_connect(5)
    assert d and d.local_port == LOCAL_PORT_MIN  # a's port is free again


def test_muxer_credit_update_when_the_guest_view_runs_low():
    m = Muxer(CID, buf_alloc=1000)
    m.from_guest(hdr(VIRTIO_VSOCK_OP_REQUEST, 1, 2))
    [conn] = m.take_connects()
    m.connected(conn, True)
    assert packet(m)[0].op == VIRTIO_VSOCK_OP_RESPONSE
    m.from_guest(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, b"x" * 700), b"x" * 700)
    m.host_sent(conn, 100)
    assert m.next_packet(0) is None  # the guest still sees 300 free: above a quarter, no update
    m.from_guest(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, b"y" * 200), b"y" * 200)
    m.host_sent(conn, 100)  # the guest sees 100 free
    h, _ = packet(m)
    assert (h.op, h.buf_alloc, h.fwd_cnt) == (VIRTIO_VSOCK_OP_CREDIT_UPDATE, 1000, 200)
    m.from_guest(hdr(VIRTIO_VSOCK_OP_RW, 1, 2, b"z" * 301), b"z" * 301)  # 700 held + 301 > 1000
    assert conn.state is State.CLOSED
    assert packet(m)[0].op == VIRTIO_VSOCK_OP_RST


# -- properties ---------------------------------------------------------------------------------
PORTS = [1234, 5000, 1, LOCAL_PORT_MIN, U32]
wild_headers = st.builds(
    Header,
    src_cid=st.sampled_from([CID, CID, CID, VMADDR_CID_HOST, 0, CID | 1 << 32]),
    dst_cid=st.sampled_from([VMADDR_CID_HOST, VMADDR_CID_HOST, CID, 1]),
    src_port=st.sampled_from(PORTS),
    dst_port=st.sampled_from(PORTS),
    len=st.integers(0, 300) | st.sampled_from([U32, CONN_BUF_ALLOC, CONN_BUF_ALLOC + 1]),
    type=st.sampled_from([VIRTIO_VSOCK_TYPE_STREAM] * 4 + [0, VIRTIO_VSOCK_TYPE_SEQPACKET, 0xFFFF]),
    op=st.integers(0, 8) | st.just(0xFFFF),
    flags=st.sampled_from([0, 1, 2, 3, U32]),
    buf_alloc=st.sampled_from([0, 10, GUEST_BUF, U32]),
    fwd_cnt=st.sampled_from([0, 5, U32]),
)
flow_headers = st.builds(  # well addressed, so that connections to the listener on port 5000 happen
    Header,
    src_cid=st.just(CID),
    dst_cid=st.just(VMADDR_CID_HOST),
    src_port=st.sampled_from([1234, 1235]),
    dst_port=st.just(5000),
    len=st.integers(0, 64),
    type=st.just(VIRTIO_VSOCK_TYPE_STREAM),
    op=st.sampled_from([1, 1, 3, 4, 5, 5, 5, 6, 7]),
    flags=st.sampled_from([0, 1, 2, 3]),
    buf_alloc=st.sampled_from([0, 10, GUEST_BUF]),
    fwd_cnt=st.sampled_from([0, 5]),
)
headers = flow_headers | wild_headers


@st.composite
def tx_chains(draw):
    """A packet from `headers` in one to three descriptors; now and then cut short or writable."""
    h = draw(headers)
    raw = h.pack() + draw(st.binary(min_size=min(h.len, 300), max_size=300))
    raw = raw[: draw(st.integers(0, len(raw)))] if draw(st.integers(0, 29)) == 0 else raw
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=2)))
    pieces = [p for p in (raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True))]
    writable = draw(st.integers(0, 29)) == 0
    return pieces, writable


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vsock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(d / "p.sock_5000"))  # guest REQUESTs to port 5000 find a listener
    lst.listen(1024)
    lst.setblocking(False)
    yield d, lst
    lst.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=st.lists(tx_chains(), min_size=1, max_size=12),
    rx_sizes=st.lists(st.integers(VIRTIO_VSOCK_HDR_SIZE, RX_SLOT) | st.integers(0, 60), max_size=6),
)
def test_random_packets_only_virtqueue_error_escapes(prop_dir, chains, rx_sizes):
    d, lst = prop_dir
    before = fds()
    rig = Rig(str(d / "p.sock"))
    try:
        rig.post_rx(4)
        tx = rig.drivers[TX_QUEUE]
        for pieces, writable in chains:
            if len(pieces) > len(tx.free):
                break
            addr, bufs = TXBUF + tx.free[0] * TX_SLOT, []
            for p in pieces:
                rig.g.write(addr, p)
                bufs.append((addr, len(p), writable))
                addr += len(p)
            tx.add(bufs)
        rig.kick(TX_QUEUE)  # records a VirtqueueError as `broken`; anything else fails the test
        for size in rx_sizes:
            rig.drivers[RX_QUEUE].add([(RXBUF + rig.drivers[RX_QUEUE].free[0] * RX_SLOT, size, True)])
        rig.kick(RX_QUEUE)
        event("broken" if rig.broken else "served")
        if rig.dev.muxer.conns:
            event("connected to the host listener")
        if not rig.broken:
            for h, _ in rig.recv(refill=False):
                assert h.op in (VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        assert rig.g.guards_intact()
        for conn in rig.dev.muxer.conns.values():
            assert len(conn.to_host) <= CONN_BUF_ALLOC + 32 and len(conn.to_guest) <= MAX_TO_GUEST
    finally:
        rig.close()
        while True:
            try:
                lst.accept()[0].close()
            except BlockingIOError:
                break
    assert fds() == before


@st.composite
def muxer_steps(draw):
    kind = draw(
        st.sampled_from(["guest", "guest", "guest", "connect", "data", "sent", "eof", "error", "rx", "rx", "result"])
    )
    return kind, draw(headers), draw(st.integers(0, 5000)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(muxer_steps(), max_size=60))
def test_muxer_keeps_credit_and_bounds(steps):
    """Whatever happens, the muxer never raises, never sends beyond the guest's credit, and holds
    no more than the credit both sides advertised."""
    m = Muxer(CID, buf_alloc=4096)
    pending = []
    for kind, h, n, flag in steps:
        conns = list(m.conns.values())
        conn = conns[n % len(conns)] if conns else None
        if kind == "guest":
            if conn is not None and flag:  # aim at a live connection
                h = h._replace(src_cid=CID, dst_cid=VMADDR_CID_HOST, src_port=conn.peer_port, dst_port=conn.local_port)
            if h.op == VIRTIO_VSOCK_OP_RW and h.len <= 4096:
                m.from_guest(h, bytes(h.len))
            else:
                m.from_guest(h)
        elif kind == "connect":
            m.host_connect(n)
        elif kind == "result":
            pending += m.take_connects()
            if pending:
                m.connected(pending.pop(0), flag)
        elif conn is not None and kind == "data":
            m.host_data(conn, bytes(min(n, conn.host_room())))
        elif conn is not None and kind == "sent":
            m.host_sent(conn, min(n, len(conn.to_host)))
        elif conn is not None and kind == "eof":
            m.host_eof(conn)
        elif conn is not None and kind == "error":
            m.host_error(conn)
        elif kind == "rx":
            free = {c.key: c.peer_free() for c in m.conns.values()}
            pkt = m.next_packet(n)
            if pkt is not None and pkt[0].op == VIRTIO_VSOCK_OP_RW:
                key = (pkt[0].src_port, pkt[0].dst_port)
                assert 0 < pkt[0].len == len(pkt[1]) <= min(free[key], n)
        for c in m.conns.values():
            assert len(c.to_host) - c.ack <= c.buf_alloc
            assert len(c.to_guest) <= MAX_TO_GUEST
        m.take_touched()
    m.reset()
    assert m.conns == {} and not m.has_output()
