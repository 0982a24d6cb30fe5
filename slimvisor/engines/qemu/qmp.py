"""A small synchronous QMP client (docs/interop/qmp-spec.rst in the QEMU tree).

Why not the QEMU project's qemu.qmp: it is asyncio, and its synchronous wrapper runs an event
loop of its own inside each call; the supervisor is one epoll loop that must watch the QMP
socket for events (SHUTDOWN, RESET, GUEST_PANICKED) beside its other fds. QMP is JSON lines
over a socket; this client is that and nothing more: commands wait for their `return` or
`error` with a deadline, events are queued and read without blocking.

QEMU is the client here: it connects to a socket the supervisor listens on (bind-mounted into
its jail), so nothing in the jail has to be created or waited for on the host side.
"""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any

from slimvisor.engines.base import EngineError

MAX_LINE = 1 << 20  # a QMP message longer than this is a broken or hostile peer


class QmpError(EngineError):
    """QEMU answered a command with an error, or the monitor broke."""


class Qmp:
    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = b""
        self.queued: list[dict[str, Any]] = []
        self.next_id = 0
        self.eof = False  # QEMU closed the monitor: it is exiting
        greeting = self._message(time.monotonic() + timeout)
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {str(greeting)[:200]}")
        self.execute("qmp_capabilities", timeout=timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def execute(self, command: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run `command`; its return value, or QmpError with QEMU's message."""
        self.next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self.next_id}
        if args:
            msg["arguments"] = args
        deadline = time.monotonic() + timeout
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except BlockingIOError:  # the monitor is not reading: treat as broken
            raise QmpError(f"{command}: QEMU's monitor does not read") from None
        except OSError as e:
            raise QmpError(f"{command}: {e.strerror or e}") from None
        while True:
            reply = self._message(deadline, command)
            if "event" in reply:
                self.queued.append(reply)
                continue
            if reply.get("id") != self.next_id:
                continue  # an answer to a command that timed out earlier
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def events(self) -> list[dict[str, Any]]:
        """Events that arrived, without waiting (after `eof`, none will come)."""
        if not self.eof:
            self._fill(block=False)
        out = self.queued
        self.queued = []
        while (msg := self._pop()) is not None:
            if "event" in msg:
                out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()

    # -- framing -------------------------------------------------------------------------------
    def _pop(self) -> dict[str, Any] | None:
        line, nl, rest = self.buf.partition(b"\n")
        if not nl:
            if len(self.buf) > MAX_LINE:
                raise QmpError("QMP message too long")
            return None
        self.buf = rest
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"not JSON from QMP: {line[:100]!r}") from None
        if not isinstance(msg, dict):
            raise QmpError(f"not a QMP message: {line[:100]!r}")
        return msg

    def _message(self, deadline: float, what: str = "greeting") -> dict[str, Any]:
        while (msg := self._pop()) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise QmpError(f"{what}: QEMU did not answer in time")
            self._fill(block=True)
        return msg

    def _fill(self, block: bool) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                raise QmpError(f"QMP: {e.strerror or e}") from None
            if not data:
                self.eof = True
                if block:
                    raise QmpError("QEMU closed its monitor")
                return
            self.buf += data
            if block:
                return
