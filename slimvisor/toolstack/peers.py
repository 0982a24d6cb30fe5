"""The link between pool members' slimvisords: TCP, opened by a mutual challenge-response.

Pool members call each other's API (create a domain placed there, receive a migrating domain,
list) over the pool network. The API socket on a host is a root-only Unix socket; on TCP anyone
could connect, so before the first API line each side proves it holds the pool's secret (64 hex
characters, kept in etcd; pool members trust each other fully, as XAPI pool members do):

    1. server -> client  {"slimvisor-pool": 1, "nonce": SERVER NONCE}
    2. client -> server  {"nonce": CLIENT NONCE, "proof": HMAC(secret, b"client" + Ns + Nc)}
    3. server -> client  {"proof": HMAC(secret, b"server" + Nc + Ns)}   or {"error": WHY}, then close

Nonces are 32 random bytes and proofs HMAC-SHA256 (hex), each message one JSON line. Both sides
pick a fresh nonce for every connection and each proof covers both nonces, so a recorded message
is worth nothing in another session; the labels keep a proof of one direction from being played
back as the other. The server proves itself too: a fake server never sees what a client sends
after the handshake (a migration's state). Then the stream is the ordinary API, unchanged; nothing
is encrypted (docs/security.md, "Pool link").

The handshakes are sans-IO (`ServerHandshake`, `ClientHandshake`: bytes in, bytes to send out, a
phase); sockets are at the edges: `connect` (blocking, for the side that calls) and
`PeerListener` (on the daemon's event loop, never blocking it).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from slimvisor.runtime.errors import SlimvisorError
from slimvisor.runtime.loop import Loop
from slimvisor.runtime.ratelimit import TokenBucket

log = logging.getLogger(__name__)

# slimvisord's pool port (TCP). Unassigned in IANA's Service Name and Transport Protocol Port
# Number Registry (8475-8499 are; 8470 is cisco-avp, 8472 otv, which Linux also uses for VXLAN).
PEER_PORT = 8475
PROTOCOL = 1  # the "slimvisor-pool" version of the greeting
NONCE_BYTES = 32
# Bounds (docs/security.md, "Bounds"): one handshake line, the time to authenticate, how many
# connections may be unauthenticated at once (more are closed as they are accepted).
MAX_HANDSHAKE_LINE = 512
HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 16

_HEX32 = re.compile(r"[0-9a-f]{64}")  # 32 bytes as lowercase hex: a nonce, a proof, the secret


class PeerAuthError(SlimvisorError):
    """The other side of a pool link did not prove it holds the pool's secret (or we lack it)."""


def new_secret() -> str:
    """A pool secret, as `pool init` makes it."""
    return secrets.token_hex(32)


def pool_key(secret: str) -> bytes:
    """The HMAC key of a pool secret, which must be 64 lowercase hex characters."""
    if not isinstance(secret, str) or not _HEX32.fullmatch(secret):
        raise PeerAuthError("the pool secret is not 64 lowercase hex characters")
    return bytes.fromhex(secret)


class Phase(enum.Enum):
    WAITING = "waiting"  # for the other side's next line
    DONE = "done"  # both sides proved the secret: the stream is the API's from here
    FAILED = "failed"  # `reason` says why; the connection must be closed


def _proof(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, label + first + second, hashlib.sha256).digest()


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _hex32(value: object) -> bytes | None:
    """32 bytes from a handshake field, or None if it is anything but 64 lowercase hex digits."""
    return bytes.fromhex(value) if isinstance(value, str) and _HEX32.fullmatch(value) else None


