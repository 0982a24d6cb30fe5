"""The pool link (slimvisor/toolstack/peers.py): the sans-IO handshakes, then real TCP sockets on
127.0.0.1 against a PeerListener on a real EventLoop in a thread.

Every refusal is observed as the peer sees it (an error line, then the close) and on the
listener's side (`on_peer` never called, the connection counted as refused).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimvisor.runtime.loop import EventLoop
from slimvisor.toolstack import api
from slimvisor.toolstack.peers import (
    MAX_HANDSHAKE_LINE,
    MAX_PENDING,
    ClientHandshake,
    PeerAuthError,
    PeerListener,
    Phase,
    ServerHandshake,
    authenticate,
    connect,
    new_secret,
    pool_key,
)

SECRET = new_secret()
OTHER = new_secret()  # another pool's secret
WAIT = 10.0  # the longest any test waits for an event that must come


class Served:
    """A PeerListener on 127.0.0.1 served by a real EventLoop on a thread of its own.

    Each authenticated socket is queued in `peers` and answered as slimvisord answers: `hello`
    with a version and features, any other request echoed back.
    """

    def __init__(self, secret: str, **bounds: Any) -> None:
        self.loop = EventLoop()
        self.peers: queue.Queue[socket.socket] = queue.Queue()
        self.listener = PeerListener(self.loop, "127.0.0.1", 0, secret, self._on_peer, **bounds)
        self.port = self.listener.address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.loop.run_once(0.02)

    def _on_peer(self, sock: socket.socket) -> None:
        assert not sock.getblocking()
        self.peers.put(sock)
        buf = bytearray()

        def readable() -> None:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                self.loop.remove_reader(sock.fileno())
                return
            buf.extend(data)
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                req = json.loads(line)
                if req["op"] == "hello":
                    reply = {"version": 1, "versions": [1], "features": ["hello", "echo"]}
                else:
                    reply = {"echo": req}
                sock.sendall(api.encode({"id": req["id"], "ok": True, **reply}))

        self.loop.add_reader(sock.fileno(), readable)

    def raw(self) -> socket.socket:
        """A plain TCP connection to the listener, its greeting not read yet."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()
        while not self.peers.empty():
            self.peers.get().close()
        self.loop.close()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served(SECRET)
    yield s
    s.close()


def read_line(sock: socket.socket) -> bytes:
    """One line, read byte by byte (nothing past it is taken from the socket)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, f"closed after {line!r}"
        line += byte
    return line


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (socket.timeout if it does not within WAIT)."""
    sock.settimeout(WAIT)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def answer(greeting: bytes, secret: str = SECRET) -> tuple[ClientHandshake, bytes]:
    client = ClientHandshake(secret)
    return client, client.receive_data(greeting)


# -- the handshakes, sans IO ---------------------------------------------------------------------
def pump(server: ServerHandshake, client: ClientHandshake, chunk: int) -> None:
    """Carry each side's bytes to the other, `chunk` bytes at a time."""
    to_client, to_server = server.greeting, b""
    while to_client or to_server:
        for i in range(0, len(to_client), chunk):
            to_server += client.receive_data(to_client[i : i + chunk])
        to_client = b""
        for i in range(0, len(to_server), chunk):
            to_client += server.receive_data(to_server[i : i + chunk])
        to_server = b""


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_both_sides_holding_the_secret_finish_in_three_lines(chunk: int) -> None:
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    pump(server, client, chunk)
    assert (server.phase, client.phase) == (Phase.DONE, Phase.DONE)
    assert server.nonce != client.nonce and len(server.nonce) == len(client.nonce) == 32


def test_a_client_with_another_secret_is_refused_and_told_why() -> None:
    server = ServerHandshake(SECRET)
    _, line = answer(server.greeting, OTHER)
    out = server.receive_data(line)
    assert server.phase is Phase.FAILED
    assert json.loads(out) == {"error": "wrong proof: the client does not hold this pool's secret"}


def test_a_server_with_another_secret_fails_the_client() -> None:
    server, client = ServerHandshake(OTHER), ClientHandshake(SECRET)
    server.receive_data(client.receive_data(server.greeting))
    assert client.phase is Phase.WAITING
    assert client.receive_data(b'{"proof": "' + b"ab" * 32 + b'"}\n') == b""
    assert client.phase is Phase.FAILED
    assert client.reason == "wrong proof: the server does not hold this pool's secret"


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b'{"slimvisor-pool": 2, "nonce": "' + b"00" * 32 + b'"}\n', "greeting version '2'"),
        (b'{"slimvisor-pool": true, "nonce": "' + b"00" * 32 + b'"}\n', "greeting version 'True'"),
        (b'{"slimvisor-pool": 1, "nonce": "' + b"AB" * 32 + b'"}\n', "lacks a 64-hex-digit nonce"),
        (b'{"slimvisor-pool": 1, "nonce": "00"}\n', "lacks a 64-hex-digit nonce"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not a JSON object"),
        (b'{"error": "busy"}\n', "refused: 'busy'"),
    ],
)
def test_a_client_refuses_a_greeting_it_cannot_trust(greeting: bytes, reason: str) -> None:
    client = ClientHandshake(SECRET)
    assert client.receive_data(greeting) == b""
    assert client.phase is Phase.FAILED and reason in client.reason


