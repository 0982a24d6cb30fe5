"""virtio-vsock's host side on Unix sockets, as Firecracker has it: the vsock device's I/O edge.

A host program connects to `uds_path`, writes `CONNECT <port>\\n` and, once the guest accepts,
reads `OK <host port>\\n` and then the stream; if nothing listens on that guest port its socket
is closed. A guest connecting to the host (CID 2) on port P reaches whoever listens on
`<uds_path>_P`: RESPONSE if the connect works, RST if not. The sockets are non-blocking, served
by the transport's event loop; the protocol is the device's muxer (sans-IO).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field

from slimvisor.devices.vsock import VsockDevice
from slimvisor.devices.vsock_muxer import CONN_BUF_ALLOC, CONNECT_LINE_MAX, Connection, State, parse_connect
from slimvisor.runtime.unix import listen_unix
from slimvisor.virtio.device import Transport

log = logging.getLogger("slimvisor.devices.vsock")

CONN_REQUEST_TIMEOUT = 2.0  # seconds a host-initiated REQUEST waits for its RESPONSE (Firecracker's)
RECV_MAX = 64 * 1024
LISTEN_BACKLOG = 64


def unix_vsock(guest_cid: int, uds_path: str, *, buf_alloc: int = CONN_BUF_ALLOC,
               request_timeout: float = CONN_REQUEST_TIMEOUT) -> VsockDevice:  # fmt: skip
    """A vsock device whose host side is Unix sockets at `uds_path` (and `<uds_path>_PORT`)."""
    return VsockDevice(guest_cid, UnixHostSide(uds_path, request_timeout=request_timeout), buf_alloc=buf_alloc)


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


class UnixHostSide:
    """The socket at uds_path exists from `bind` (the device's construction) to `close`; host
    programs that connect while no front-end is attached wait in its backlog."""

    def __init__(self, uds_path: str, *, request_timeout: float = CONN_REQUEST_TIMEOUT) -> None:
        self.uds_path = uds_path
        self.request_timeout = request_timeout
        self.listener: socket.socket | None = None
        self._hosts: dict[Connection, _Host] = {}
        self._greetings: dict[int, _Greeting] = {}  # by fd

    def bind(self, device: VsockDevice) -> None:
        self.dev = device
        self.listener = listen_unix(self.uds_path)
        self.listener.setblocking(False)
        self.listener.listen(LISTEN_BACKLOG)

    def attach(self, transport: Transport) -> None:
        if self.listener is not None:
            transport.add_reader(self.listener.fileno(), self._accept)

    def detach(self, transport: Transport) -> None:
        if self.listener is not None:
            transport.remove_reader(self.listener.fileno())

    def end_all(self) -> None:
        for conn in list(self._hosts):
            self._close_host(conn)
        for g in list(self._greetings.values()):
            self._drop_greeting(g)

    def close(self, transport: Transport | None) -> None:
        if self.listener is not None:
            if transport is not None:
                transport.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)

    # -- host connections ---------------------------------------------------------------------------
    def _accept(self) -> None:
        """A host program connected to uds_path; it names the guest port first."""
        if self.listener is None or self.dev.transport is None:
            return
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        g = _Greeting(sock)
        self._greetings[sock.fileno()] = g
        self.dev.transport.add_reader(sock.fileno(), lambda: self._greet(g))

    def _greet(self, g: _Greeting) -> None:
        t = self.dev.transport
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
        conn = self.dev.muxer.host_connect(port) if port is not None else None
        self._drop_greeting(g, close=conn is None)
        if conn is None:
            return
        self._hosts[conn] = _Host(g.sock)
        self.dev.muxer.host_data(conn, bytes(g.line[end:]))  # the stream may follow the line at once
        t.call_later(self.request_timeout, lambda: self._timeout(conn))
        self.dev.pump()

    def _drop_greeting(self, g: _Greeting, close: bool = True) -> None:
        fd = g.sock.fileno()
        if self._greetings.pop(fd, None) is not None and self.dev.transport is not None:
            self.dev.transport.remove_reader(fd)
        if close:
            g.sock.close()

    def _timeout(self, conn: Connection) -> None:
        if conn in self._hosts:
            self.dev.muxer.request_timeout(conn)
            self.dev.pump()

    def connect(self, conn: Connection) -> None:
        """The guest connects to host port P: whoever listens on `<uds_path>_P`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{conn.local_port}")
        except OSError as e:
            sock.close()
            log.debug("vsock: guest port %d to host port %d: %s", conn.peer_port, conn.local_port, e)
            self.dev.muxer.connected(conn, False)
            return
        self._hosts[conn] = _Host(sock)
        self.dev.muxer.connected(conn, True)

    def sync(self, conn: Connection) -> None:
        """Write what the guest sent, shut what it shut, watch what can move; close what ended."""
        host = self._hosts.get(conn)
        if host is None:
            return
        if conn.to_host and conn.state is not State.CLOSED:
            try:
                self.dev.muxer.host_sent(conn, host.sock.send(conn.to_host, socket.MSG_NOSIGNAL))
            except BlockingIOError:
                pass
            except OSError as e:
                log.debug("vsock: host port %d: %s", conn.local_port, e)
                self.dev.muxer.host_error(conn)
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
        t = self.dev.transport
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
        self.sync(conn)
        self.dev.pump()

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
                self.dev.muxer.host_error(conn)
            else:
                if data:
                    self.dev.muxer.host_data(conn, data)
                else:
                    self.dev.muxer.host_eof(conn)
        else:
            self._watch(conn, host)
        self.dev.pump()

    def _close_host(self, conn: Connection) -> None:
        host = self._hosts.pop(conn, None)
        if host is None:
            return
        t = self.dev.transport
        if t is not None:
            fd = host.sock.fileno()
            if host.reading:
                t.remove_reader(fd)
            if host.writing:
                t.remove_writer(fd)
        host.sock.close()
