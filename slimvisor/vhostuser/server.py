"""The I/O edge of vhost-user: listening sockets, fd passing, kick eventfds, on the process's loop.

One `VhostUserServer` serves any number of devices, each on its own Unix socket, one front-end at
a time per socket (a front-end that reconnects, as UML does after a reboot, gets a fresh connection
state). A front-end that breaks the protocol loses its connection; the process, the other
connections and the disk files stay as they are.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from slimvisor.runtime.loop import EventLoop
from slimvisor.vhostuser.backend import VhostUserBackend
from slimvisor.vhostuser.protocol import MAX_FDS, MessageReader, ProtocolError
from slimvisor.virtio.device import VirtioDevice

log = logging.getLogger(__name__)

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _at_eof(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@dataclass
class Endpoint:
    """A device behind one listening socket."""

    device: VirtioDevice
    listener: socket.socket
    name: str
    path: str | None = None  # unlinked on close when this process created it
    conn: socket.socket | None = None
    backend: VhostUserBackend | None = None
    reader: MessageReader = field(default_factory=MessageReader)
    kicks: dict[int, int] = field(default_factory=dict)


class VhostUserServer(EventLoop):
    """An event loop that also serves vhost-user endpoints (a backend process's loop)."""

    def __init__(self, *, unsealed_memory: bool = False) -> None:
        """`unsealed_memory`: front-ends may share memory files not sealed against shrinking
        (see `VhostUserBackend`): only where every front-end is an engine in slimvisor's jail."""
        super().__init__()
        self.endpoints: list[Endpoint] = []
        self.unsealed_memory = unsealed_memory

    def add(self, device: VirtioDevice, listener: socket.socket, name: str, path: str | None = None) -> None:
        listener.setblocking(False)
        ep = Endpoint(device, listener, name, path)
        self.endpoints.append(ep)
        self.add_reader(listener.fileno(), lambda: self._accept(ep))

    def remove(self, name: str) -> bool:
        """Stop serving the endpoint called `name` (disconnecting its front-end)."""
        for ep in self.endpoints:
            if ep.name == name:
                self._close_endpoint(ep)
                self.endpoints.remove(ep)
                return True
        return False

    def close(self) -> None:
        self.run_at_close()  # the devices' own host sockets first, then the endpoints, then epoll
        for ep in self.endpoints:
            self._close_endpoint(ep)
        self.endpoints = []
        super().close()

    def _close_endpoint(self, ep: Endpoint) -> None:
        self._disconnect(ep)
        self.remove_reader(ep.listener.fileno())
        ep.listener.close()
        if ep.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)
        ep.device.close()

    # -- connections ----------------------------------------------------------------------------
    def _accept(self, ep: Endpoint) -> None:
        try:
            conn, _ = ep.listener.accept()
        except BlockingIOError:
            return
        if ep.conn is not None and _at_eof(ep.conn):
            self._disconnect(ep)  # the old front-end is gone; its EOF is simply not handled yet
        if ep.conn is not None:
            log.warning("%s: refusing a second front-end while one is connected", ep.name)
            conn.close()
            return
        conn.setblocking(False)
        ep.conn = conn
        ep.backend = VhostUserBackend(ep.device, ep.name, loop=self, unsealed_memory=self.unsealed_memory)
        ep.reader = MessageReader()
        self.add_reader(conn.fileno(), lambda: self._readable(ep))
        log.info("%s: front-end connected", ep.name)

    def _disconnect(self, ep: Endpoint, why: str = "") -> None:
        if ep.conn is None:
            return
        if why:
            log.warning("%s: closing the connection: %s", ep.name, why)
        self._unwatch_kicks(ep)
        self.remove_reader(ep.conn.fileno())
        ep.conn.close()
        ep.conn = None
        ep.reader.close()
        if ep.backend is not None:
            ep.backend.close()
            ep.backend = None
        ep.device.reset()

    def _readable(self, ep: Endpoint) -> None:
        assert ep.conn is not None and ep.backend is not None
        try:
            data, ancdata, _flags, _ = ep.conn.recvmsg(ep.reader.wanted(), _CMSG_SPACE)
        except BlockingIOError:
            return
        except OSError as e:
            self._disconnect(ep, str(e))
            return
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            for fd in fds:
                os.close(fd)
            self._disconnect(ep)
            log.info("%s: front-end disconnected", ep.name)
            return
        try:
            msg = ep.reader.feed(data, fds)
            if msg is None:
                return
            self._unwatch_kicks(ep)  # the backend may close kick fds: unwatch them while still open
            out = ep.backend.handle(msg)
            if out is not None and ep.conn.send(out) != len(out):
                raise ProtocolError("front-end is not reading replies")
        except ProtocolError as e:
            self._disconnect(ep, str(e))
            return
        except Exception as e:  # a bug of ours must not take the other devices down
            log.exception("%s: internal error", ep.name)
            self._disconnect(ep, f"internal error: {e}")
            return
        self._sync_kicks(ep)

    def _unwatch_kicks(self, ep: Endpoint) -> None:
        for fd in ep.kicks:
            self.remove_reader(fd)
        ep.kicks = {}

    def _sync_kicks(self, ep: Endpoint) -> None:
        """Watch the running rings' kick fds; one epoll refuses ends the connection, not the loop."""
        assert ep.backend is not None
        kicks = ep.backend.kick_fds()
        for fd, index in kicks.items():
            try:
                self.add_reader(fd, self._kick_callback(ep, fd, index))
            except OSError as e:
                self._disconnect(ep, f"kick fd of queue {index}: {e}")
                return
            ep.kicks[fd] = index

    def _kick_callback(self, ep: Endpoint, fd: int, index: int) -> Callable[[], None]:
        def on_kick() -> None:
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
            except OSError as e:
                self._disconnect(ep, f"kick fd: {e}")
                return
            if ep.backend is not None:
                try:
                    ep.backend.kick(index)
                except Exception as e:
                    log.exception("%s: internal error", ep.name)
                    self._disconnect(ep, f"internal error: {e}")

        return on_kick