def test_a_client_fails_on_bytes_after_the_servers_proof() -> None:
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    proof = server.receive_data(client.receive_data(server.greeting))
    client.receive_data(proof + b'{"id": 1}\n')
    assert client.phase is Phase.FAILED and "after the server's proof" in client.reason


def test_a_server_refuses_a_client_that_speaks_before_the_servers_proof() -> None:
    server = ServerHandshake(SECRET)
    _, line = answer(server.greeting)
    out = server.receive_data(line + api.encode({"id": 1, "op": "hello", "version": 1}))
    assert server.phase is Phase.FAILED and "before the server's proof" in json.loads(out)["error"]


def test_a_server_refuses_its_own_nonce_reflected() -> None:
    server = ServerHandshake(SECRET)
    nonce = server.nonce.hex()
    proof = hmac.new(pool_key(SECRET), b"client" + server.nonce * 2, hashlib.sha256).hexdigest()
    server.receive_data(json.dumps({"nonce": nonce, "proof": proof}).encode() + b"\n")
    assert server.phase is Phase.FAILED and server.reason == "the client's nonce is the server's own"


@pytest.mark.parametrize("secret", ["", "ab" * 31, "AB" * 32, "ab" * 32 + "\n", "xy" * 32])
def test_a_malformed_secret_is_refused_before_any_socket(secret: str) -> None:
    with pytest.raises(PeerAuthError, match="the pool secret is not 64 lowercase hex characters"):
        ServerHandshake(secret)
    with pytest.raises(PeerAuthError, match="the pool secret is not 64"):
        connect("127.0.0.1", 1, secret)


# -- hostile bytes: the sans-IO sides under hypothesis -------------------------------------------
HEX = st.text("0123456789abcdefABCDEF x", min_size=0, max_size=70)
JUNK = st.one_of(st.integers(), st.booleans(), st.none(), HEX, st.lists(st.integers(), max_size=3))
FIELDS = st.dictionaries(st.sampled_from(["nonce", "proof", "error", "slimvisor-pool", "x"]), JUNK, max_size=4)
CHUNKS = st.lists(
    st.one_of(
        st.binary(max_size=700),
        FIELDS.map(lambda d: json.dumps(d).encode() + b"\n"),
        st.just(b"VALID"),  # the right answer for this very handshake, wherever it falls
    ),
    max_size=6,
)


def _check_step(before: Phase, after: Phase, out: bytes) -> None:
    assert len(out) <= 2 * MAX_HANDSHAKE_LINE
    if before is Phase.FAILED:
        assert (after, out) == (Phase.FAILED, b"")
    if before is Phase.DONE:
        assert after in (Phase.DONE, Phase.FAILED)


@settings(max_examples=400, deadline=None)
@given(CHUNKS)
def test_the_server_side_takes_any_bytes_into_one_of_its_phases(chunks: list[bytes]) -> None:
    server = ServerHandshake(SECRET)
    valid = answer(server.greeting)[1]
    for chunk in chunks:
        before = server.phase
        out = server.receive_data(valid if chunk == b"VALID" else chunk)
        _check_step(before, server.phase, out)
        if server.phase is Phase.FAILED and before is Phase.WAITING:
            assert json.loads(out) == {"error": server.reason}
        elif server.phase is Phase.DONE and before is Phase.WAITING:
            assert chunk == b"VALID" and set(json.loads(out)) == {"proof"}


@settings(max_examples=400, deadline=None)
@given(CHUNKS, st.booleans())
def test_the_client_side_takes_any_bytes_into_one_of_its_phases(chunks: list[bytes], greet: bool) -> None:
    """A fake server is as hostile as a fake client: the client never raises either. `greet`
    lets a real server greet it first, so what follows meets the check of the server's proof;
    "VALID" is that real greeting again, out of turn."""
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    if greet:
        server.receive_data(client.receive_data(server.greeting))
    for chunk in chunks:
        before = client.phase
        out = client.receive_data(server.greeting if chunk == b"VALID" else chunk)
        _check_step(before, client.phase, out)
        assert client.phase is not Phase.DONE  # no server ever proved itself for its nonce


