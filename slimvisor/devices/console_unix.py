"""A virtio-console port on a Unix socket: the console device's I/O edge for channels.

For a guest agent, as QEMU's socket-backed virtserialport: `/dev/virtio-ports/NAME` in the guest,
a Unix socket on the host, one client at a time.
"""

from __future__ import annotations

import contextlib
import os
import socket

from slimvisor.devices.console import ConsoleDevice
from slimvisor.runtime.loop import Loop
from slimvisor.runtime.unix import listen_unix

MAX_OUTPUT = 1 << 20  # guest output a Unix socket client has not taken yet
RECV_SIZE = 1 << 16


class UnixPortBinding:
    """One port as a Unix socket on the host: one client at a time, bytes pumped both ways.

    The port is open on the host side only while a client is connected, so the guest sees the
    other end come and go (PORT_OPEN) as it does with QEMU's socket-backed ports.
    """

    def __init__(self, device: ConsoleDevice, port_id: int, path: str, loop: Loop | None = None) -> None:
        ev = loop if loop is not None else device.transport
        if ev is None:
            raise ValueError("UnixPortBinding needs an event loop: pass one, or attach the device first")
        self.device, self.port_id, self.path, self.loop = device, port_id, path, ev
        self.port = device._port(port_id)
        self.client: socket.socket | None = None
        self.out = bytearray()  # guest output the client has not taken yet
        self.dropped = 0  # guest output dropped: no client, or one that does not read
        self._writing = False  # the loop watches the client for room to take the rest of out
        self.listener = listen_unix(path)
        try:
            self.listener.setblocking(False)
            ev.add_reader(self.listener.fileno(), self._accept)
        except BaseException:
            self.listener.close()
            os.unlink(path)
            raise
        self.port.output = self._output
        device.set_host_open(port_id, False)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        if self.client is not None:
            conn.close()  # one client at a time; the next may come when this one leaves
            return
        conn.setblocking(False)
        self.client = conn
        self.loop.add_reader(conn.fileno(), self._readable)
        self.device.set_host_open(self.port_id, True)

    def _readable(self) -> None:
        if self.client is None:
            return
        try:
            data = self.client.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.device.port_write(self.port_id, data)
        else:
            self._hang_up()

    def _output(self, data: bytes) -> None:
        if self.client is None or len(self.out) + len(data) > MAX_OUTPUT:
            self.dropped += len(data)
            return
        self.out += data
        self._send()

    def _send(self) -> None:
        if self.client is None:
            return
        try:
            del self.out[: self.client.send(self.out)]
        except BlockingIOError:
            pass
        except OSError:
            self._hang_up()
            return
        if bool(self.out) != self._writing:  # a slow client: the rest goes when it has room
            self._writing = bool(self.out)
            if self._writing:
                self.loop.add_writer(self.client.fileno(), self._send)
            else:
                self.loop.remove_writer(self.client.fileno())

    def _hang_up(self) -> None:
        if self.client is not None:
            if self._writing:
                self._writing = False
                self.loop.remove_writer(self.client.fileno())
            self.loop.remove_reader(self.client.fileno())
            self.client.close()
            self.client = None
        self.out.clear()
        self.device.set_host_open(self.port_id, False)

    def close(self) -> None:
        self._hang_up()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.port.output = None
