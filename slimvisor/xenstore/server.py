"""The I/O edge of xenstore: a Unix socket for the tools, sockets for guests, one event loop.

`handle()` turns one request into its reply without touching a socket (xenstored's
process_message); `XenstoreServer` reads requests from every connection, sends replies and the watch
events a change queued on any connection. A client that breaks the framing loses its connection;
the store and the other clients carry on. Clients of the tools socket (`listen`) are dom0, as with
xenstored, so that socket is made 0600; every client of a domain socket (`listen_domain`, what a
guest's vsock connections to port XENSTORE_VSOCK_PORT arrive on) is that domain.

The loop is `slimvisor.runtime.loop.EventLoop`: a process hosting device backends or a toolstack
API passes its own (`XenstoreServer(store, loop)`) and serves everything from one thread; otherwise the
xenstore makes one and `serve_forever()` runs it.

    python3 -m slimvisor.xenstore.server --socket PATH --db FILE [--domain ID:PATH ...]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from slimvisor.runtime.loop import EventLoop
from slimvisor.runtime.unix import listen_unix
from slimvisor.xenstore import XENSTORE_VSOCK_PORT
from slimvisor.xenstore.store import Connection, Store, domain_path
from slimvisor.xenstore.wire import (
    ACK,
    DOMID_FIRST_RESERVED,
    XENSTORE_PAYLOAD_MAX,
    XS_CONTROL,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_MKDIR,
    XS_READ,
    XS_RELEASE,
    XS_RESET_WATCHES,
    XS_RESUME,
    XS_RM,
    XS_SET_PERMS,
    XS_SET_TARGET,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WRITE,
    Message,
    MessageReader,
    WireError,
    XenstoreError,
    decode,
    decode_perms,
    encode_perms,
    error_reply,
    join,
    reply,
    watch_event,
)

log = logging.getLogger(__name__)

MAX_BACKLOG = 16 << 20  # bytes of replies and events a dom0 client may leave unread before it is dropped
MESSAGES_PER_WAKEUP = 64  # so one busy client cannot starve the others
MAX_DOMAIN_CONNECTIONS = 64  # open connections a guest may hold; more are refused

__all__ = ["MAX_DOMAIN_CONNECTIONS", "XENSTORE_VSOCK_PORT", "XenstoreServer", "handle", "main", "serve"]


def _domid(text: str, real: bool = False) -> int:
    """A <domid>: decimal 0..65535; `real` excludes dom0 and the special DOMID_... values."""
    valid = text.isascii() and text.isdigit() and int(text) <= 0xFFFF
    if not valid or (real and not 0 < int(text) < DOMID_FIRST_RESERVED):
        raise XenstoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


def _directory_part(conn: Connection, msg: Message, tx: int) -> bytes:
    """DIRECTORY_PART: <gencnt>| and the children from byte <offset> of the NUL-separated list,
    as much as fits, ending with an empty string once the list is complete (as xenstored)."""
    path, offset_text = msg.args(2, exact=True)
    generation, names = conn.directory_generation(path, tx)
    children = join(names)
    gen = join([str(generation)])
    offset = int(offset_text) if offset_text.isascii() and offset_text.isdigit() else 0
    if offset >= len(children):
        return gen + b"\0"
    end = offset
    room = XENSTORE_PAYLOAD_MAX - len(gen) - 1
    while end < len(children):
        child_end = children.index(b"\0", end) + 1
        if child_end - offset > room:
            break
        end = child_end
    return gen + children[offset:end] + (b"\0" if end == len(children) else b"")


def _write(conn: Connection, msg: Message, tx: int) -> bytes:
    path, sep, value = msg.payload.partition(b"\0")
    if not sep:
        raise XenstoreError("EINVAL", "WRITE without a path")
    conn.write(decode(path), value, tx)
    return ACK


def _transaction_start(conn: Connection, msg: Message, tx: int) -> bytes:
    if msg.tx_id:  # "It is not legal to send non-0 tx_id in TRANSACTION_START"
        raise XenstoreError("EBUSY", "TRANSACTION_START inside a transaction")
    return join([str(conn.transaction_start())])


def _transaction_end(conn: Connection, msg: Message, tx: int) -> bytes:
    how = msg.onearg()
    if how not in ("T", "F"):
        raise XenstoreError("EINVAL", f"TRANSACTION_END {how!r}")
    conn.transaction_end(msg.tx_id, how == "T")
    return ACK


def _control(conn: Connection, msg: Message, tx: int) -> bytes:
    """CONTROL: implementation specific; the few commands that make sense here."""
    command, *params = msg.args(1)
    if command == "help":
        return join(["check\nhelp\nprint|<string>\n"])
    if command == "print":
        log.info("xenstore: %s", " ".join(params))
        return ACK
    if command == "check":
        return ACK
    raise XenstoreError("EINVAL", f"unknown control command {command!r}")


def _ack(action: Callable[[], object]) -> bytes:
    action()
    return ACK


Handler = Callable[[Connection, Message, int], bytes]

_HANDLERS: dict[int, Handler] = {
    XS_CONTROL: _control,
    XS_DIRECTORY: lambda c, m, tx: join(c.directory(m.onearg(), tx)),
    XS_DIRECTORY_PART: _directory_part,
    XS_READ: lambda c, m, tx: c.read(m.onearg(), tx),
    XS_GET_PERMS: lambda c, m, tx: encode_perms(c.get_perms(m.onearg(), tx)),
    XS_WATCH: lambda c, m, tx: _ack(lambda: c.watch(*m.args(2))),
    XS_UNWATCH: lambda c, m, tx: _ack(lambda: c.unwatch(*m.args(2))),
    XS_TRANSACTION_START: _transaction_start,
    XS_TRANSACTION_END: _transaction_end,
    XS_INTRODUCE: lambda c, m, tx: _ack(lambda: c.introduce(_domid(m.args(3)[0], real=True))),
    XS_RELEASE: lambda c, m, tx: _ack(lambda: c.release(_domid(m.onearg()))),
    XS_GET_DOMAIN_PATH: lambda c, m, tx: join([domain_path(_domid(m.onearg()))]),
    XS_WRITE: _write,
    XS_MKDIR: lambda c, m, tx: _ack(lambda: c.mkdir(m.onearg(), tx)),
    XS_RM: lambda c, m, tx: _ack(lambda: c.rm(m.onearg(), tx)),
    XS_SET_PERMS: lambda c, m, tx: _ack(lambda: c.set_perms(m.args(2)[0], decode_perms(m.strings()[1:]), tx)),
    XS_IS_DOMAIN_INTRODUCED: lambda c, m, tx: join(["T" if c.store.is_introduced(_domid(m.onearg())) else "F"]),
    XS_RESUME: lambda c, m, tx: _ack(lambda: c.resume(_domid(m.onearg()))),
    XS_SET_TARGET: lambda c, m, tx: _ack(lambda: c.set_target(*(_domid(d) for d in m.args(2)))),
    XS_RESET_WATCHES: lambda c, m, tx: _ack(c.reset_watches),
}

# xenstored's XS_FLAG_PRIV: "Privileged domain only"
_PRIVILEGED = frozenset({XS_CONTROL, XS_INTRODUCE, XS_RELEASE, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET})
# xenstored's XS_FLAG_NOTID: "Ignore transaction id"
_NO_TX = frozenset({XS_WATCH, XS_UNWATCH})


def handle(conn: Connection, msg: Message) -> bytes:
    """One request to its encoded reply, or to an ERROR reply; never raises for what a client sends."""
    log.debug("xenstore: d%d %s req %d tx %d %r", conn.domid, msg.name, msg.req_id, msg.tx_id, msg.payload[:80])
    try:
        handler = _HANDLERS.get(msg.type)
        if handler is None:
            raise XenstoreError("ENOSYS", f"{msg.name} is not a request")
        if msg.type in _PRIVILEGED and not conn.privileged:
            raise XenstoreError("EACCES", f"{msg.name} is for the privileged domain only")
        tx = 0 if msg.type in _NO_TX else msg.tx_id
        if tx and tx not in conn.transactions:
            raise XenstoreError("ENOENT", f"no transaction {tx}")
        payload = handler(conn, msg, tx)
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XenstoreError("E2BIG", f"{msg.name} reply of {len(payload)} bytes")
        return reply(msg, payload)
    except XenstoreError as e:
        log.debug("xenstore: d%d %s: %s", conn.domid, msg.name, e)
        return error_reply(msg, e.name)
    except Exception:  # a bug of ours: the client gets EIO, the store is unchanged (changes are atomic)
        log.exception("xenstore: internal error on %s", msg.name)
        return error_reply(msg, "EIO")


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    conn: Connection
    name: str
    reader: MessageReader = field(default_factory=MessageReader)
    out: bytearray = field(default_factory=bytearray)
    writing: bool = False  # waiting for the socket to take more of `out`
    reading: bool = True  # its requests are read (a guest's are not while its domain's backlog is full)


@dataclass(eq=False)
class _Listener:
    sock: socket.socket
    path: str
    domid: int  # what its clients are: 0 for the tools socket


class XenstoreServer:
    """Xenstore's sockets on an event loop: the tools socket, guests' sockets and channels, one store.

    `loop` is the event loop to serve on (a process's one `slimvisor.runtime.loop.EventLoop`);
    without it the server makes its own, which `serve_forever()` / `run_once()` run and `close()`
    closes. Like the loop, the server is not thread-safe: call its methods (and change the store)
    from the loop's thread, or before serving; only `stop()` is safe from anywhere.
    """

    def __init__(self, store: Store, loop: EventLoop | None = None) -> None:
        self.store = store
        self._own_loop = loop is None
        self.loop = EventLoop() if loop is None else loop
        self.clients: dict[socket.socket, _Client] = {}
        self._backlog: dict[int, int] = {}  # guest domid: bytes unsent on all its connections
        self._paused: set[int] = set()  # guest domains whose requests wait until they read (see _full)
        self._listeners: list[_Listener] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.loop.add_reader(self._wake_r.fileno(), self._woken)
        self._stopping = False
        self._flush_pending = False
        self._closed = False
        store.event_hooks.append(self._events_queued)

    # -- sockets ------------------------------------------------------------------------------------
    def listen(self, path: str) -> None:
        """Serve the tools on a Unix socket at `path` (XENSTORED_PATH for libxenstore): as dom0."""
        self._listen(path, 0)

    def listen_domain(self, path: str, domid: int) -> None:
        """Serve domain `domid` on a Unix socket at `path`: every client is that (unprivileged) domain.

        Its permissions apply, and relative paths are below /local/domain/<domid>. A toolstack
        passes f"{vsock_uds}_{XENSTORE_VSOCK_PORT}", where the domain's vsock device connects a
        guest's connections to host CID 2 port XENSTORE_VSOCK_PORT. Raises FileExistsError when
        something listens at `path` already, ValueError for dom0 or a reserved domid.
        `forget_domain(domid)` closes it.
        """
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"listen_domain: {domid} is not a guest domain id")
        self._listen(path, domid)

    def forget_domain(self, domid: int) -> None:
        """The domain is gone: close its sockets (`listen_domain`) and every connection it has.

        Its nodes stay; removing /local/domain/<domid> and RELEASE are the toolstack's business.
        """
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"forget_domain: {domid} is not a guest domain id")
        for listener in [lst for lst in self._listeners if lst.domid == domid]:
            self._close_listener(listener)
        for client in [c for c in self.clients.values() if c.conn.domid == domid]:
            self._drop(client)
        log.debug("xenstore: forgot d%d", domid)

    def domain_listeners(self) -> dict[int, list[str]]:
        """The socket paths each domain is served on."""
        out: dict[int, list[str]] = {}
        for listener in self._listeners:
            if listener.domid:
                out.setdefault(listener.domid, []).append(listener.path)
        return out

    def add_domain_connection(self, domid: int, sock: socket.socket) -> Connection:
        """Serve a guest over a connected stream socket: its requests act as domain `domid`."""
        return self._add(sock, domid, f"d{domid}")

    def _listen(self, path: str, domid: int) -> None:
        sock = listen_unix(path)
        try:
            sock.listen(socket.SOMAXCONN)  # tools connect for every command, often many at once
            os.chmod(path, 0o600)  # tools: every local client is dom0; guests: only the vsock device
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        listener = _Listener(sock, path, domid)
        self._listeners.append(listener)
        self.loop.add_reader(sock.fileno(), lambda: self._accept(listener))
        log.debug("xenstore: listening on %s for d%d", path, domid)

    def _close_listener(self, listener: _Listener) -> None:
        self._listeners.remove(listener)
        self.loop.remove_reader(listener.sock.fileno())
        listener.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listener.path)

    def _accept(self, listener: _Listener) -> None:
        try:
            sock, _ = listener.sock.accept()
        except BlockingIOError:
            return
        except OSError as e:  # EMFILE and the like: the client waits in the backlog
            log.warning("xenstore: accept on %s: %s", listener.path, e)
            return
        if listener.domid == 0:
            self._add(sock, 0, f"socket fd {sock.fileno()}")
            return
        if sum(1 for c in self.clients.values() if c.conn.domid == listener.domid) >= MAX_DOMAIN_CONNECTIONS:
            log.warning("xenstore: d%d has %d connections; refusing another", listener.domid, MAX_DOMAIN_CONNECTIONS)
            sock.close()
            return
        self._add(sock, listener.domid, f"d{listener.domid}")

    def _add(self, sock: socket.socket, domid: int, name: str) -> Connection:
        sock.setblocking(False)
        client = _Client(sock, self.store.connect(domid), name)
        self.clients[sock] = client
        if domid in self._paused:
            client.reading = False
        else:
            self.loop.add_reader(sock.fileno(), lambda: self._readable(client))
        log.debug("xenstore: %s connected", name)
        return client.conn

    # -- running its own loop -------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the loop until `stop()` (the server's own loop; a shared one is its owner's to run)."""
        while not self._stopping:
            self.loop.run_once(None)

    def run_once(self, timeout: float | None) -> None:
        self.loop.run_once(timeout)

    def stop(self) -> None:
        """Make serve_forever() return (safe from a signal handler or another thread)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        """Close every connection and socket of the xenstore (and its loop, if it made it)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            self.store.event_hooks.remove(self._events_queued)
        for client in list(self.clients.values()):
            self._drop(client)
        for listener in list(self._listeners):
            self._close_listener(listener)
        self.loop.remove_reader(self._wake_r.fileno())
        self._wake_r.close()
        self._wake_w.close()
        if self._own_loop:
            self.loop.close()

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(64)

    # -- clients --------------------------------------------------------------------------------------
    def _drop(self, client: _Client, why: str = "") -> None:
        if client.sock not in self.clients:
            return
        if why:
            log.warning("xenstore: closing %s: %s", client.name, why)
        del self.clients[client.sock]
        self.loop.remove_reader(client.sock.fileno())
        self.loop.remove_writer(client.sock.fileno())
        client.sock.close()
        client.conn.close()
        self._sent(client, len(client.out))
        client.out.clear()

    # -- output, bounded per guest domain (Quotas.output_backlog) ---------------------------------------
    def _queue(self, client: _Client, data: bytes) -> None:
        client.out += data
        domid = client.conn.domid
        if domid:
            self._backlog[domid] = self._backlog.get(domid, 0) + len(data)

    def _sent(self, client: _Client, count: int) -> None:
        """`count` bytes left `client.out` (sent, or dropped with it): its domain may be read again."""
        domid = client.conn.domid
        if not domid or not count:
            return
        backlog = self._backlog[domid] - count
        if backlog:
            self._backlog[domid] = backlog
        else:
            del self._backlog[domid]
        if domid in self._paused and backlog < self.store.quotas.output_backlog:
            self._paused.discard(domid)
            for other in self.clients.values():
                if other.conn.domid == domid and not other.reading:
                    self._resume(other)

    def _resume(self, client: _Client) -> None:
        client.reading = True
        self.loop.add_reader(client.sock.fileno(), lambda: self._readable(client))

    def _full(self, client: _Client) -> bool:
        """Has a guest left so much unread that its requests must wait (xenstored's "outstanding")?
        Then none of its domain's connections is read until it reads some replies."""
        domid = client.conn.domid
        if not domid or self._backlog.get(domid, 0) < self.store.quotas.output_backlog:
            return False
        if domid in self._paused:
            return True
        self._paused.add(domid)
        for other in self.clients.values():
            if other.conn.domid == domid and other.reading:
                other.reading = False
                self.loop.remove_reader(other.sock.fileno())
        return True

    def _readable(self, client: _Client) -> None:
        for _ in range(MESSAGES_PER_WAKEUP):
            if self._full(client):
                break
            try:
                data = client.sock.recv(client.reader.wanted())
            except BlockingIOError:
                break
            except OSError as e:
                self._drop(client, str(e))
                return
            if not data:
                self._drop(client)
                return
            try:
                msg = client.reader.feed(data)
            except WireError as e:
                self._drop(client, str(e))
                return
            if msg is not None:
                self._queue(client, handle(client.conn, msg))
                self._flush_all()  # the reply first, then events (its own initial watch event too)
        self._send(client)

    def _events_queued(self) -> None:
        """The store queued watch events: send them soon (at once would put them before a reply)."""
        if not self._flush_pending and not self._closed:
            self._flush_pending = True
            self.loop.call_later(0, self._flush_all)

    def _flush_all(self) -> None:
        self._flush_pending = False
        for client in list(self.clients.values()):
            if client.conn.events:
                for path, token in client.conn.take_events():
                    event = watch_event(path, token)
                    if event is not None:
                        self._queue(client, event)
                self._send(client)

    def _send(self, client: _Client) -> None:
        """Write what the socket takes now; wait for writability while anything is left."""
        if client.sock not in self.clients:
            return
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except BlockingIOError:
                pass
            except OSError as e:
                self._drop(client, str(e))
                return
            else:
                del client.out[:sent]
                self._sent(client, sent)
        domid = client.conn.domid
        if domid and self._backlog.get(domid, 0) > 2 * self.store.quotas.output_backlog:
            worst = max((c for c in self.clients.values() if c.conn.domid == domid), key=lambda c: len(c.out))
            self._drop(worst, f"d{domid} left {self._backlog[domid]} bytes unread")
            if worst is client:
                return
        elif len(client.out) > MAX_BACKLOG:
            self._drop(client, f"{len(client.out)} bytes unread")
            return
        if client.writing != bool(client.out):
            client.writing = bool(client.out)
            if client.writing:
                self.loop.add_writer(client.sock.fileno(), lambda: self._send(client))
            else:
                self.loop.remove_writer(client.sock.fileno())


def parse_domain(text: str) -> tuple[int, str]:
    """`--domain ID:PATH` of the command line."""
    domid, sep, path = text.partition(":")
    if not sep or not path or not domid.isdigit() or not 0 < int(domid) < DOMID_FIRST_RESERVED:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ID:PATH with a guest domain id")
    return int(domid), path


def serve(path: str, db: str, domains: Sequence[tuple[int, str]] = ()) -> None:
    """Run a xenstore on socket `path` persisting to SQLite file `db` until SIGTERM or SIGINT.

    `domains`: (domid, socket path) pairs to serve guests on (`XenstoreServer.listen_domain`).
    """
    store = Store(db)
    server = XenstoreServer(store)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for domid, domain_socket in domains:
            server.listen_domain(domain_socket, domid)
        server.listen(path)  # last: its appearing tells a caller that everything is in place
        log.info("xenstore: serving %s (database %s)", path, db)
        server.serve_forever()
    finally:
        server.close()
        store.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m slimvisor.xenstore.server",
        description="Serve a xenstore on a Unix socket, persisted in SQLite.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket to listen on (clients: XENSTORED_PATH)")
    parser.add_argument("--db", required=True, help="SQLite file holding the store")
    parser.add_argument(
        "--domain", action="append", default=[], type=parse_domain, metavar="ID:PATH",
        help="also serve domain ID on Unix socket PATH, every client as that domain "
        f"(a guest's vsock: PATH is <uds>_{XENSTORE_VSOCK_PORT}); repeatable",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    serve(args.socket, args.db, args.domain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
