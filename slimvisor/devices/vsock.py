"""virtio-vsock (virtio 1.2 section 5.10) with the host side on Unix sockets, as Firecracker does.

A host program connects to `uds_path`, writes `CONNECT <port>\\n` and, once the guest accepts,
reads `OK <host port>\\n` and then the stream; if nothing listens on that guest port its socket
is closed. A guest connecting to the host (CID 2) on port P reaches whoever listens on
`<uds_path>_P`: RESPONSE if the connect works, RST if not. The protocol lives in vsock_muxer,
sans-IO; this file is the I/O edge between it, the virtqueues and the non-blocking host sockets,
driven by the transport's event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimvisor.devices.vsock_muxer import (
    CONN_BUF_ALLOC,
    CONNECT_LINE_MAX,
    VIRTIO_VSOCK_HDR_SIZE,
    VIRTIO_VSOCK_OP_RW,
    Connection,
    Header,
    Muxer,
    State,
    parse_connect,
)
from slimvisor.runtime.unix import listen_unix
from slimvisor.virtio.device import Transport, VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_VSOCK, bit
from slimvisor.virtio.state import same

log = logging.getLogger(__name__)

# 5.10.2 Virtqueues
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

# 5.10.3 Feature bits
VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1

# 5.10.4 Device configuration layout: struct virtio_vsock_config { le64 guest_cid; }
_CONFIG = struct.Struct("<Q")

# 5.10.6.7 Device Events: struct virtio_vsock_event { le32 id; }
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
_EVENT = struct.Struct("<I")

CONN_REQUEST_TIMEOUT = 2.0  # seconds a host-initiated REQUEST waits for its RESPONSE (Firecracker's)
RECV_MAX = 64 * 1024
LISTEN_BACKLOG = 64


@dataclass(eq=False)
class _Host:
    """The host socket of one connection, and what the event loop watches on it."""

    sock: socket.socket
    reading: bool = False
    writing: bool = False
    shut_rd: bool = False
    shut_wr: bool = False


@dataclass(eq=False)
class _Greeting:
    """A host program on uds_path that has not finished its CONNECT line yet."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)


