"""The I/O edge of vhost-user: listening sockets, fd passing, kick eventfds, one epoll loop.

One `Server` serves any number of devices, each on its own Unix socket, one front-end at a time
per socket (a front-end that reconnects, as UML does after a reboot, gets a fresh connection
state). A front-end that breaks the protocol loses its connection; the process, the other
connections and the disk files stay as they are.
"""

from __future__ import annotations

import array
import contextlib
import heapq
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from slimvisor.vhostuser.backend import VhostUserBackend
from slimvisor.vhostuser.protocol import MAX_FDS, MessageReader, ProtocolError
from slimvisor.virtio.device import VirtioDevice

log = logging.getLogger(__name__)

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_READ_EVENTS = ~select.EPOLLOUT
_WRITE_EVENTS = ~select.EPOLLIN


def listen_unix(path: str) -> socket.socket:
    """A listening vhost-user socket at `path`; refuses to replace a socket that is in use."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket from a process that died
        else:
            raise FileExistsError(f"{path}: another backend is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


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


class Server:
    """The event loop of a backend process: sockets, kick fds, host fds of devices, timers."""

    def __init__(self) -> None:
        # epoll itself, not `selectors`: every kick of every guest goes through `run_once`, and
        # the per-event key objects of `selectors` cost a guest a visible share of its latency.
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self.endpoints: list[Endpoint] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._soon: list[Callable[[], None]] = []
        self._at_close: list[Callable[[], None]] = []

    # -- event loop for devices (slimvisor.vhostuser.backend.EventLoop) --------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, callback))

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` at the end of this loop turn, once every ready fd has been served."""
        self._soon.append(callback)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, self._readers, callback)

    def remove_reader(self, fd: int) -> None:
        self._watch(fd, self._readers, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, self._writers, callback)

    def remove_writer(self, fd: int) -> None:
        self._watch(fd, self._writers, None)

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def watching(self, fd: int) -> bool:
        return fd in self._readers or fd in self._writers

    def _watch(self, fd: int, table: dict[int, Callable[[], None]], callback: Callable[[], None] | None) -> None:
        """Set or clear one direction of `fd`; epoll follows. Unwatch an fd before closing it."""
        known = self.watching(fd)
        if callback is None:
            table.pop(fd, None)
        else:
            table[fd] = callback
        events = (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)
        if not known:
            if events:
                self._epoll.register(fd, events)
        elif events:
            try:
                self._epoll.modify(fd, events)
            except FileNotFoundError:  # closed without being unwatched, and its number reused
                self._epoll.register(fd, events)
        else:
            with contextlib.suppress(OSError):  # already closed: epoll forgot it by itself
                self._epoll.unregister(fd)

    @staticmethod
    def _guarded(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # one device's bug must not stop the loop serving the others
            log.exception("internal error in a device callback")

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

    def serve_forever(self) -> None:
        while True:
            self.run_once(None)

    def run_once(self, timeout: float | None) -> None:
        if self._soon:
            timeout = 0.0
        if self._timers:
            until_timer = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until_timer if timeout is None else min(timeout, until_timer)
        readers, writers = self._readers, self._writers
        for fd, events in self._epoll.poll(-1 if timeout is None else timeout):
            # As `selectors` does: an error or hang-up wakes both directions.
            if events & _READ_EVENTS and (callback := readers.get(fd)) is not None:
                self._guarded(callback)
            if events & _WRITE_EVENTS and (callback := writers.get(fd)) is not None:  # may be gone by now
                self._guarded(callback)
        if self._timers:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guarded(heapq.heappop(self._timers)[2])
        while self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                self._guarded(callback)

    def at_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the server closes (host-side sockets that devices opened)."""
        self._at_close.append(callback)

    def close(self) -> None:
        for callback in reversed(self._at_close):
            self._guarded(callback)
        self._at_close = []
        for ep in self.endpoints:
            self._close_endpoint(ep)
        self.endpoints = []
        self._epoll.close()

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
        ep.backend = VhostUserBackend(ep.device, ep.name, loop=self)
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
        assert ep.backend is not None
        ep.kicks = ep.backend.kick_fds()
        for fd, index in ep.kicks.items():
            self.add_reader(fd, self._kick_callback(ep, fd, index))

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
