"""The pool link's handshake (slimvisor.toolstack.peers), from either side, against a hostile peer:
whatever arrives, in whatever pieces, the handshake ends failed (sending nothing more) or, only
once the honest peer's real line came, done; nothing is raised and every line it sends fits the
other side's MAX_HANDSHAKE_LINE."""

from __future__ import annotations

import json

from fuzz.bytes import Input
from slimvisor.toolstack.peers import MAX_HANDSHAKE_LINE, ClientHandshake, Phase, ServerHandshake

SECRET = "5a" * 32
KEYS = ["slimvisor-pool", "nonce", "proof", "error", ""]
VALUES: list[object] = [1, 2, True, None, "", "00" * 32, "AB" * 32, "0" * 63, "zz" * 32, [], {}, -1, 1.0, "x" * 600]


def _message(inp: Input) -> bytes:
    return json.dumps({inp.pick(KEYS): inp.pick(VALUES) for _ in range(inp.num() % 4)}).encode() + b"\n"


def target(data: bytes) -> None:
    inp = Input(data)
    server_side = bool(inp.num() & 1)
    me: ServerHandshake | ClientHandshake
    if server_side:
        me, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
        real = [client.receive_data(me.greeting)]  # the honest client's answer
    else:
        me, server = ClientHandshake(SECRET), ServerHandshake(SECRET)
        real = [server.greeting]  # then the honest server's proof, once we answered it
    fed_real = False
    while inp.more:
        kind = inp.num() % 5
        if kind == 0:
            chunk = inp.pick(real)
        elif kind == 1:  # a piece of a real line: lines arrive in any pieces
            line = inp.pick(real)
            chunk = line[: inp.below(len(line) + 1)]
        elif kind == 2:
            chunk = _message(inp)
        else:
            chunk = inp.rest(700)
        before = me.phase
        out = me.receive_data(chunk)
        fed_real |= chunk in real
        assert all(len(line) < MAX_HANDSHAKE_LINE for line in out.splitlines()), out
        if before is Phase.FAILED:
            assert (me.phase, out) == (Phase.FAILED, b""), "a failed handshake came back"
        if me.phase is Phase.DONE and before is not Phase.DONE:
            assert fed_real, "done without the honest peer's line"
        if not server_side and out and server.phase is Phase.WAITING:
            real.append(server.receive_data(out))
