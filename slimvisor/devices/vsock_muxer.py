"""The stream protocol of virtio-vsock (virtio 1.2 section 5.10.6), sans-IO.

`Muxer` is Firecracker's vsock muxer without the sockets. It takes parsed packets from the guest
and events from the host side (a host program asked for a port, bytes arrived, the host socket
took bytes, hit EOF, failed) and answers with packets for the guest, pulled one rx buffer at a
time with `next_packet`, and with what each `Connection` needs of its host socket: bytes to
write (`to_host`), how much may be read (`host_room`), which direction to shut, or to be closed.
The I/O edge (slimvisor.devices.vsock) owns the sockets and asks `take_touched` which
connections to look at again and `take_connects` which host sockets to connect.

Everything the guest sends is hostile: a packet that does not fit its flow resets that flow, a
packet for nobody is answered with RST, and nothing here raises. Memory stays bounded: per
connection by the credit both sides advertise (and MAX_TO_GUEST whatever the guest claims), in
number by MAX_CONNECTIONS, and RSTs for nobody by MAX_RST_QUEUE.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from typing import NamedTuple

from slimvisor.virtio.spec import bit

log = logging.getLogger(__name__)

# 5.10.4 Device configuration layout: CID 2 is the well-known CID of the host
VMADDR_CID_HOST = 2

# 5.10.6 Device Operation: struct virtio_vsock_hdr and its op values
_HDR = struct.Struct("<QQIIIHHIII")  # src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
VIRTIO_VSOCK_HDR_SIZE = _HDR.size  # 44
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

# 5.10.6.2 Addressing
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

# 5.10.6.5 Stream Sockets: SHUTDOWN flag bits, and their masks as Linux's uapi names them
VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE = 0
VIRTIO_VSOCK_SHUTDOWN_F_SEND = 1
VIRTIO_VSOCK_SHUTDOWN_RCV = bit(VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE)
VIRTIO_VSOCK_SHUTDOWN_SEND = bit(VIRTIO_VSOCK_SHUTDOWN_F_SEND)

U32 = 0xFFFFFFFF
CONN_BUF_ALLOC = 256 * 1024  # what we advertise per connection: guest bytes the host has not taken yet
MAX_TO_GUEST = 256 * 1024  # host bytes held for the guest, whatever credit it claims
MAX_PKT_PAYLOAD = 64 * 1024  # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
MAX_CONNECTIONS = 1023  # as Firecracker
MAX_RST_QUEUE = 1024  # RSTs waiting for rx buffers; more are dropped
LOCAL_PORT_MIN = 1 << 30  # host ports of host-initiated connections: [1 << 30, 1 << 31), as Firecracker
CONNECT_LINE_MAX = 32  # "CONNECT <port>\n" with its newline, as Firecracker reads it


class Header(NamedTuple):
    """struct virtio_vsock_hdr (5.10.6)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        return cls._make(_HDR.unpack(raw))


def parse_connect(line: bytes) -> int | None:
    """The port of a host program's `CONNECT <port>\\n` line (any case, as Firecracker), or None."""
    words = line.split()
    if len(line) > CONNECT_LINE_MAX or len(words) < 2 or words[0].lower() != b"connect":
        return None
    if not words[1].isdigit() or int(words[1]) > U32:
        return None
    return int(words[1])


class State(enum.Enum):
    LOCAL_INIT = enum.auto()  # host-initiated: our REQUEST is due or sent, no RESPONSE yet
    PEER_INIT = enum.auto()  # guest-initiated: the host socket is not connected yet
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()