class VsockDevice(VirtioDevice):
    """One guest's vsock. The socket at uds_path exists from construction to close; host programs
    that connect while no front-end is attached wait in its backlog."""

    device_id = VIRTIO_ID_VSOCK
    max_queues = 3

    def __init__(
        self,
        guest_cid: int,
        uds_path: str,
        *,
        buf_alloc: int = CONN_BUF_ALLOC,
        request_timeout: float = CONN_REQUEST_TIMEOUT,
    ) -> None:
        super().__init__()
        if not 2 < guest_cid < 0xFFFFFFFF:  # 5.10.4: 0, 1, 2 (the host) and 0xffffffff are reserved
            raise ValueError(f"vsock guest CID {guest_cid} is reserved or too large (3 to 4294967294)")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.request_timeout = request_timeout
        self.muxer = Muxer(guest_cid, buf_alloc)
        self._hosts: dict[Connection, _Host] = {}
        self._greetings: dict[int, _Greeting] = {}  # by fd
        self.listener: socket.socket | None = listen_unix(uds_path)
        self.listener.setblocking(False)
        self.listener.listen(LISTEN_BACKLOG)

    def device_features(self) -> int:
        return bit(VIRTIO_VSOCK_F_STREAM)

    def config(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    # -- life cycle -----------------------------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        super().attach(transport)
        if self.listener is not None:
            transport.add_reader(self.listener.fileno(), self._accept)

    def detach(self) -> None:
        self._end_all()
        if self.transport is not None and self.listener is not None:
            self.transport.remove_reader(self.listener.fileno())
        super().detach()

    def reset(self) -> None:
        self._end_all()
        super().reset()

    def close(self) -> None:
        self._end_all()
        if self.listener is not None:
            if self.transport is not None:
                self.transport.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)

    # -- saved state: the CID. Connections are not carried over: their host ends are sockets on
    # this host, so they end, and the guest hears TRANSPORT_RESET once its driver is back (as
    # Firecracker does after a snapshot restore).
    state_fields = ("guest_cid",)

    def save_device(self) -> dict[str, Any]:
        return {"guest_cid": self.guest_cid}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        same(state, "guest_cid", "vsock", self.guest_cid)
        return lambda: None

    def _end_all(self) -> None:
        """Every connection and greeting ends; the guest hears TRANSPORT_RESET if it can (5.10.6.7)."""
        self._send_event(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        self.muxer.reset()
        self.muxer.take_touched()
        for conn in list(self._hosts):
            self._close_host(conn)
        for g in list(self._greetings.values()):
            self._drop_greeting(g)

    def _send_event(self, event_id: int) -> None:
        t = self.transport
        q = t.queue(EVENT_QUEUE) if t is not None else None
        if t is None or q is None:
            return
        try:
            chain = q.pop()
            if chain is None:
                return
            if chain.writable_len < _EVENT.size:
                raise VirtqueueError(f"event buffer {chain.head} is shorter than an event")
            chain.write(0, _EVENT.pack(event_id))
            q.push(chain.head, _EVENT.size)
        except VirtqueueError as e:
            t.fail(f"event queue: {e}")
            return
        t.interrupt(EVENT_QUEUE)

    # -- virtqueues -----------------------------------------------------------------------------
    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        """tx: the guest's packets; rx: buffers for what waits; event: buffers kept for resets."""
        if queue_index == TX_QUEUE:
            super().drain(queue_index, queue)
        if queue_index in (TX_QUEUE, RX_QUEUE):
            self._run()

    def handle(self, queue_index: int, chain: Chain) -> int:
        """One packet from the tx queue (5.10.6.4); nothing is written back into it."""
        if chain.readable_len < VIRTIO_VSOCK_HDR_SIZE:
            raise VirtqueueError(f"tx chain {chain.head} is shorter than a packet header")
        hdr = Header.unpack(chain.read(0, VIRTIO_VSOCK_HDR_SIZE))
        # 5.10.6: buffers may be longer than len, never shorter
        if hdr.len > chain.readable_len - VIRTIO_VSOCK_HDR_SIZE or hdr.len > self.muxer.buf_alloc:
            self.muxer.malformed(hdr)
        elif hdr.op == VIRTIO_VSOCK_OP_RW:
            self.muxer.from_guest(hdr, chain.read(VIRTIO_VSOCK_HDR_SIZE, hdr.len))
        else:
            self.muxer.from_guest(hdr)
        return 0

    def _run(self) -> None:
        """Bring host sockets and the rx queue up to date with the muxer, until nothing changes."""
        while True:
            for conn in self.muxer.take_connects():
                self._connect(conn)
            self._deliver()
            touched = self.muxer.take_touched()
            if not touched:
                return
            for conn in touched:
                self._sync_host(conn)

    def _pump(self) -> None:
        """`_run` after a host event: a bad rx buffer breaks the device, not the event loop."""
        try:
            self._run()
        except VirtqueueError as e:
            if self.transport is not None:
                self.transport.fail(f"rx queue: {e}")

    def _deliver(self) -> None:
        """What the guest is owed, into its rx buffers; kicks stay armed for when it has none."""
        t = self.transport
        q = t.queue(RX_QUEUE) if t is not None else None
        if t is None or q is None:
            return
        pushed = False
        try:
            while True:
                while self.muxer.has_output() and (chain := q.pop()) is not None:
                    room = chain.writable_len - VIRTIO_VSOCK_HDR_SIZE
                    if room < 0:
                        raise VirtqueueError(f"rx buffer {chain.head} cannot hold a packet header")
                    pkt = self.muxer.next_packet(room)
                    if pkt is None:  # only data is owed, and this buffer has no room for any
                        q.unpop()
                        return
                    chain.write(0, pkt[0].pack())
                    chain.write(VIRTIO_VSOCK_HDR_SIZE, pkt[1])
                    q.push(chain.head, VIRTIO_VSOCK_HDR_SIZE + len(pkt[1]))
                    pushed = True
                if not q.enable_kicks() or not self.muxer.has_output():
                    return
        finally:
            if pushed:
                t.interrupt(RX_QUEUE)

    # -- host sockets ---------------------------------------------------------------------------
    def _accept(self) -> None:
        """A host program connected to uds_path; it names the guest port first."""
        if self.listener is None or self.transport is None:
            return
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        g = _Greeting(sock)
        self._greetings[sock.fileno()] = g
        self.transport.add_reader(sock.fileno(), lambda: self._greet(g))

    def _greet(self, g: _Greeting) -> None:
        t = self.transport
        if t is None:
            return
        try:
            data = g.sock.recv(CONNECT_LINE_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        g.line += data
        end = g.line.find(b"\n") + 1
        if not end and data and len(g.line) < CONNECT_LINE_MAX:
            return  # the rest of the line is still coming
        port = parse_connect(bytes(g.line[:end])) if end else None
        conn = self.muxer.host_connect(port) if port is not None else None
        self._drop_greeting(g, close=conn is None)
        if conn is None:
            return
        self._hosts[conn] = _Host(g.sock)
        self.muxer.host_data(conn, bytes(g.line[end:]))  # the stream may follow the line at once
        t.call_later(self.request_timeout, lambda: self._timeout(conn))
        self._pump()

    def _drop_greeting(self, g: _Greeting, close: bool = True) -> None:
        fd = g.sock.fileno()
        if self._greetings.pop(fd, None) is not None and self.transport is not None:
            self.transport.remove_reader(fd)
        if close:
            g.sock.close()

    def _timeout(self, conn: Connection) -> None:
        if conn in self._hosts:
            self.muxer.request_timeout(conn)
            self._pump()

    def _connect(self, conn: Connection) -> None:
        """The guest connects to host port P: whoever listens on `<uds_path>_P`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{conn.local_port}")
        except OSError as e:
            sock.close()
            log.debug("vsock: guest port %d to host port %d: %s", conn.peer_port, conn.local_port, e)
            self.muxer.connected(conn, False)
            return
        self._hosts[conn] = _Host(sock)
        self.muxer.connected(conn, True)

    def _sync_host(self, conn: Connection) -> None:
        """Write what the guest sent, shut what it shut, watch what can move; close what ended."""
        host = self._hosts.get(conn)
        if host is None:
            return
        if conn.to_host and conn.state is not State.CLOSED:
            try:
                self.muxer.host_sent(conn, host.sock.send(conn.to_host, socket.MSG_NOSIGNAL))
            except BlockingIOError:
                pass
            except OSError as e:
                log.debug("vsock: host port %d: %s", conn.local_port, e)
                self.muxer.host_error(conn)
        if conn.state is State.CLOSED:
            self._close_host(conn)
            return
        if conn.stop_host_writes and not host.shut_wr:
            host.shut_wr = True
            with contextlib.suppress(OSError):
                host.sock.shutdown(socket.SHUT_WR)
        if conn.stop_host_reads and not host.shut_rd:
            host.shut_rd = True
            with contextlib.suppress(OSError):
                host.sock.shutdown(socket.SHUT_RD)
        self._watch(conn, host)

    def _watch(self, conn: Connection, host: _Host) -> None:
        """Read while the guest has credit; wait for writability while bytes wait for the host."""
        t = self.transport
        if t is None:
            return
        fd = host.sock.fileno()
        reading = conn.host_room() > 0
        if reading != host.reading:
            host.reading = reading
            if reading:
                t.add_reader(fd, lambda: self._readable(conn))
            else:
                t.remove_reader(fd)
        writing = bool(conn.to_host)
        if writing != host.writing:
            host.writing = writing
            if writing:
                t.add_writer(fd, lambda: self._writable(conn))
            else:
                t.remove_writer(fd)

    def _writable(self, conn: Connection) -> None:
        self._sync_host(conn)
        self._pump()

    def _readable(self, conn: Connection) -> None:
        host = self._hosts.get(conn)
        if host is None:
            return
        room = conn.host_room()
        if room:
            try:
                data = host.sock.recv(min(room, RECV_MAX))
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("vsock: host port %d: %s", conn.local_port, e)
                self.muxer.host_error(conn)
            else:
                if data:
                    self.muxer.host_data(conn, data)
                else:
                    self.muxer.host_eof(conn)
        else:
            self._watch(conn, host)
        self._pump()

    def _close_host(self, conn: Connection) -> None:
        host = self._hosts.pop(conn, None)
        if host is None:
            return
        t = self.transport
        if t is not None:
            fd = host.sock.fileno()
            if host.reading:
                t.remove_reader(fd)
            if host.writing:
                t.remove_writer(fd)
        host.sock.close()
