"""The event loop of every dom0 process: one epoll over fds, plus timers and deferred calls.

Devices, control sockets, the xenstore and vhost-user connections all register here; a process
(backend, supervisor, switch, toolstack daemon) runs exactly one loop, on one thread.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import select
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

_READ_EVENTS = ~select.EPOLLOUT
_WRITE_EVENTS = ~select.EPOLLIN


class Loop(Protocol):
    """What a device or a port binding needs of the loop it runs on (tests pass their own)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_writer(self, fd: int) -> None: ...


class EventLoop:
    """The event loop of a dom0 process: sockets, kick fds, host fds of devices, timers.

    One per process; everything that waits on an fd or a timer (devices, control sockets, the
    xenstore, vhost-user connections) is served from it on one thread.
    """

    def __init__(self) -> None:
        # epoll itself, not `selectors`: every kick of every guest goes through `run_once`, and
        # the per-event key objects of `selectors` cost a guest a visible share of its latency.
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._soon: list[Callable[[], None]] = []
        self._at_close: list[Callable[[], None]] = []

    # -- what devices use (Loop) ---------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` after `delay` seconds, in a later loop turn than this one even when
        the delay is 0: work that goes on in timers (a queue's drain budget) lets every ready fd
        have its turn in between."""
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
                try:
                    self._epoll.register(fd, events)
                except OSError:  # epoll takes no regular files: the caller hears, nothing is kept
                    table.pop(fd, None)
                    raise
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
        last_timer = self._timer_seq  # timers set from here on wait for a later turn
        for fd, events in self._epoll.poll(-1 if timeout is None else timeout):
            # As `selectors` does: an error or hang-up wakes both directions.
            if events & _READ_EVENTS and (callback := readers.get(fd)) is not None:
                self._guarded(callback)
            if events & _WRITE_EVENTS and (callback := writers.get(fd)) is not None:  # may be gone by now
                self._guarded(callback)
        if self._timers:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self._timers[0][1] <= last_timer:
                self._guarded(heapq.heappop(self._timers)[2])
        while self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                self._guarded(callback)

    def at_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the server closes (host-side sockets that devices opened)."""
        self._at_close.append(callback)

    def close(self) -> None:
        self.run_at_close()
        self._epoll.close()

    def run_at_close(self) -> None:
        """Run what `at_close` registered, newest first, once (a subclass closes its own after)."""
        for callback in reversed(self._at_close):
            self._guarded(callback)
        self._at_close = []