class Connection:
    """One stream between a guest port and a host socket, with both directions' credit."""

    def __init__(self, local_port: int, peer_port: int, state: State, buf_alloc: int) -> None:
        self.local_port = local_port  # the host's end: the port the guest sends to
        self.peer_port = peer_port  # the guest's end
        self.state = state
        self.host_initiated = state is State.LOCAL_INIT  # its local_port is one we allocated
        self.buf_alloc = buf_alloc
        # guest -> host: to_host starts with `ack` bytes of ours ("OK <port>\n"), then guest data
        self.to_host = bytearray()
        self.ack = 0
        self.fwd_cnt = 0  # guest bytes the host socket took (free-running, 5.10.6.3)
        self.sent_fwd_cnt = 0  # the fwd_cnt the guest heard last
        self.peer_shut = 0  # SHUTDOWN flags the guest sent
        # host -> guest
        self.to_guest = bytearray()
        self.tx_cnt = 0  # bytes sent to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.host_eof = False
        self.shut_sent = False  # we told the guest it gets no more data
        # control packets due
        self.request_sent = False
        self.response_due = False
        self.credit_update_due = False
        self.credit_requested = False

    def __repr__(self) -> str:
        return f"<Connection host:{self.local_port} guest:{self.peer_port} {self.state.name}>"

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def peer_free(self) -> int:
        """The guest's free receive space as its last credit said: never send more (5.10.6.3)."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))

    def host_room(self) -> int:
        """How many bytes the host socket may be read for now."""
        if self.state is State.CLOSED or self.host_eof or self.peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV:
            return 0
        held = len(self.to_guest)
        return max(0, min(self.peer_free() - held, MAX_TO_GUEST - held))

    @property
    def stop_host_writes(self) -> bool:
        """The guest sends no more and all it sent reached the host socket: shut its writing side."""
        return bool(self.peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND) and not self.to_host

    @property
    def stop_host_reads(self) -> bool:
        """The guest receives no more: shut the host socket's reading side (its writer gets EPIPE)."""
        return bool(self.peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV)

    def _guest_held(self) -> int:
        return len(self.to_host) - self.ack

    def _guest_view_free(self) -> int:
        """Our free space as the guest believes it: what it sent minus the fwd_cnt it heard."""
        return self.buf_alloc - self._guest_held() - ((self.fwd_cnt - self.sent_fwd_cnt) & U32)


