"""Control sockets: one JSON request and one JSON reply per connection, over a Unix socket.

Used between dom0's own processes (the runner asks a switch for a port). Requests are bounded in
size and time; a peer that sends garbage gets an error reply, never a crash of the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from slimvisor.runtime.errors import SlimvisorError
from slimvisor.runtime.loop import Loop

MAX_REQUEST = 64 * 1024
MAX_FDS = 4  # descriptors one request may carry (a migration's channel)
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(SlimvisorError):
    """The other side answered with an error, or could not be reached."""


def request(path: str, req: dict[str, Any], timeout: float = 10.0, fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Send `req` (with `fds`, passed along: the handler finds them in req["_fds"]); return the
    reply, raising ControlError for {"error": ...} replies."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            data = json.dumps(req).encode() + b"\n"
            if fds:
                socket.send_fds(s, [data[:1]], list(fds))
                data = data[1:]
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from e
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError as e:
        raise ControlError(f"{path}: malformed reply") from e
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply


class ControlServer:
    """Serves `handler` on `path` inside the process's event loop."""

    def __init__(self, loop: Loop, path: str, handler: Handler) -> None:
        self.loop = loop
        self.path = path
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.fds: dict[int, list[int]] = {}  # passed with a request not yet complete, by connection
        loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.clients[conn.fileno()] = (conn, bytearray())
        self.loop.add_reader(conn.fileno(), lambda: self._readable(conn))

    def _readable(self, conn: socket.socket) -> None:
        _, buf = self.clients[conn.fileno()]
        try:
            chunk, fds, _, _ = socket.recv_fds(conn, 65536, MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            chunk, fds = b"", []
        self.fds.setdefault(conn.fileno(), []).extend(fds)
        buf += chunk
        if chunk and b"\n" not in buf and len(buf) < MAX_REQUEST:
            return
        reply: dict[str, Any]
        req: Any = None
        try:
            req = json.loads(bytes(buf[:MAX_REQUEST]).split(b"\n", 1)[0])
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            req["_fds"] = self.fds.pop(conn.fileno(), [])  # the handler takes those it keeps (pops them)
            reply = self.handler(req)
        except ValueError as e:
            reply = {"error": f"bad request: {e}"}
        except Exception as e:  # the handler's failure is the client's answer, not our crash
            reply = {"error": str(e)}
        for fd in self.fds.pop(conn.fileno(), []) + (req.get("_fds", []) if isinstance(req, dict) else []):
            os.close(fd)
        self._finish(conn, json.dumps(reply).encode() + b"\n")

    def _finish(self, conn: socket.socket, data: bytes) -> None:
        self.loop.remove_reader(conn.fileno())
        del self.clients[conn.fileno()]
        for fd in self.fds.pop(conn.fileno(), []):
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(data)
        conn.close()

    def close(self) -> None:
        for conn, _ in list(self.clients.values()):
            self.loop.remove_reader(conn.fileno())
            conn.close()
        self.clients.clear()
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        self.fds.clear()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
