"""The xenstore wire protocol as a guest and as dom0 speak it, transactions included: every request
gets a well-formed reply (an ERROR with an errno name at worst), never EIO (what `handle` answers
when the store itself failed), and what a guest's connections can make the store keep stays under
its quotas."""

from __future__ import annotations

from fuzz.bytes import Input
from slimvisor.xenstore.server import handle
from slimvisor.xenstore.store import Connection, Quotas, Store
from slimvisor.xenstore.wire import XENSTORE_PAYLOAD_MAX, XS_ERROR, Message, MessageReader, WireError, join

GUEST = 3
QUOTAS = Quotas(nodes=40, node_size=64, watches=8, transactions=3, transaction_nodes=32, memory=16 << 10)
# Strings that reach the store's rules: the guest's home, relative paths, special watches, perms.
WORDS = [
    "", "/", "a", "a/b", "/local/domain/3", "/local/domain/3/x", "/local/domain/3/x/y", "/local/domain/4/z",
    "/tool", "@introduceDomain", "@releaseDomain", "3", "4", "0", "T", "F", "n3", "r0", "b4", "w3", "tok",
    "x" * 70, "/local/domain/3/" + "p/" * 40, "..", "a//b", "/a\0b", "-1", "4294967295", "65536",
]  # fmt: skip


def _payload(inp: Input) -> bytes:
    if inp.num() & 1:
        return inp.rest(96)
    return join(inp.pick(WORDS) for _ in range(inp.num() % 4))


def _request(inp: Input, conn: Connection) -> Message:
    type_ = inp.num() % 24 if inp.num() & 7 else inp.num(2)
    tx = 0
    if conn.transactions and inp.num() & 3:
        tx = inp.pick(sorted(conn.transactions))
    elif inp.num() & 1:
        tx = inp.num(4)
    return Message(type_, inp.num(4), tx, _payload(inp))


def target(data: bytes) -> None:
    inp = Input(data)
    store = Store(quotas=QUOTAS)
    try:
        dom0 = store.connect(0)
        dom0.mkdir(f"/local/domain/{GUEST}")
        conns = [dom0, store.connect(GUEST), store.connect(GUEST)]
        while inp.more:
            conn = inp.pick(conns)
            msg = _request(inp, conn)
            out = handle(conn, msg)
            try:
                replies = MessageReader().feed_all(out)
            except WireError as e:
                raise AssertionError(f"{msg.name}: a reply that does not parse: {e}") from None
            assert len(replies) == 1 and replies[0].req_id == msg.req_id, f"{msg.name}: not one reply"
            r = replies[0]
            assert len(r.payload) <= XENSTORE_PAYLOAD_MAX
            assert not (r.type == XS_ERROR and r.payload == b"EIO\0"), f"{msg.name} {msg.payload!r}: EIO"
            if inp.num() % 16 == 0:  # a connection goes away mid-transaction and comes back
                i = inp.below(len(conns))
                conns[i].close()
                conns[i] = store.connect(conns[i].domid)
            for c in conns[1:]:
                assert len(c.transactions) <= QUOTAS.transactions
    finally:
        store.close()
