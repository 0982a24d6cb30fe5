"""The public API of slimvisord: JSON lines over a Unix socket, versioned, with a feature list.

This is the one interface outside clients see (docs/api.md): the CLI uses nothing else. A
connection opens with `hello`, naming the client's API version; the daemon answers with the
version it will speak and the operations it has. An operation the daemon lacks is answered with
the error code "not-supported", never silently ignored.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slimvisor import __version__
from slimvisor.runtime.errors import SlimvisorError
from slimvisor.runtime.paths import runtime_base

API_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_LINE = 1 << 20

# Error codes (docs/api.md, "Errors").
E_BAD_REQUEST = "bad-request"
E_NOT_SUPPORTED = "not-supported"
E_VERSION = "version"
E_NO_DOMAIN = "no-such-domain"
E_EXISTS = "exists"
E_CONFIG = "config"
E_FAILED = "failed"


class ApiError(SlimvisorError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def socket_path() -> Path:
    env = os.environ.get("SLIMVISOR_SOCKET")
    return Path(env) if env else runtime_base() / "slimvisord.sock"


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class Client:
    """One connection to the daemon; `call` sends an operation and returns its reply."""

    def __init__(self, path: Path | None = None, *, autostart: bool = True, timeout: float = 120.0,
                 sock: socket.socket | None = None) -> None:  # fmt: skip
        """Connect to the daemon at `path`, or speak over `sock`, already connected to one (through
        `ssh HOST slimvisor migrate-receive`, for a migration)."""
        self.path = path or socket_path()
        self.sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            if sock is None:
                self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            if not autostart:
                self.sock.close()
                raise ApiError(E_FAILED, f"slimvisord is not running ({self.path})") from None
            self._start_daemon()
        self.buf = b""
        self._next_id = 0
        hello = self.call("hello", version=API_VERSION, client=f"slimvisor-cli {__version__}")
        self.version: int = hello["version"]
        self.features: list[str] = hello["features"]
        self.info: dict[str, Any] = hello

    def _start_daemon(self) -> None:
        """Start slimvisord on demand, as `xl` expects its daemons to be there."""
        subprocess.run([sys.executable, "-m", "slimvisor.toolstack.daemon", "--daemonize", "--socket", str(self.path)],
                       check=True, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                self.sock.connect(str(self.path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise ApiError(E_FAILED, f"slimvisord did not come up on {self.path}") from None
                time.sleep(0.05)

    def send(self, op: str, **args: Any) -> int:
        self._next_id += 1
        self.sock.sendall(encode({"id": self._next_id, "op": op, **args}))
        return self._next_id

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        """The next message from the daemon, with any fds it passed along."""
        fds: list[int] = []
        while b"\n" not in self.buf:
            data, got, _, _ = socket.recv_fds(self.sock, 65536, 4)
            fds += got
            if not data:
                raise ApiError(E_FAILED, "slimvisord closed the connection")
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise ApiError(E_FAILED, "slimvisord sent an oversized message")
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg, fds

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        return self.call_with_fds(op, **args)[0]

    def call_with_fds(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        if op != "hello" and op not in getattr(self, "features", [op]):
            raise ApiError(E_NOT_SUPPORTED, f"slimvisord (API {self.version}) does not support {op!r}")
        req_id = self.send(op, **args)
        while True:
            msg, fds = self.receive()
            if msg.get("id") != req_id:
                continue  # an event for a subscription this caller does not read
            if "error" in msg:
                for fd in fds:
                    os.close(fd)
                err = msg["error"]
                raise ApiError(err.get("code", E_FAILED), err.get("message", "error"))
            return msg, fds

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
