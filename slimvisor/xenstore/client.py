"""A xenstore client over the wire protocol: what libxenstore is to xl, for `slimvisor xenstore-*`.

It speaks to the daemon's xenstore socket exactly as Debian's xenstore-utils do, so the CLI's
conveniences and outside tools see one store through one public protocol.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from slimvisor.xenstore.wire import (
    XS_DIRECTORY,
    XS_ERROR,
    XS_GET_PERMS,
    XS_READ,
    XS_RM,
    XS_SET_PERMS,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_WATCH,
    XS_WATCH_EVENT,
    XS_WRITE,
    XSD_ERRORS,
    Message,
    MessageReader,
    Perm,
    XenstoreError,
    decode_perms,
    encode,
    encode_perms,
    join,
    request,
)


class XenstoreClient:
    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.reader = MessageReader()
        self.pending: list[Message] = []
        self.events: list[tuple[str, str]] = []
        self.req_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XenstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self) -> Message:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("xenstore closed the connection")
            self.pending += self.reader.feed_all(data)
        return self.pending.pop(0)

    def _call(self, type: int, payload: bytes, tx: int = 0) -> bytes:
        self.req_id += 1
        self.sock.sendall(request(type, payload, self.req_id, tx))
        while True:
            msg = self._next()
            if msg.type == XS_WATCH_EVENT:
                path, token = msg.strings()[:2]
                self.events.append((path, token))
                continue
            if msg.type == XS_ERROR:
                name = msg.strings()[0] if msg.strings() else ""
                raise XenstoreError(name) if name in XSD_ERRORS else XenstoreError("EIO", f"unknown error {name!r}")
            return msg.payload

    def read(self, path: str, tx: int = 0) -> bytes:
        return self._call(XS_READ, join([path]), tx)

    def write(self, path: str, value: bytes, tx: int = 0) -> None:
        self._call(XS_WRITE, encode(path) + b"\0" + value, tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return Message(XS_DIRECTORY, 0, 0, self._call(XS_DIRECTORY, join([path]), tx)).strings()

    def rm(self, path: str, tx: int = 0) -> None:
        self._call(XS_RM, join([path]), tx)

    def get_perms(self, path: str, tx: int = 0) -> list[Perm]:
        return decode_perms(Message(XS_GET_PERMS, 0, 0, self._call(XS_GET_PERMS, join([path]), tx)).strings())

    def set_perms(self, path: str, perms: list[Perm], tx: int = 0) -> None:
        self._call(XS_SET_PERMS, join([path]) + encode_perms(perms), tx)

    def transaction_start(self) -> int:
        return int(self._call(XS_TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        """Raises XenstoreError EAGAIN when another client changed what the transaction read."""
        self._call(XS_TRANSACTION_END, join(["T" if commit else "F"]), tx)

    def watch(self, path: str, token: str) -> None:
        self._call(XS_WATCH, join([path, token]))

    def watch_events(self) -> Iterator[tuple[str, str]]:
        """(path, token) of every event, the one a new watch fires at once included."""
        while True:
            while self.events:
                yield self.events.pop(0)
            msg = self._next()
            if msg.type == XS_WATCH_EVENT:
                path, token = msg.strings()[:2]
                yield path, token

    def ls(self, path: str) -> Iterator[tuple[str, bytes]]:
        """(path, value) of every node below `path`, depth first, as xenstore-ls shows them."""
        for name in self.directory(path):
            child = f"{path.rstrip('/')}/{name}"
            yield child, self.read(child)
            yield from self.ls(child)