# -- over TCP ------------------------------------------------------------------------------------
def test_members_with_the_secret_talk_the_api_over_the_link(served: Served) -> None:
    sock = connect("127.0.0.1", served.port, SECRET, timeout=WAIT)
    with api.Client(sock=sock, timeout=WAIT) as client:
        assert client.version == 1 and "echo" in client.features
        assert client.call("echo", domain="d1", memory_mib=256)["echo"] == {
            "id": 2, "op": "echo", "domain": "d1", "memory_mib": 256,
        }  # fmt: skip
    peer = served.peers.get(timeout=WAIT)
    assert peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert served.peers.empty() and served.listener.refused == 0 and served.listener.pending == 0


def test_a_client_with_another_pools_secret_is_refused(served: Served) -> None:
    with pytest.raises(PeerAuthError, match=rf"^pool member 127\.0\.0\.1:{served.port}: refused: "
                       "\"wrong proof: the client does not hold this pool's secret\"$"):  # fmt: skip
        connect("127.0.0.1", served.port, OTHER, timeout=WAIT)
    assert served.peers.empty() and served.listener.refused == 1 and served.listener.pending == 0


def test_a_refused_client_never_reaches_on_peer_whatever_it_sends_next(served: Served) -> None:
    with served.raw() as sock:
        _, line = answer(read_line(sock), OTHER)
        sock.sendall(line + api.encode({"id": 1, "op": "hello", "version": 1}))
        assert b"wrong proof" in read_until_closed(sock)
    assert served.peers.empty()


def fake_server(respond: Any) -> tuple[int, queue.Queue[bytes], threading.Thread]:
    """A server that is not a pool member: `respond(client_line)` makes its answer; what the
    client sends after that answer is queued (it must be nothing)."""
    listener = socket.create_server(("127.0.0.1", 0))
    after: queue.Queue[bytes] = queue.Queue()

    def serve() -> None:
        with listener, listener.accept()[0] as sock:
            sock.settimeout(WAIT)
            line = respond(None)
            sock.sendall(line)
            sock.sendall(respond(read_line(sock)))
            after.put(read_until_closed(sock))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], after, thread


def test_a_fake_server_with_another_secret_gets_nothing_past_the_handshake() -> None:
    nonce = bytes(range(32))

    def respond(line: bytes | None) -> bytes:
        if line is None:
            return json.dumps({"slimvisor-pool": 1, "nonce": nonce.hex()}).encode() + b"\n"
        client_nonce = bytes.fromhex(json.loads(line)["nonce"])
        forged = hmac.new(pool_key(OTHER), b"server" + client_nonce + nonce, hashlib.sha256).hexdigest()
        return json.dumps({"proof": forged}).encode() + b"\n"

    port, after, thread = fake_server(respond)
    with pytest.raises(PeerAuthError, match=rf"^pool member 127\.0\.0\.1:{port}: wrong proof: the server "
                       "does not hold this pool's secret$"):  # fmt: skip
        connect("127.0.0.1", port, SECRET, timeout=WAIT)
    assert after.get(timeout=WAIT) == b""  # closed, and not a byte of API (or migration) sent
    thread.join()


def test_a_fake_server_replaying_a_recorded_session_is_caught(served: Served) -> None:
    """Someone on the pool network recorded a real session; playing the server's side of it back
    (its nonce and its proof) does not pass for the server, as the client's nonce is new."""
    with served.raw() as sock:
        greeting = read_line(sock)
        client, line = answer(greeting)
        sock.sendall(line)
        proof = read_line(sock)
        assert client.receive_data(proof) == b"" and client.phase is Phase.DONE
    port, after, thread = fake_server(lambda line: greeting if line is None else proof)
    with pytest.raises(PeerAuthError, match="wrong proof: the server does not hold this pool's secret"):
        connect("127.0.0.1", port, SECRET, timeout=WAIT)
    assert after.get(timeout=WAIT) == b""
    thread.join()


def test_a_replayed_client_message_from_an_earlier_session_is_refused(served: Served) -> None:
    with served.raw() as first:
        client, recorded = answer(read_line(first))
        first.sendall(recorded)
        client.receive_data(read_line(first))
        assert client.phase is Phase.DONE
        served.peers.get(timeout=WAIT)
        with served.raw() as second:
            assert read_line(second) != b""  # a new server nonce
            second.sendall(recorded)
            assert json.loads(read_until_closed(second)) == {
                "error": "wrong proof: the client does not hold this pool's secret"
            }
    assert served.peers.empty() and served.listener.refused == 1


def test_a_silent_connection_is_closed_after_the_handshake_timeout() -> None:
    served = Served(SECRET, handshake_timeout=0.3)
    try:
        with served.raw() as sock:
            read_line(sock)
            started = time.monotonic()
            assert json.loads(read_until_closed(sock)) == {"error": "no handshake within 0.3 s"}
            assert time.monotonic() - started >= 0.25
        assert served.listener.refused == 1 and served.listener.pending == 0 and served.peers.empty()
    finally:
        served.close()