class _Handshake:
    """What both sides share: the key, the bounded line buffer and the phase.

    `receive_data` takes whatever arrived and returns what to send; once the phase is not
    WAITING it never changes again except from DONE to FAILED on bytes past the handshake (the
    handshake sees only its own lines: nothing may come after the last one until it is done).
    """

    def __init__(self, secret: str) -> None:
        self._key = pool_key(secret)
        self._buf = b""
        self.phase = Phase.WAITING
        self.reason = ""

    def receive_data(self, data: bytes) -> bytes:
        if not self._waiting():
            return self._fail("data past the handshake") if data and self.phase is Phase.DONE else b""
        self._buf += data
        out = b""
        while self._waiting() and b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            if len(line) >= MAX_HANDSHAKE_LINE:
                return self._fail(f"a handshake line over {MAX_HANDSHAKE_LINE} bytes")
            message = self._parse(line)
            out += self._fail("a handshake line that is not a JSON object") if message is None else self._step(message)
        if self._waiting() and len(self._buf) >= MAX_HANDSHAKE_LINE:
            return self._fail(f"a handshake line over {MAX_HANDSHAKE_LINE} bytes")
        if self.phase is Phase.DONE and self._buf:
            return self._fail(self._early)
        return out

    def _waiting(self) -> bool:  # a call, not an inline comparison: mypy would not see _step change the phase
        return self.phase is Phase.WAITING

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return None
        return message if isinstance(message, dict) else None

    def _step(self, message: dict[str, Any]) -> bytes:
        raise NotImplementedError

    _early = "data past the handshake"

    def _fail(self, reason: str) -> bytes:
        self.phase, self.reason, self._buf = Phase.FAILED, reason, b""
        return b""


class ServerHandshake(_Handshake):
    """The accepting side: sends `greeting` first, checks the client's proof, then proves itself."""

    _early = "data before the server's proof (a client waits for it)"

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.nonce = secrets.token_bytes(NONCE_BYTES)  # this connection's only: never sent again
        self.greeting = _line({"slimvisor-pool": PROTOCOL, "nonce": self.nonce.hex()})

    def _fail(self, reason: str) -> bytes:
        super()._fail(reason)
        return _line({"error": reason})  # the client hears why before the close

    def _step(self, message: dict[str, Any]) -> bytes:
        client_nonce, proof = _hex32(message.get("nonce")), _hex32(message.get("proof"))
        if client_nonce is None or proof is None:
            return self._fail("the client's message lacks a 64-hex-digit nonce and proof")
        if client_nonce == self.nonce:
            return self._fail("the client's nonce is the server's own")
        if not hmac.compare_digest(proof, _proof(self._key, b"client", self.nonce, client_nonce)):
            return self._fail("wrong proof: the client does not hold this pool's secret")
        self.phase = Phase.DONE
        return _line({"proof": _proof(self._key, b"server", client_nonce, self.nonce).hex()})


class ClientHandshake(_Handshake):
    """The connecting side: answers the greeting with its proof, then checks the server's."""

    _early = "data after the server's proof (the server speaks only when asked)"

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self._server_nonce: bytes | None = None

    @property
    def greeted(self) -> bool:
        return self._server_nonce is not None

    def _step(self, message: dict[str, Any]) -> bytes:
        if isinstance(message.get("error"), str):
            return self._fail(f"refused: {message['error'][:200]!r}")
        if self._server_nonce is None:
            version = message.get("slimvisor-pool")
            if type(version) is not int or version != PROTOCOL:
                return self._fail(f"not a slimvisor pool member (greeting version {str(version)[:20]!r})")
            nonce = _hex32(message.get("nonce"))
            if nonce is None:
                return self._fail("the server's greeting lacks a 64-hex-digit nonce")
            self._server_nonce = nonce
            return _line({"nonce": self.nonce.hex(), "proof": _proof(self._key, b"client", nonce, self.nonce).hex()})
        proof, expected = _hex32(message.get("proof")), _proof(self._key, b"server", self.nonce, self._server_nonce)
        if proof is None or not hmac.compare_digest(proof, expected):
            return self._fail("wrong proof: the server does not hold this pool's secret")
        self.phase = Phase.DONE
        return b""


