"""A small QMP client for an event loop (docs/interop/qmp-spec.rst in the QEMU tree).

Why not the QEMU project's qemu.qmp: it is asyncio, and its synchronous wrapper runs an event
loop of its own inside each call; the supervisor is one epoll loop that must watch the QMP socket
beside its other fds. And the supervisor must never wait for QEMU while QEMU waits for it: it
serves the domain's vhost-user devices in the same loop, and QEMU talks vhost-user synchronously
while it starts and on `stop`/`cont` (GET_VRING_BASE and friends). So the handshake runs from
`pump()` as data arrives, `send()` does not wait for the answer, and only `execute()` (for commands
that need no device: query-cpus-fast, balloon, system_powerdown) waits, with a deadline.

QEMU is the client here: it connects to a socket the supervisor listens on (bind-mounted into its
jail) before it creates any device, so nothing in the jail has to be created or waited for.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from slimvisor.engines.base import EngineError

log = logging.getLogger("slimvisor.qmp")

MAX_BUFFER = 1 << 20  # unparsed QMP input beyond this is a broken or hostile peer
MAX_EVENTS = 1024  # events not yet collected; older ones are dropped beyond this


class QmpError(EngineError):
    """QEMU answered a command with an error, or the monitor broke."""


class Qmp:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}  # answers to execute(), by id
        self.sent: dict[int, str] = {}  # id -> command, until answered
        self.unawaited: set[int] = set()  # ids of send(): their answers are only logged
        self.callbacks: dict[int, Callable[[Any, str | None], None]] = {}  # ids of call(): answered in pump()
        self.next_id = 0
        self.greeted = self.ready = self.eof = False
        self.capabilities_id = -1

    def fileno(self) -> int:
        return self.sock.fileno()

    def pump(self) -> None:
        """Read what arrived without waiting: the greeting (then negotiate), answers, events."""
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:
                raise QmpError(f"QMP: {e.strerror or e}") from None
            if not data:
                self.eof = True  # QEMU is exiting
                break
            self.buf += data
            if len(self.buf) > MAX_BUFFER:
                raise QmpError("QMP: a message longer than 1 MiB")
        while (msg := self._pop()) is not None:
            self._dispatch(msg)

    def send(self, command: str, args: dict[str, Any] | None = None) -> None:
        """Send `command` without waiting (stop, cont: QEMU talks to the devices before it answers);
        an error answer is logged when it comes."""
        self._ready(command)
        self.unawaited.add(self._send(command, args))

    def call(self, command: str, args: dict[str, Any] | None, done: Callable[[Any, str | None], None],
             fd: int = -1) -> None:  # fmt: skip
        """Send `command` (with `fd` passed along, for getfd) without waiting; `done(return, error)`
        runs from `pump()` when QEMU answers: for commands during which QEMU may talk to devices
        this process serves (migrate, and query-migrate while a migration thread holds QEMU's lock)."""
        self._ready(command)
        self.callbacks[self._send(command, args, fd)] = done

    def execute(self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run a command that needs no vhost-user device; its return value, or QmpError."""
        self._ready(command)
        ident = self._send(command, args)
        deadline = time.monotonic() + timeout
        while ident not in self.replies:
            left = deadline - time.monotonic()
            if self.eof:
                raise QmpError(f"{command}: QEMU closed its monitor")
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                self.unawaited.add(ident)  # a late answer is dropped
                raise QmpError(f"{command}: QEMU did not answer in {timeout:g} s")
            self.pump()
        reply = self.replies.pop(ident)
        if "error" in reply:
            raise QmpError(f"{command}: {_error_text(reply['error'])}")
        return reply.get("return")

    def _ready(self, command: str) -> None:
        if self.eof:
            raise QmpError(f"{command}: QEMU closed its monitor")
        if not self.ready:
            raise QmpError(f"{command}: QEMU is still starting")

    def collect(self) -> list[dict[str, Any]]:
        """The events that arrived since last asked."""
        self.pump()
        out, self.events = self.events, []
        return out

    def close(self) -> None:
        self.sock.close()

    # -- protocol ------------------------------------------------------------------------------
    def _send(self, command: str, args: dict[str, Any] | None, fd: int = -1) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self.next_id}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg).encode() + b"\n"
        try:
            sent = socket.send_fds(self.sock, [data], [fd]) if fd >= 0 else self.sock.send(data)
            if sent != len(data):
                raise QmpError(f"{command}: QEMU's monitor does not read")
        except BlockingIOError:
            raise QmpError(f"{command}: QEMU's monitor does not read") from None
        except OSError as e:
            raise QmpError(f"{command}: {e.strerror or e}") from None
        self.sent[self.next_id] = command
        return self.next_id

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if not self.greeted:
            if "QMP" not in msg:
                raise QmpError(f"not a QMP greeting: {str(msg)[:200]}")
            self.greeted = True
            self.capabilities_id = self._send("qmp_capabilities", None)
            return
        if "event" in msg:
            self.events = [*self.events[-(MAX_EVENTS - 1) :], msg]
            return
        ident = msg.get("id")
        if not isinstance(ident, int) or ident not in self.sent:
            return  # not ours
        command = self.sent.pop(ident)
        if ident == self.capabilities_id:
            if "error" in msg:
                raise QmpError(f"qmp_capabilities: {msg['error']}")
            self.ready = True
        elif ident in self.callbacks:
            error = _error_text(msg["error"]) if "error" in msg else None
            self.callbacks.pop(ident)(msg.get("return"), error)
        elif ident in self.unawaited:
            self.unawaited.discard(ident)
            if "error" in msg:
                log.warning("QMP %s: %s", command, _error_text(msg["error"]))
        else:
            self.replies[ident] = msg

    def _pop(self) -> dict[str, Any] | None:
        line, nl, rest = self.buf.partition(b"\n")
        if not nl:
            return None
        self.buf = rest
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"not JSON from QMP: {line[:100]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"not a QMP message: {line[:100]!r}")
        return msg


def _error_text(error: Any) -> str:
    """QMP's error object's description (qmp-spec: "error": {"class", "desc"}), whatever QEMU sent."""
    return str(error.get("desc", error)) if isinstance(error, dict) else str(error)[:200]