@pytest.mark.parametrize("line", [b"x" * 600, b'{"nonce": "' + b" " * 600 + b'"}\n', b"y" * 512])
def test_an_oversized_handshake_line_closes_the_connection(served: Served, line: bytes) -> None:
    with served.raw() as sock:
        read_line(sock)
        sock.sendall(line)
        reply = read_until_closed(sock)
    assert json.loads(reply) == {"error": f"a handshake line over {MAX_HANDSHAKE_LINE} bytes"}
    assert served.listener.refused == 1 and served.peers.empty()


def test_a_handshake_line_of_the_limit_is_read() -> None:
    """511 bytes and its newline: read whole (here refused for its proof, not for its length)."""
    server = ServerHandshake(SECRET)
    line = json.dumps({"nonce": "00" * 32, "proof": "00" * 32, "pad": ""}).encode()
    line = line[:-2] + b"p" * (MAX_HANDSHAKE_LINE - 1 - len(line)) + b'"}'
    assert len(line) == MAX_HANDSHAKE_LINE - 1
    server.receive_data(line + b"\n")
    assert server.reason == "wrong proof: the client does not hold this pool's secret"


def test_connections_past_max_pending_are_closed_at_accept(served: Served) -> None:
    waiting = [served.raw() for _ in range(MAX_PENDING)]
    try:
        greetings = [read_line(sock) for sock in waiting]  # all accepted: each has its own nonce
        assert len(set(greetings)) == MAX_PENDING and served.listener.pending == MAX_PENDING
        with served.raw() as extra:
            assert read_until_closed(extra) == b""  # no greeting: closed as it was accepted
        assert served.listener.refused == 1
        with pytest.raises(ConnectionRefusedError, match="closed the connection before its greeting"):
            connect("127.0.0.1", served.port, SECRET, timeout=WAIT)
        # The pending ones still authenticate; each that does frees a place.
        client, line = answer(greetings[0])
        waiting[0].sendall(line)
        client.receive_data(read_line(waiting[0]))
        assert client.phase is Phase.DONE
        served.peers.get(timeout=WAIT)
        with served.raw() as later:
            authenticate(later, SECRET, timeout=WAIT)
        served.peers.get(timeout=WAIT)
    finally:
        for sock in waiting:
            sock.close()


def test_an_unreachable_member_is_an_oserror_naming_it() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError, match=rf"^pool member 127\.0\.0\.1:{port}: Connection refused$"):
        connect("127.0.0.1", port, SECRET, timeout=WAIT)


def test_a_port_in_use_is_an_oserror_naming_it(served: Served) -> None:
    loop = EventLoop()
    try:
        with pytest.raises(OSError, match=rf"^pool port 127\.0\.0\.1:{served.port}: Address already in use$"):
            PeerListener(loop, "127.0.0.1", served.port, SECRET, lambda sock: None)
    finally:
        loop.close()


def test_closing_the_listener_closes_pending_connections() -> None:
    served = Served(SECRET)
    sock = served.raw()
    try:
        read_line(sock)
        served.close()
        assert read_until_closed(sock) == b""
        with pytest.raises(ConnectionRefusedError):
            connect("127.0.0.1", served.port, SECRET, timeout=WAIT)
    finally:
        sock.close()


OUT_OF_FDS = """
import os, resource, sys, time
from slimvisor.runtime.loop import EventLoop
from slimvisor.toolstack.peers import PeerListener
loop = EventLoop()
listener = PeerListener(loop, "127.0.0.1", 0, sys.argv[1], lambda sock: None, handshake_timeout=1.0)
open_fds = len(os.listdir("/proc/self/fd")) - 1  # listdir's own is closed again
resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(listener.address[1], flush=True)
cpu, end = sum(os.times()[:2]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    loop.run_once(0.05)
print(sum(os.times()[:2]) - cpu, flush=True)
"""


def test_out_of_fds_the_listener_waits_instead_of_spinning_then_accepts_again() -> None:
    """With no fd left for accept (EMFILE), the connection waits in the backlog: the listener
    stops watching for a second rather than wake on it at once forever, then takes it."""
    seconds = 3.0
    proc = subprocess.Popen([sys.executable, "-c", OUT_OF_FDS, SECRET, str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as first:
            read_line(first)  # the last fd the listener had
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as second:
                assert json.loads(read_until_closed(first)) == {"error": "no handshake within 1 s"}
                assert b"slimvisor-pool" in read_line(second)  # accepted once the first one's fd was free
        cpu = float(proc.stdout.readline())
        assert proc.wait(timeout=WAIT) == 0
        assert cpu < seconds / 3, f"{cpu:.2f} s of CPU in {seconds} s: spinning on the listening socket"
        assert "accept failed (Too many open files); retrying in 1 s" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