class Muxer:
    """All connections of one guest: routes its packets and produces the packets it is owed."""

    def __init__(self, guest_cid: int, buf_alloc: int = CONN_BUF_ALLOC, max_connections: int = MAX_CONNECTIONS) -> None:
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.conns: dict[tuple[int, int], Connection] = {}
        self._rsts: deque[Header] = deque()
        self._ready: dict[Connection, None] = {}  # may owe the guest a packet; in round-robin order
        self._touched: dict[Connection, None] = {}  # the host side needs another look
        self._connects: list[Connection] = []
        self._host_ports: set[int] = set()
        self._last_port = LOCAL_PORT_MIN - 1

    # -- for the I/O edge -----------------------------------------------------------------------
    def take_touched(self) -> list[Connection]:
        """Connections whose host socket may need writing, (un)watching, shutting or closing."""
        out = list(self._touched)
        self._touched.clear()
        return out

    def take_connects(self) -> list[Connection]:
        """Guest-initiated connections waiting for `connected` (connect `<uds>_<local_port>`)."""
        out = [c for c in self._connects if c.state is State.PEER_INIT]
        self._connects.clear()
        return out

    def reset(self) -> None:
        """The guest's transport is gone or reset: every connection ends, the guest is not told."""
        for conn in list(self.conns.values()):
            self._close(conn, rst=False)
        self._rsts.clear()
        self._connects.clear()

    # -- host side ------------------------------------------------------------------------------
    def host_connect(self, port: int) -> Connection | None:
        """A host program asked for guest port `port`: a REQUEST is due; None if at the limit."""
        if len(self.conns) >= self.max_connections:
            return None
        local = self._allocate_port(port)
        conn = Connection(local, port, State.LOCAL_INIT, self.buf_alloc)
        self.conns[conn.key] = conn
        self._mark(conn)
        return conn

    def connected(self, conn: Connection, ok: bool) -> None:
        """Result of connecting a guest-initiated connection's host socket: RESPONSE or RST."""
        if conn.state is not State.PEER_INIT:
            return
        if ok:
            conn.state = State.ESTABLISHED
            conn.response_due = True
            self._mark(conn)
        else:
            self._close(conn, rst=True)

    def host_data(self, conn: Connection, data: bytes) -> None:
        """Bytes read from the host socket (at most `host_room()`, but for a CONNECT line's tail)."""
        if conn.state is not State.CLOSED and data:
            conn.to_guest += data
            self._mark(conn)

    def host_eof(self, conn: Connection) -> None:
        """The host program sends no more: SHUTDOWN(SEND) once the guest has all it sent."""
        if conn.state is not State.CLOSED:
            conn.host_eof = True
            self._mark(conn)

    def host_sent(self, conn: Connection, n: int) -> None:
        """The host socket took the first `n` bytes of `to_host`."""
        if conn.state is State.CLOSED or n <= 0:
            return
        ours = min(n, conn.ack)
        conn.ack -= ours
        del conn.to_host[:n]
        conn.fwd_cnt = (conn.fwd_cnt + n - ours) & U32
        if (
            conn.fwd_cnt != conn.sent_fwd_cnt
            and not conn.peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND
            and conn._guest_view_free() < conn.buf_alloc // 4
        ):
            conn.credit_update_due = True
        self._mark(conn)
        self._check_done(conn)

    def host_error(self, conn: Connection) -> None:
        """The host socket failed (reset, broken pipe): reset the guest's end too."""
        self._close(conn, rst=True)

    def request_timeout(self, conn: Connection) -> None:
        """A host-initiated REQUEST went unanswered for too long (Firecracker: 2 s)."""
        if conn.state is State.LOCAL_INIT:
            self._close(conn, rst=conn.request_sent)

    # -- guest side -----------------------------------------------------------------------------
    def from_guest(self, hdr: Header, payload: bytes = b"") -> None:
        """One packet from the tx queue; `payload` is its first hdr.len bytes (read for RW only)."""
        if not self._ours(hdr):
            return
        if hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            self._reply_rst(hdr)  # 5.10.6.4: an unknown type MUST be answered with RST
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == VIRTIO_VSOCK_OP_REQUEST:
                self._peer_request(hdr)
            else:
                self._reply_rst(hdr)
            return
        if hdr.op == VIRTIO_VSOCK_OP_RST:
            self._close(conn, rst=False)
            return
        if (hdr.buf_alloc, hdr.fwd_cnt) != (conn.peer_buf_alloc, conn.peer_fwd_cnt):
            conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            conn.credit_requested = False
            self._mark(conn)
        if conn.state is State.ESTABLISHED:
            self._established(conn, hdr, payload)
        elif conn.state is State.LOCAL_INIT and hdr.op == VIRTIO_VSOCK_OP_RESPONSE and conn.request_sent:
            conn.state = State.ESTABLISHED
            conn.to_host[:0] = b"OK %d\n" % conn.local_port
            conn.ack = len(conn.to_host)
            self._mark(conn)
        else:
            self._close(conn, rst=True)

    def malformed(self, hdr: Header) -> None:
        """A packet whose len its chain does not hold, or beyond any credit: reset its flow."""
        if not self._ours(hdr):
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is not None:
            self._close(conn, rst=True)
        else:
            self._reply_rst(hdr)

    def _ours(self, hdr: Header) -> bool:
        """From this guest (5.10.6.4: src_cid is its guest_cid) to the host: others have no answer."""
        if hdr.src_cid == self.guest_cid and hdr.dst_cid == VMADDR_CID_HOST:
            return True
        log.debug("vsock: dropping a packet from CID %d to CID %d", hdr.src_cid, hdr.dst_cid)
        return False

    def _peer_request(self, hdr: Header) -> None:
        if len(self.conns) >= self.max_connections:
            log.debug("vsock: %d connections already; refusing guest port %d", len(self.conns), hdr.src_port)
            self._reply_rst(hdr)
            return
        conn = Connection(hdr.dst_port, hdr.src_port, State.PEER_INIT, self.buf_alloc)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self.conns[conn.key] = conn
        self._connects.append(conn)

    def _established(self, conn: Connection, hdr: Header, payload: bytes) -> None:
        op = hdr.op
        if op == VIRTIO_VSOCK_OP_RW:
            if conn.peer_shut & VIRTIO_VSOCK_SHUTDOWN_SEND or conn._guest_held() + len(payload) > conn.buf_alloc:
                self._close(conn, rst=True)  # data after its own SHUTDOWN, or beyond our credit
                return
            conn.to_host += payload
            self._touched[conn] = None
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.credit_update_due = True
            self._mark(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.peer_shut |= hdr.flags & (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)
            if conn.peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV:
                conn.to_guest.clear()
            self._mark(conn)
            self._check_done(conn)
        elif op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:  # its credit is already taken from the header
            self._close(conn, rst=True)

    def _check_done(self, conn: Connection) -> None:
        """Neither side sends any more and the host has everything: end with RST (5.10.6.5)."""
        we_send = not (conn.shut_sent or conn.peer_shut & VIRTIO_VSOCK_SHUTDOWN_RCV)
        if conn.state is State.ESTABLISHED and conn.stop_host_writes and not we_send:
            self._close(conn, rst=True)

    # -- packets for the guest ------------------------------------------------------------------
    def has_output(self) -> bool:
        """Whether a packet is owed to the guest (given an rx buffer large enough)."""
        if self._rsts:
            return True
        for conn in list(self._ready):
            if self._owes(conn):
                return True
            del self._ready[conn]
        return False

    def next_packet(self, room: int) -> tuple[Header, bytes] | None:
        """The next packet for an rx buffer with `room` payload bytes, or None if none fits."""
        if self._rsts:
            return self._rsts.popleft(), b""
        for conn in list(self._ready):
            if not self._owes(conn):
                del self._ready[conn]
                continue
            pkt = self._packet(conn, room)
            if pkt is None:
                continue
            self._ready.pop(conn, None)
            if self._owes(conn):
                self._ready[conn] = None  # to the back: connections take turns
            self._touched[conn] = None  # room for more host data, maybe
            return pkt
        return None

    def _owes(self, conn: Connection) -> bool:
        if conn.state is State.LOCAL_INIT:
            return not conn.request_sent
        if conn.state is not State.ESTABLISHED:
            return False
        return bool(
            conn.response_due
            or conn.credit_update_due
            or (conn.to_guest and (conn.peer_free() > 0 or not conn.credit_requested))
            or self._shutdown_due(conn)
        )

    @staticmethod
    def _shutdown_due(conn: Connection) -> bool:
        return conn.host_eof and not conn.to_guest and not conn.shut_sent

    def _packet(self, conn: Connection, room: int) -> tuple[Header, bytes] | None:
        if conn.state is State.LOCAL_INIT:
            conn.request_sent = True
            return self._header(conn, VIRTIO_VSOCK_OP_REQUEST), b""
        if conn.response_due:
            conn.response_due = False
            return self._header(conn, VIRTIO_VSOCK_OP_RESPONSE), b""
        if conn.to_guest:
            free = conn.peer_free()
            if free > 0 and room > 0:
                n = min(len(conn.to_guest), free, room, MAX_PKT_PAYLOAD)
                data = bytes(conn.to_guest[:n])
                del conn.to_guest[:n]
                conn.tx_cnt = (conn.tx_cnt + n) & U32
                return self._header(conn, VIRTIO_VSOCK_OP_RW, n), data
            if free == 0 and not conn.credit_requested:
                conn.credit_requested = True
                return self._header(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST), b""
        if conn.credit_update_due:
            return self._header(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE), b""
        if self._shutdown_due(conn):
            conn.shut_sent = True
            pkt = self._header(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND), b""
            self._check_done(conn)
            return pkt
        return None

    def _header(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> Header:
        """A packet of `conn`; every one carries our credit, so no update is due after it."""
        conn.sent_fwd_cnt = conn.fwd_cnt
        conn.credit_update_due = False
        return Header(
            VMADDR_CID_HOST, self.guest_cid, conn.local_port, conn.peer_port, length,
            VIRTIO_VSOCK_TYPE_STREAM, op, flags, conn.buf_alloc, conn.fwd_cnt,
        )  # fmt: skip

    def _reply_rst(self, hdr: Header) -> None:
        """RST for a packet nobody expected; never for an RST (no RST ping-pong)."""
        if hdr.op != VIRTIO_VSOCK_OP_RST:
            self._queue_rst(hdr.dst_port, hdr.src_port, hdr.type)

    def _queue_rst(self, local_port: int, peer_port: int, type_: int = VIRTIO_VSOCK_TYPE_STREAM) -> None:
        if len(self._rsts) >= MAX_RST_QUEUE:
            log.debug("vsock: the guest takes no packets; dropping an RST")
            return
        rst = Header(VMADDR_CID_HOST, self.guest_cid, local_port, peer_port, 0, type_, VIRTIO_VSOCK_OP_RST, 0, 0, 0)
        self._rsts.append(rst)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _mark(self, conn: Connection) -> None:
        if conn.state is not State.CLOSED:
            self._ready[conn] = None
        self._touched[conn] = None

    def _close(self, conn: Connection, rst: bool) -> None:
        if conn.state is State.CLOSED:
            return
        conn.state = State.CLOSED
        del self.conns[conn.key]
        if conn.host_initiated:
            self._host_ports.discard(conn.local_port)
        self._ready.pop(conn, None)
        self._touched[conn] = None
        conn.to_host.clear()
        conn.to_guest.clear()
        if rst:
            self._queue_rst(conn.local_port, conn.peer_port)

    def _allocate_port(self, peer_port: int) -> int:
        """A fresh host port in [1 << 30, 1 << 31), round robin, as Firecracker allocates them."""
        while True:
            self._last_port = LOCAL_PORT_MIN + (self._last_port + 1 - LOCAL_PORT_MIN) % LOCAL_PORT_MIN
            port = self._last_port
            if port not in self._host_ports and (port, peer_port) not in self.conns:
                self._host_ports.add(port)
                return port