# -- the edges: sockets --------------------------------------------------------------------------
def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _naming(error: OSError, what: str) -> OSError:
    """`error` again (same class and errno), its message naming `what` and without "[Errno N]"."""
    named = type(error)(f"{what}: {error.strerror or error}")
    named.errno = error.errno
    return named


def authenticate(sock: socket.socket, secret: str, timeout: float = 10.0) -> None:
    """Run the client's side of the handshake on a connected blocking socket (PeerAuthError on
    any failure, naming the peer); afterwards the socket carries the API."""
    host, port = sock.getpeername()[:2]
    where = _where(host, port)
    handshake = ClientHandshake(secret)
    deadline = time.monotonic() + timeout
    while handshake.phase is Phase.WAITING:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerAuthError(f"pool member {where}: no handshake within {timeout:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(MAX_HANDSHAKE_LINE)
            if not data and not handshake.greeted:  # closed at accept: too many connections not yet authenticated
                raise ConnectionRefusedError(f"pool member {where} closed the connection before its greeting "
                                             "(busy, or not a slimvisord)")  # fmt: skip
            if not data:
                raise PeerAuthError(f"pool member {where} closed the connection during the handshake")
            out = handshake.receive_data(data)
            if out:
                sock.sendall(out)
        except TimeoutError:
            continue
        except (PeerAuthError, ConnectionRefusedError):
            raise
        except OSError as e:
            raise PeerAuthError(f"pool member {where}: {e.strerror or e} during the handshake") from None
    if handshake.phase is Phase.FAILED:
        raise PeerAuthError(f"pool member {where}: {handshake.reason}")


def connect(address: str, port: int, secret: str, timeout: float = 10.0) -> socket.socket:
    """An authenticated connection to the slimvisord of pool member `address`, blocking, ready
    for `api.Client(sock=...)`. PeerAuthError if either side lacks the secret; OSError (naming
    the member) if it cannot be reached."""
    pool_key(secret)  # a bad secret is ours: say so before touching the network
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        raise _naming(e, f"pool member {_where(address, port)}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # request/reply lines: no Nagle delay
        authenticate(sock, secret, timeout)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


class _Pending:
    """A connection accepted but not yet authenticated."""

    __slots__ = ("handshake", "peer", "sock")

    def __init__(self, sock: socket.socket, handshake: ServerHandshake, peer: str) -> None:
        self.sock, self.handshake, self.peer = sock, handshake, peer


class PeerListener:
    """slimvisord's pool port: accepts TCP connections, authenticates them on the loop, and hands
    each authenticated socket (non-blocking) to `on_peer`, which then owns it.

    Bounds: a connection that has not authenticated within `handshake_timeout` seconds, or that
    sends a handshake line over MAX_HANDSHAKE_LINE bytes, is closed; at most `max_pending`
    connections are unauthenticated at once (more are closed as they are accepted).
    """

    def __init__(self, loop: Loop, address: str, port: int, secret: str, on_peer: Callable[[socket.socket], None],
                 *, handshake_timeout: float = HANDSHAKE_TIMEOUT, max_pending: int = MAX_PENDING) -> None:  # fmt: skip
        pool_key(secret)
        self._loop, self._secret, self._on_peer = loop, secret, on_peer
        self._timeout, self._max_pending = handshake_timeout, max_pending
        self._pending: dict[int, _Pending] = {}
        self.refused = 0  # connections closed before authenticating: a failed, late or surplus handshake
        self._log_budget = TokenBucket(size=10, refill_time=60.0)  # a flood of bad handshakes must not flood the log
        self._unlogged = 0
        try:
            family, type_, proto, _, sockaddr = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM,
                                                                   flags=socket.AI_PASSIVE)[0]  # fmt: skip
        except OSError as e:
            raise _naming(e, f"pool port {_where(address, port)}") from None
        self.sock = socket.socket(family, type_, proto)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(sockaddr)
            self.sock.listen(max_pending)
            self.sock.setblocking(False)
        except OSError as e:
            self.sock.close()
            raise _naming(e, f"pool port {_where(address, port)}") from None
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        loop.add_reader(self.sock.fileno(), self._accept)

    @property
    def pending(self) -> int:
        """How many connections are being authenticated now."""
        return len(self._pending)

    def close(self) -> None:
        """Stop listening and close every connection not yet authenticated (handed-off ones stay)."""
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for pending in list(self._pending.values()):
            self._drop(pending)

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of fds, say: the connection waits in the backlog, and epoll
                log.warning("pool port: accept failed (%s); retrying in 1 s", e.strerror or e)
                self._loop.remove_reader(self.sock.fileno())  # would wake us again at once
                self._loop.call_later(1.0, self._resume)
                return
            name = _where(*peer[:2])
            if len(self._pending) >= self._max_pending:
                self._refused(name, f"over {self._max_pending} connections not yet authenticated")
                sock.close()
                continue
            self._begin(sock, name)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _begin(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = _Pending(sock, ServerHandshake(self._secret), name)
        if not self._send(pending, pending.handshake.greeting):
            self._refused(name, "could not send the greeting")
            sock.close()
            return
        self._pending[sock.fileno()] = pending
        self._loop.add_reader(sock.fileno(), lambda: self._readable(pending))
        self._loop.call_later(self._timeout, lambda: self._expire(pending))

    @staticmethod
    def _send(pending: _Pending, data: bytes) -> bool:
        """Send a handshake line without blocking: it fits a fresh connection's socket buffer, so
        a line that does not go out whole means a broken (or hostile) peer."""
        try:
            return pending.sock.send(data) == len(data)
        except OSError:
            return False

    def _readable(self, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(MAX_HANDSHAKE_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(pending, f"{e.strerror or e} during the handshake")
            return
        if not data:
            self._fail(pending, "closed during the handshake")
            return
        handshake = pending.handshake
        out = handshake.receive_data(data)
        if handshake.phase is Phase.FAILED:
            self._fail(pending, handshake.reason, out)
        elif handshake.phase is Phase.DONE:
            if not self._send(pending, out):
                self._fail(pending, "could not send the server's proof")
                return
            self._loop.remove_reader(pending.sock.fileno())
            del self._pending[pending.sock.fileno()]
            log.info("pool link: %s authenticated", pending.peer)
            try:
                self._on_peer(pending.sock)
            except BaseException:
                pending.sock.close()
                raise

    def _expire(self, pending: _Pending) -> None:
        if pending.sock.fileno() >= 0 and self._pending.get(pending.sock.fileno()) is pending:
            reason = f"no handshake within {self._timeout:g} s"
            self._fail(pending, reason, _line({"error": reason}))

    def _fail(self, pending: _Pending, reason: str, line: bytes = b"") -> None:
        """Close a connection that did not authenticate, after its error `line` if it goes out."""
        self._refused(pending.peer, reason)
        self._drop(pending, line)

    def _drop(self, pending: _Pending, line: bytes = b"") -> None:
        fd = pending.sock.fileno()
        if fd < 0:
            return
        self._loop.remove_reader(fd)
        self._pending.pop(fd, None)  # forgotten and counted before the peer can hear of it
        if line:
            self._send(pending, line)
        with contextlib.suppress(OSError):  # unread bytes would make the close a reset, losing the error line
            for _ in range(4):
                if not pending.sock.recv(4096):
                    break
        pending.sock.close()

    def _refused(self, peer: str, reason: str) -> None:
        self.refused += 1
        if not self._log_budget.consume(1, time.monotonic()):
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused, unlogged)" if self._unlogged else ""
        self._unlogged = 0
        log.warning("pool link: refused %s: %s%s", peer, reason, more)


__all__ = [
    "HANDSHAKE_TIMEOUT", "MAX_HANDSHAKE_LINE", "MAX_PENDING", "PEER_PORT", "ClientHandshake", "PeerAuthError",
    "PeerListener", "Phase", "ServerHandshake", "authenticate", "connect", "new_secret", "pool_key",
]  # fmt: skip
