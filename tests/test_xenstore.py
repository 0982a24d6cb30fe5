"""Xenstore: the store's semantics, the wire codec, and the server against Debian's xenstore-utils."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimvisor.runtime.loop import EventLoop
from slimvisor.xenstore.server import MAX_DOMAIN_CONNECTIONS, XenstoreServer, handle
from slimvisor.xenstore.store import Connection, Quotas, Store
from slimvisor.xenstore.wire import (
    HEADER,
    TYPE_NAMES,
    XENSTORE_PAYLOAD_MAX,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_ERROR,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
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
    WireError,
    XenstoreError,
    decode_perms,
    encode_perms,
    join,
    request,
)

XENSTORE_UTILS = shutil.which("xenstore-write") is not None
needs_utils = pytest.mark.skipif(not XENSTORE_UTILS, reason="Debian's xenstore-utils are not installed")


def errno_of(call: Callable[..., object], *args: object) -> str:
    with pytest.raises(XenstoreError) as info:
        call(*args)
    return info.value.name


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store()
    yield s
    s.close()


@pytest.fixture
def dom0(store: Store) -> Connection:
    return store.connect(0)


def errno_or_ok(call: Callable[..., object], *args: object) -> str:
    """The string "OK", or the errno name of the XenstoreError it raised."""
    try:
        call(*args)
    except XenstoreError as e:
        return e.name
    return "OK"


def make_guest_home(dom0: Connection, domid: int) -> None:
    """What a toolstack does: /local/domain/<id> owned by the guest, readable by dom0."""
    dom0.mkdir(f"/local/domain/{domid}")
    dom0.set_perms(f"/local/domain/{domid}", [Perm(domid, "n"), Perm(0, "r")])


# -- the store ---------------------------------------------------------------------------------------


def test_write_creates_parents_and_lists_children_in_order(dom0: Connection) -> None:
    dom0.write("/a/b/c", b"v")
    dom0.write("/a/b/a", b"w")
    assert dom0.read("/a/b/c") == b"v"
    assert dom0.read("/a") == b"" and dom0.read("/a/b") == b""
    assert dom0.directory("/a/b") == ["c", "a"]
    assert dom0.directory("/") == ["tool", "a"]
    assert dom0.read("/tool/xenstored") == b""  # as xenstored's setup_structure()
    dom0.write("/a/b/c", b"")
    assert dom0.read("/a/b/c") == b""


def test_mkdir_keeps_values_and_rm_is_recursive(dom0: Connection) -> None:
    dom0.write("/a/b", b"keep")
    dom0.mkdir("/a/b")
    dom0.mkdir("/a/b/c/d")
    assert dom0.read("/a/b") == b"keep"
    assert dom0.directory("/a/b/c") == ["d"]
    dom0.rm("/a/b")
    assert dom0.directory("/a") == []
    assert errno_of(dom0.read, "/a/b/c/d") == "ENOENT"
    dom0.rm("/a/gone")  # absent but its parent exists: fine
    assert errno_of(dom0.rm, "/a/gone/deeper") == "ENOENT"
    assert errno_of(dom0.rm, "/") == "EINVAL"


@pytest.mark.parametrize("path", ["", "/a/", "//a", "/a//b", "/a b", "/caf\u00e9", "@x", "/a\nb"])
def test_invalid_paths(dom0: Connection, path: str) -> None:
    assert errno_of(dom0.write, path, b"x") == "EINVAL"


def test_relative_paths_are_below_the_domain_path(store: Store, dom0: Connection) -> None:
    make_guest_home(dom0, 3)
    guest = store.connect(3)
    guest.write("device/vif/0/state", b"1")
    assert dom0.read("/local/domain/3/device/vif/0/state") == b"1"
    dom0.write("name", b"Domain-0")
    assert dom0.read("/local/domain/0/name") == b"Domain-0"


def test_path_length_limits(store: Store, dom0: Connection) -> None:
    make_guest_home(dom0, 1)
    guest = store.connect(1)
    assert errno_of(guest.write, "x" * 2049, b"") == "EINVAL"  # XENSTORE_REL_PATH_MAX below its home
    guest.write("x" * 2048, b"")
    assert errno_of(dom0.write, "/" + "x" * 3072, b"") == "EINVAL"  # XENSTORE_ABS_PATH_MAX


def test_deep_trees_need_no_recursion(tmp_path: Path) -> None:
    path = "/d" * 1500  # 3000 bytes, deeper than Python's recursion limit
    s = Store(tmp_path / "xs.db")
    s.connect().write(path, b"deep")
    s.connect().rm("/d")
    s.connect().write(path, b"deep")
    s.close()
    s = Store(tmp_path / "xs.db")
    assert s.connect().read(path) == b"deep"
    s.close()


# -- permissions -------------------------------------------------------------------------------------


def test_domains_cannot_read_each_other(store: Store, dom0: Connection) -> None:
    for domid in (1, 2):
        make_guest_home(dom0, domid)
        dom0.write(f"/local/domain/{domid}/secret", f"s{domid}".encode())
    d1 = store.connect(1)
    assert d1.read("/local/domain/1/secret") == b"s1"
    assert errno_of(d1.read, "/local/domain/2/secret") == "EACCES"
    assert errno_of(d1.read, "/local/domain/2") == "EACCES"
    assert errno_of(d1.directory, "/local/domain/2") == "EACCES"
    assert errno_of(d1.write, "/local/domain/2/secret", b"x") == "EACCES"
    assert errno_of(d1.write, "/local/domain/2/new", b"x") == "EACCES"
    # a missing node says ENOENT only where the parent would have let the caller in
    assert errno_of(d1.read, "/local/domain/2/missing") == "EACCES"
    assert errno_of(d1.read, "/local/domain/1/missing") == "ENOENT"
    assert dom0.read("/local/domain/2/secret") == b"s2"  # dom0 is privileged


def test_set_perms_grants_and_ownership(store: Store, dom0: Connection) -> None:
    make_guest_home(dom0, 1)
    make_guest_home(dom0, 2)
    dom0.write("/local/domain/2/shared", b"hello")
    d1, d2 = store.connect(1), store.connect(2)
    assert errno_of(d1.read, "/local/domain/2/shared") == "EACCES"
    d2.set_perms("/local/domain/2/shared", [Perm(2, "n"), Perm(1, "r")])
    assert d1.read("/local/domain/2/shared") == b"hello"
    assert errno_of(d1.write, "/local/domain/2/shared", b"x") == "EACCES"
    assert d1.get_perms("/local/domain/2/shared") == [Perm(2, "n"), Perm(1, "r")]
    # an entry with write access is not ownership: only the owner (or dom0) sets permissions
    d2.set_perms("/local/domain/2/shared", [Perm(2, "n"), Perm(1, "b")])
    d1.write("/local/domain/2/shared", b"x")
    assert errno_of(d1.set_perms, "/local/domain/2/shared", [Perm(1, "b")]) == "EACCES"
    assert errno_of(d2.set_perms, "/local/domain/2/shared", [Perm(1, "b")]) == "EACCES"  # no giving away
    dom0.set_perms("/local/domain/2/shared", [Perm(1, "r")])
    assert dom0.get_perms("/local/domain/2/shared") == [Perm(1, "r")]
    assert d2.read("/local/domain/2/shared") == b"x"  # the default (first entry) now lets others read
    assert errno_of(d2.write, "/local/domain/2/shared", b"y") == "EACCES"


def test_new_nodes_inherit_permissions_and_guests_own_what_they_create(store: Store, dom0: Connection) -> None:
    dom0.mkdir("/local/domain/1")
    dom0.set_perms("/local/domain/1", [Perm(0, "w"), Perm(1, "b"), Perm(5, "r")])
    d1 = store.connect(1)
    d1.write("/local/domain/1/data/x", b"1")
    assert d1.get_perms("/local/domain/1/data/x") == [Perm(1, "w"), Perm(1, "b"), Perm(5, "r")]
    dom0.write("/local/domain/1/by-dom0", b"")  # as xenstored: a privileged creator keeps the parent's owner
    assert dom0.get_perms("/local/domain/1/by-dom0") == [Perm(0, "w"), Perm(1, "b"), Perm(5, "r")]


def test_special_nodes_have_permissions(store: Store, dom0: Connection) -> None:
    assert dom0.get_perms("@releaseDomain") == [Perm(0, "n")]
    dom0.set_perms("@releaseDomain", [Perm(0, "n"), Perm(1, "r")])
    assert store.connect(1).get_perms("@releaseDomain") == [Perm(0, "n"), Perm(1, "r")]
    assert errno_of(dom0.read, "@releaseDomain") == "EINVAL"


def test_privileged_requests(store: Store, dom0: Connection) -> None:
    d1 = store.connect(1)
    assert errno_of(d1.introduce, 2) == "EACCES"
    assert errno_of(dom0.introduce, 0) == "EINVAL"
    dom0.introduce(2)
    assert store.is_introduced(2)
    assert errno_of(dom0.release, 3) == "ENOENT"
    # SET_TARGET: a device model domain gets its target's rights
    make_guest_home(dom0, 2)
    dom0.write("/local/domain/2/x", b"2")
    dom0.set_target(7, 2)
    assert store.connect(7).read("/local/domain/2/x") == b"2"


# -- quotas ------------------------------------------------------------------------------------------


def test_quotas_bind_guests_not_dom0() -> None:
    s = Store(quotas=Quotas(nodes=4, node_size=16, watches=2, transactions=1, permissions=2))
    dom0 = s.connect(0)
    make_guest_home(dom0, 1)
    d1 = s.connect(1)
    d1.write("a", b"x" * 16)
    assert errno_of(d1.write, "b", b"x" * 17) == "ENOSPC"
    d1.write("b/c", b"")  # the home (owned by 1) counts too: home, a, b, c are 4
    assert errno_of(d1.write, "d", b"") == "ENOSPC"
    d1.rm("b")
    d1.write("d", b"")
    assert errno_of(d1.set_perms, "a", [Perm(1, "n"), Perm(2, "r"), Perm(3, "r")]) == "ENOSPC"
    d1.watch("a", "t1")
    d1.watch("a", "t2")
    assert errno_of(d1.watch, "a", "t3") == "E2BIG"
    tx = d1.transaction_start()
    assert errno_of(d1.transaction_start) == "ENOSPC"
    d1.transaction_end(tx, False)
    d1.transaction_end(d1.transaction_start(), False)
    for i in range(10):  # dom0 is not bound
        dom0.write(f"/many/{i}", b"x" * 3000)
        dom0.watch("/many", f"t{i}")
    s.close()


def test_transaction_nodes_quota_bounds_one_transaction() -> None:
    """A transaction records what it looked at and queued (to check and replay at commit): a guest
    flooding one with WRITEs or failed READs of long paths gets ENOSPC, as xenstored's
    "transaction-nodes", and keeps a usable connection and transaction; dom0 is not bound."""
    s = Store(quotas=Quotas(transaction_nodes=16))
    dom0 = s.connect(0)
    make_guest_home(dom0, 1)
    d1 = s.connect(1)
    tx = d1.transaction_start()
    results = [errno_or_ok(d1.write, "data/x", str(i).encode(), tx) for i in range(100)]
    ok = results.count("OK")
    assert results == ["OK"] * ok + ["ENOSPC"] * (100 - ok) and 8 <= ok < 16
    long = "p" * 2000
    reads_tx = d1.transaction_start()
    reads = [errno_or_ok(d1.read, f"{long}{i}", reads_tx) for i in range(100)]
    assert set(reads) == {"ENOENT", "ENOSPC"} and len(d1.transactions[reads_tx].seen) <= 16
    assert d1.transactions[reads_tx].size <= 16 * (2100 + 256)
    assert errno_of(d1.write, "data/y", b"", reads_tx) == "ENOSPC"
    d1.transaction_end(reads_tx, True)
    d1.write("elsewhere", b"outside")  # outside the transaction: the connection is fine
    d1.transaction_end(tx, True)  # what it did within the quota commits
    assert d1.read("data/x") == str(ok - 1).encode()
    big = dom0.transaction_start()
    for i in range(100):
        dom0.write(f"/d0/{i}", b"", big)
        assert errno_of(dom0.read, f"/nope/{long}{i}", big) == "ENOENT"
    dom0.transaction_end(big, True)
    assert len(dom0.directory("/d0")) == 100
    s.close()


def test_memory_quota_bounds_a_domains_transactions() -> None:
    """All a guest's open transactions share xenstored's "memory" quota (ENOMEM); ending them frees it,
    and another guest is not affected."""
    s = Store(quotas=Quotas(memory=64 << 10))
    dom0 = s.connect(0)
    for domid in (1, 2):
        make_guest_home(dom0, domid)
    d1, d1b, d2 = s.connect(1), s.connect(1), s.connect(2)
    t1, t2 = d1.transaction_start(), d1b.transaction_start()
    value = b"v" * 2000
    results = [errno_or_ok(c.write, f"n{i}", value, t) for i in range(40) for c, t in ((d1, t1), (d1b, t2))]
    assert "ENOMEM" in results and results.count("OK") < 32
    assert s.transaction_memory(1) <= 64 << 10
    t3 = d2.transaction_start()
    for i in range(20):
        d2.write(f"n{i}", value, t3)
    d1.transaction_end(t1, False)
    d1b.transaction_end(t2, False)
    assert s.transaction_memory(1) == 0
    t1 = d1.transaction_start()
    d1.write("again", value, t1)
    d1.transaction_end(t1, True)
    d2.transaction_end(t3, True)
    assert d2.read("n19") == value
    s.close()


# -- watches -----------------------------------------------------------------------------------------


def test_watch_fires_at_once_and_for_descendants(store: Store, dom0: Connection) -> None:
    watcher = store.connect(0)
    watcher.watch("/vm", "tok")
    assert watcher.take_events() == [("/vm", "tok")]  # fired straight away, though /vm does not exist
    dom0.write("/vm/1/name", b"a")
    dom0.write("/vmx", b"not below /vm")
    dom0.write("/", b"above")
    dom0.mkdir("/vm/1")  # exists: no change, no event
    dom0.set_perms("/vm/1", [Perm(0, "r")])
    dom0.rm("/vm")
    assert watcher.take_events() == [
        ("/vm/1/name", "tok"),
        ("/vm/1", "tok"),
        ("/vm", "tok"),  # rm: the removed subtree's root matches the watch on it
    ]
    watcher.unwatch("/vm", "tok")
    assert errno_of(watcher.unwatch, "/vm", "tok") == "ENOENT"
    dom0.write("/vm", b"")
    assert watcher.take_events() == []


def test_watch_tokens_and_duplicates(store: Store, dom0: Connection) -> None:
    w = store.connect(0)
    w.watch("/a", "one")
    w.watch("/a/b", "two")
    w.watch("/a", "three")
    assert errno_of(w.watch, "/a", "one") == "EEXIST"
    w.take_events()
    dom0.write("/a/b/c", b"")
    assert sorted(w.take_events()) == [("/a/b/c", "one"), ("/a/b/c", "three"), ("/a/b/c", "two")]
    dom0.rm("/a")  # the watch on /a/b sees /a/b go, as an exact event on its own path
    assert ("/a/b", "two") in w.take_events()


def test_relative_watches_report_relative_paths(store: Store, dom0: Connection) -> None:
    make_guest_home(dom0, 4)
    d4 = store.connect(4)
    d4.watch("control", "c")
    assert d4.take_events() == [("control", "c")]
    dom0.write("/local/domain/4/control/shutdown", b"poweroff")
    assert d4.take_events() == [("control/shutdown", "c")]


def test_watches_respect_permissions(store: Store, dom0: Connection) -> None:
    make_guest_home(dom0, 1)
    make_guest_home(dom0, 2)
    d1 = store.connect(1)
    d1.watch("/local/domain", "all")
    d1.take_events()
    dom0.write("/local/domain/2/secret", b"x")
    dom0.write("/local/domain/1/mine", b"x")
    assert d1.take_events() == [("/local/domain/1/mine", "all")]


def test_special_watches(store: Store, dom0: Connection) -> None:
    w = store.connect(0)
    w.watch("@introduceDomain", "in")
    w.watch("@releaseDomain", "out")
    w.watch("/", "everything")
    w.take_events()
    dom0.introduce(5)
    dom0.release(5)
    assert w.take_events() == [("@introduceDomain", "in"), ("@releaseDomain", "out")]
    guest = store.connect(1)
    guest.watch("@releaseDomain", "g")
    guest.take_events()
    dom0.introduce(5)
    dom0.release(5)
    assert guest.take_events() == []  # @releaseDomain is n0 unless the toolstack opens it
    dom0.set_perms("@releaseDomain", [Perm(0, "n"), Perm(1, "r")])
    guest.take_events()
    dom0.introduce(5)
    dom0.release(5)
    assert guest.take_events() == [("@releaseDomain", "g")]


def test_closing_a_connection_drops_its_watches_and_transactions(store: Store, dom0: Connection) -> None:
    c = store.connect(1)
    c.watch("/x", "t")
    c.transaction_start()
    c.close()
    assert store.watch_count(1) == 0 and store.open_transactions(1) == 0
    dom0.write("/x", b"")
    assert not c.events


# -- transactions ------------------------------------------------------------------------------------


def test_transaction_sees_a_snapshot_and_its_own_writes(store: Store, dom0: Connection) -> None:
    other = store.connect(0)
    watcher = store.connect(0)
    dom0.write("/t/a", b"1")
    watcher.watch("/t", "w")
    watcher.take_events()
    tx = dom0.transaction_start()
    assert tx != 0
    dom0.write("/t/b", b"2", tx)
    dom0.rm("/t/a", tx)
    reader = dom0.transaction_start()
    other.write("/u", b"elsewhere")
    assert dom0.directory("/t", tx) == ["b"]
    assert errno_of(dom0.read, "/u", reader) == "ENOENT"  # started before /u was written
    assert dom0.directory("/t", reader) == ["a"]
    dom0.transaction_end(reader, False)
    assert other.directory("/t") == ["a"]  # nobody else sees it before the commit
    assert watcher.take_events() == []
    dom0.transaction_end(tx, True)
    assert other.directory("/t") == ["b"] and other.read("/u") == b"elsewhere"
    assert watcher.take_events() == [("/t/b", "w"), ("/t/a", "w")]  # fired at commit, not before


def test_transaction_conflict_then_retry(store: Store, dom0: Connection) -> None:
    other = store.connect(0)
    dom0.write("/counter", b"0")
    tx = dom0.transaction_start()
    value = int(dom0.read("/counter", tx))
    other.write("/counter", b"10")  # someone else changes what the transaction read
    dom0.write("/counter", str(value + 1).encode(), tx)
    assert errno_of(dom0.transaction_end, tx, True) == "EAGAIN"
    assert dom0.read("/counter") == b"10"
    assert errno_of(dom0.transaction_end, tx, True) == "ENOENT"  # the id is gone
    tx = dom0.transaction_start()  # the retry reads the new value and commits
    dom0.write("/counter", str(int(dom0.read("/counter", tx)) + 1).encode(), tx)
    dom0.transaction_end(tx, True)
    assert dom0.read("/counter") == b"11"


def test_transaction_conflicts_are_on_what_it_touched(store: Store, dom0: Connection) -> None:
    other = store.connect(0)
    dom0.write("/dev/a", b"")
    tx = dom0.transaction_start()
    dom0.write("/dev/b", b"mine", tx)
    other.write("/dev/c", b"theirs")  # a sibling appears: /dev was not listed, so no conflict
    other.write("/elsewhere", b"")
    dom0.transaction_end(tx, True)
    assert dom0.directory("/dev") == ["a", "c", "b"]
    tx = dom0.transaction_start()
    dom0.directory("/dev", tx)
    dom0.write("/dev/d", b"", tx)
    other.write("/dev/e", b"")  # now the listing it made is stale
    assert errno_of(dom0.transaction_end, tx, True) == "EAGAIN"
    tx = dom0.transaction_start()
    dom0.write("/dev/f", b"", tx)
    other.rm("/dev")  # its parent vanished
    assert errno_of(dom0.transaction_end, tx, True) == "EAGAIN"
    tx = dom0.transaction_start()
    assert errno_of(dom0.read, "/perm", tx) == "ENOENT"
    other.write("/perm", b"")  # it saw /perm absent
    assert errno_of(dom0.transaction_end, tx, True) == "EAGAIN"


def test_transaction_abort_and_errors(store: Store, dom0: Connection) -> None:
    tx = dom0.transaction_start()
    dom0.write("/gone", b"", tx)
    dom0.transaction_end(tx, False)
    assert not dom0.exists("/gone")
    assert errno_of(dom0.read, "/", 12345) == "ENOENT"
    assert errno_of(store.connect(0).transaction_end, dom0.transaction_start(), True) == "ENOENT"  # not its own


# -- persistence -------------------------------------------------------------------------------------


def test_persistence_across_stores(tmp_path: Path) -> None:
    db = tmp_path / "xs.db"
    s = Store(db)
    c = s.connect(0)
    c.write("/vm/a/name", b"alpha")
    c.write("/vm/b/name", b"\x00binary\xff")
    c.write("/vm/c", b"")
    c.set_perms("/vm/a", [Perm(1, "n"), Perm(0, "r")])
    c.set_perms("@introduceDomain", [Perm(0, "n"), Perm(3, "r")])
    c.rm("/vm/b")
    tx = c.transaction_start()
    c.write("/uncommitted", b"", tx)
    c.watch("/vm", "t")
    gen_before = c.directory_generation("/vm")[0]
    s.close()

    s = Store(db)
    c = s.connect(0)
    assert c.read("/vm/a/name") == b"alpha"
    assert c.directory("/vm") == ["a", "c"]
    assert c.get_perms("/vm/a") == [Perm(1, "n"), Perm(0, "r")]
    assert c.get_perms("@introduceDomain") == [Perm(0, "n"), Perm(3, "r")]
    assert not c.exists("/uncommitted")
    assert s.watch_count(0) == 0
    assert c.directory_generation("/vm")[0] > gen_before  # generations never repeat
    assert s.tree.owned[1] == 1  # ownership counts are rebuilt: /vm/a (its child was created before)
    s.close()


def test_database_is_wal_and_written_through(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "xs.db"
    s = Store(db)
    s.connect().write("/now", b"visible")
    reader = sqlite3.connect(db)
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reader.execute("SELECT value FROM nodes WHERE path = '/now'").fetchone()[0] == b"visible"
    reader.close()
    s.close()


# -- the wire codec ----------------------------------------------------------------------------------

messages = st.builds(
    Message,
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=XENSTORE_PAYLOAD_MAX),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=5), st.lists(st.integers(1, 64), min_size=1))
def test_messages_round_trip_in_any_chunks(msgs: list[Message], chunks: list[int]) -> None:
    data = b"".join(m.encode() for m in msgs)
    reader, out, i, pos = MessageReader(), [], 0, 0
    while pos < len(data):
        n = min(chunks[i % len(chunks)], reader.wanted())
        msg = reader.feed(data[pos : pos + n])
        pos += n
        i += 1
        if msg is not None:
            out.append(msg)
    assert out == msgs
    assert MessageReader().feed_all(data) == msgs


frames = st.tuples(
    st.integers(0, 0xFFFFFFFF),
    st.tuples(st.integers(0, XENSTORE_PAYLOAD_MAX + 2), st.binary(max_size=64)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=6), st.integers(0, 5000), st.lists(st.integers(1, 4200), min_size=1))
def test_framing_parses_up_to_an_oversized_header(
    parts: list[tuple[int, tuple[int, bytes]]], cut: int, chunks: list[int]
) -> None:
    """Headers mostly within XENSTORE_PAYLOAD_MAX, so the bytes get past the header check: every
    whole frame before the first oversized header is a message, that header (once whole) is a
    WireError, a cut-off tail is neither, and nothing else is ever raised."""
    data, expected, oversized_at = b"", [], None
    for type_, (length, fill) in parts:
        payload = (fill * (length // max(len(fill), 1) + 1))[:length] if fill else bytes(length)
        if length > XENSTORE_PAYLOAD_MAX and oversized_at is None:
            oversized_at = len(data) + HEADER.size
        data += HEADER.pack(type_ & 0xFF, 1, 2, length) + payload
        if oversized_at is None:
            expected.append(Message(type_ & 0xFF, 1, 2, payload))
    data = data[: max(len(data) - cut, 0)]
    reader, got, pos, i = MessageReader(), [], 0, 0
    try:
        while pos < len(data):
            n = min(chunks[i % len(chunks)], reader.wanted())
            pos, i = pos + n, i + 1
            msg = reader.feed(data[pos - n : pos])
            if msg is not None:
                got.append(msg)
    except WireError:
        assert oversized_at is not None and pos == oversized_at
    else:
        assert oversized_at is None or len(data) < oversized_at
    whole, end = [], 0
    for m in expected:
        end += HEADER.size + len(m.payload)
        if end <= len(data):
            whole.append(m)
    assert got == whole


def test_oversized_payload_is_a_wire_error() -> None:
    reader = MessageReader()
    assert reader.feed(HEADER.pack(XS_READ, 1, 0, XENSTORE_PAYLOAD_MAX)) is None
    with pytest.raises(WireError, match="payload of 4097 bytes is larger than 4096"):
        MessageReader().feed(HEADER.pack(XS_READ, 1, 0, XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(WireError, match="read past the end of a message"):
        MessageReader().feed(b"x" * (HEADER.size + 1))


def test_message_strings_and_perms() -> None:
    msg = Message(XS_SET_PERMS, 1, 0, join(["/a", "b0", "r1", "n65535"]))
    assert msg.strings() == ["/a", "b0", "r1", "n65535"]
    perms = decode_perms(msg.strings()[1:])
    assert perms == [Perm(0, "b"), Perm(1, "r"), Perm(65535, "n")]
    assert encode_perms(perms) == b"b0\0r1\0n65535\0"
    for bad in ["x1", "r", "r-1", "r65536", "r0x1", "", "b 1"]:
        with pytest.raises(XenstoreError, match="bad permission"):
            Perm.parse(bad)
    assert Message(XS_READ, 0, 0, b"/a\0").onearg() == "/a"
    for bad_payload in [b"/a", b"/a\0b\0", b""]:
        with pytest.raises(XenstoreError, match="expected one string"):
            Message(XS_READ, 0, 0, bad_payload).onearg()


def call(conn: Connection, type: int, payload: bytes, tx: int = 0, req_id: int = 7) -> Message:
    out = MessageReader().feed_all(handle(conn, Message(type, req_id, tx, payload)))
    assert len(out) == 1 and out[0].req_id == req_id and out[0].tx_id == tx
    return out[0]


def test_replies_echo_and_errors_carry_errno_names(dom0: Connection) -> None:
    r = call(dom0, XS_WRITE, b"/a\0\x00value with NUL")
    assert r.type == XS_WRITE and r.payload == b"OK\0"
    assert call(dom0, XS_READ, b"/a\0").payload == b"\x00value with NUL"
    err = call(dom0, XS_READ, b"/nope\0")
    assert err.type == XS_ERROR and err.payload == b"ENOENT\0"
    assert call(dom0, XS_GET_DOMAIN_PATH, b"7\0").payload == b"/local/domain/7\0"
    assert call(dom0, XS_GET_PERMS, b"/a\0").payload == b"n0\0"
    assert call(dom0, 20, b"").payload == b"ENOSYS\0"  # XS_RESTRICT is gone
    assert call(dom0, XS_WATCH_EVENT, b"").payload == b"ENOSYS\0"
    assert call(dom0, XS_READ, b"/a\0", tx=99).payload == b"ENOENT\0"  # no such transaction
    tx = int(call(dom0, XS_TRANSACTION_START, b"\0").payload[:-1])
    assert call(dom0, XS_TRANSACTION_START, b"\0", tx=tx).payload == b"EBUSY\0"
    assert call(dom0, XS_TRANSACTION_END, b"X\0", tx=tx).payload == b"EINVAL\0"
    assert call(dom0, XS_TRANSACTION_END, b"T\0", tx=tx).payload == b"OK\0"
    guest = dom0.store.connect(1)
    assert call(guest, XS_INTRODUCE, join(["2", "0", "0"])).payload == b"EACCES\0"


def test_directory_part_pages_a_long_listing(dom0: Connection) -> None:
    names = [f"child-{i:04d}-" + "x" * 40 for i in range(150)]  # ~7.8 KiB of names
    for name in names:
        dom0.mkdir(f"/big/{name}")
    assert call(dom0, XS_DIRECTORY, b"/big\0").payload == b"E2BIG\0"
    got: list[str] = []
    offset, gens = 0, set()
    while True:
        r = call(dom0, XS_DIRECTORY_PART, join(["/big", str(offset)]))
        assert r.type == XS_DIRECTORY_PART and len(r.payload) <= XENSTORE_PAYLOAD_MAX
        gen, _, rest = r.payload.partition(b"\0")
        gens.add(gen)
        strings = rest.split(b"\0")[:-1]
        done = strings[-1:] == [b""]
        got += [s.decode() for s in strings if s]
        offset += sum(len(s) + 1 for s in strings if s)
        if done:
            break
    assert got == names and len(gens) == 1


class _Errors(logging.Handler):
    """Collects what a logger reports at ERROR: `handle()`'s internal errors (its bugs)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# Paths (some existing, see below), domids, offsets, permissions, tokens, bad and overlong ones
_WORDS = ["/a", "/a/b", "a", "a/b/c", "", "T", "F", "0", "1", "7", "4096", "r1", "b0", "n0", "@x", "/", "//"]
_WORDS += ["a/", "x" * 3100]


@pytest.mark.parametrize("type", range(25), ids=lambda t: TYPE_NAMES.get(t, str(t)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        st.binary(max_size=64),
        st.lists(st.sampled_from(_WORDS), min_size=1, max_size=3).map(join),
        st.lists(st.sampled_from(_WORDS), max_size=3).map(lambda w: join(w) + b"value\0\xff"),
    ),
    domid=st.sampled_from([0, 1]),
    in_transaction=st.booleans(),
)
def test_any_request_gets_a_well_formed_reply(
    store: Store, type: int, payload: bytes, domid: int, in_transaction: bool
) -> None:
    """Every reply is the request's own or an ERROR with an errno name, and never an internal
    error: `handle()` answers those EIO too (the client must get a reply), so the test watches the
    log for them, and EIO itself, which an in-memory store has no other cause to give, fails it."""
    conn = store.connect(domid)
    errors = _Errors()
    logger = logging.getLogger("slimvisor.xenstore.server")
    logger.addHandler(errors)
    try:
        dom0 = store.connect(0)  # nodes for the words to find, so requests get past their lookups
        make_guest_home(dom0, 1)
        dom0.write("/a/b", b"x")
        dom0.write("/local/domain/1/a/b/c", b"y")
        dom0.close()
        tx = conn.transaction_start() if in_transaction else 0
        r = call(conn, type, payload, tx)
        assert r.type in (type, XS_ERROR)
        if r.type == XS_ERROR:
            assert r.payload[:-1].decode() in XSD_ERRORS and r.payload.endswith(b"\0")
            assert r.payload != b"EIO\0"
        assert errors.records == []
    finally:
        logger.removeHandler(errors)
        conn.close()


# -- the server, over real sockets ---------------------------------------------------------------------


class WireClient:
    """A minimal xenstore client: requests, replies, and watch events set aside."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.reader = MessageReader()
        self.events: list[list[str]] = []
        self.req_id = 0

    @classmethod
    def connect(cls, path: str) -> WireClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    def _next(self) -> Message:
        while True:
            data = self.sock.recv(self.reader.wanted())
            if not data:
                raise EOFError
            msg = self.reader.feed(data)
            if msg is not None:
                return msg

    def call(self, type: int, payload: bytes, tx: int = 0) -> Message:
        self.req_id += 1
        self.sock.sendall(request(type, payload, self.req_id, tx))
        while True:
            msg = self._next()
            if msg.type == XS_WATCH_EVENT:
                self.events.append(msg.strings())
                continue
            assert msg.req_id == self.req_id and msg.tx_id == tx
            return msg

    def wait_event(self) -> list[str]:
        if not self.events:
            msg = self._next()
            assert msg.type == XS_WATCH_EVENT
            self.events.append(msg.strings())
        return self.events.pop(0)

    def close(self) -> None:
        self.sock.close()


class RunningServer:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.socket = os.path.join(directory, "socket")
        self.store = Store(os.path.join(directory, "xs.db"))
        self.server = XenstoreServer(self.store)
        self.server.listen(self.socket)
        self.env = {**os.environ, "XENSTORED_PATH": self.socket}
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10)
        if check:
            assert result.returncode == 0, result
        return result


@pytest.fixture
def server() -> Iterator[RunningServer]:
    directory = tempfile.mkdtemp(prefix="xs-", dir="/tmp")  # short: a Unix socket path has 108 bytes
    running = RunningServer(directory)
    yield running
    running.server.stop()
    running.thread.join(5)
    running.server.close()
    running.store.close()
    shutil.rmtree(directory)


@needs_utils
def test_xenstore_utils_interoperate(server: RunningServer) -> None:
    server.thread.start()
    run = server.run
    run("xenstore-write", "/local/domain/1/name", "guest-one", "/local/domain/1/memory/target", "524288")
    assert run("xenstore-read", "/local/domain/1/name").stdout == "guest-one\n"
    assert run("xenstore-read", "/local/domain/1/name", "/local/domain/1/memory/target").stdout == (
        "guest-one\n524288\n"
    )
    missing = run("xenstore-read", "/local/domain/1/nope", check=False)
    assert missing.returncode == 1 and "couldn't read path" in missing.stderr
    assert run("xenstore-list", "/local/domain/1").stdout == "name\nmemory\n"
    assert run("xenstore-ls", "/local/domain/1").stdout == ('name = "guest-one"\nmemory = ""\n target = "524288"\n')
    assert run("xenstore-exists", "/local/domain/1/name").returncode == 0
    assert run("xenstore-exists", "/local/domain/1/nope", check=False).returncode == 1

    run("xenstore-chmod", "/local/domain/1", "n1", "r0")
    assert server.store.connect().get_perms("/local/domain/1") == [Perm(1, "n"), Perm(0, "r")]
    run("xenstore-chmod", "-r", "/local/domain/1", "b1")
    assert server.store.connect().get_perms("/local/domain/1/memory/target") == [Perm(1, "b")]
    ls = run("xenstore-ls", "-p", "/local/domain/1").stdout
    assert "(b1)" in ls and "memory" in ls
    assert run("xenstore-chmod", "/local/domain/1", "x9", check=False).returncode != 0

    run("xenstore-rm", "/local/domain/1/memory")
    assert run("xenstore-list", "/local/domain/1").stdout == "name\n"
    run("xenstore-rm", "-t", "/local/domain/1/name")  # -t: also the parents it leaves empty
    assert run("xenstore-list", "/").stdout == "tool\n"
    assert run("xenstore-rm", "/no/such/parent", check=False).returncode == 1


@needs_utils
def test_xenstore_list_uses_directory_part_for_long_listings(server: RunningServer) -> None:
    names = [f"n{i:04d}-" + "y" * 50 for i in range(120)]
    conn = server.store.connect()
    for name in names:
        conn.mkdir(f"/big/{name}")
    server.thread.start()
    assert server.run("xenstore-list", "/big").stdout.split() == names


@needs_utils
def test_xenstore_watch_prints_events(server: RunningServer) -> None:
    server.thread.start()
    server.run("xenstore-write", "/vm/state", "starting")
    watch = subprocess.Popen(["xenstore-watch", "-n", "3", "/vm"], env=server.env, stdout=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline() == "/vm\n"  # the initial fire: the watch is in place
        server.run("xenstore-write", "/vm/state", "running")
        server.run("xenstore-write", "/elsewhere", "x")
        server.run("xenstore-rm", "/vm/state")
        assert watch.wait(10) == 0
        assert watch.stdout.read() == "/vm/state\n/vm/state\n"
    finally:
        watch.kill()
        watch.wait()


@pytest.fixture
def connect(server: RunningServer) -> Iterator[Callable[[], WireClient]]:
    """The server running, and a way to open wire clients to it (closed after the test)."""
    opened: list[WireClient] = []

    def open_client() -> WireClient:
        opened.append(WireClient.connect(server.socket))
        return opened[-1]

    server.thread.start()
    yield open_client
    for client in opened:
        client.close()


def test_transaction_conflict_between_two_wire_clients(connect: Callable[[], WireClient]) -> None:
    a, b = connect(), connect()
    assert a.call(XS_WRITE, b"/counter\x000").payload == b"OK\0"
    assert b.call(XS_WATCH, join(["/counter", "b-watch"])).payload == b"OK\0"
    assert b.wait_event() == ["/counter", "b-watch"]

    def increment(client: WireClient, meddle: WireClient | None) -> bytes:
        tx = int(client.call(XS_TRANSACTION_START, b"\0").payload[:-1])
        value = int(client.call(XS_READ, b"/counter\0", tx).payload)
        if meddle is not None:
            assert meddle.call(XS_WRITE, b"/counter\x00100").payload == b"OK\0"
        client.call(XS_WRITE, b"/counter\0" + str(value + 1).encode(), tx)
        end = client.call(XS_TRANSACTION_END, b"T\0", tx)
        return end.payload if end.type == XS_TRANSACTION_END else b"error " + end.payload

    assert increment(a, meddle=b) == b"error EAGAIN\0"
    assert b.wait_event() == ["/counter", "b-watch"]  # b's own write; the failed commit fired nothing
    assert increment(a, meddle=None) == b"OK\0"  # the retry
    assert b.wait_event() == ["/counter", "b-watch"]
    assert b.call(XS_READ, b"/counter\0").payload == b"101"
    assert b.events == []


def test_concurrent_increments_lose_nothing(connect: Callable[[], WireClient]) -> None:
    """Clients racing read-modify-write transactions: conflicts are retried, no update is lost."""
    clients = [connect() for _ in range(4)]
    clients[0].call(XS_WRITE, b"/n\x000")

    def worker(client: WireClient) -> None:
        for _ in range(25):
            while True:
                tx = int(client.call(XS_TRANSACTION_START, b"\0").payload[:-1])
                value = int(client.call(XS_READ, b"/n\0", tx).payload)
                client.call(XS_WRITE, b"/n\0" + str(value + 1).encode(), tx)
                if client.call(XS_TRANSACTION_END, b"T\0", tx).type == XS_TRANSACTION_END:
                    break  # else EAGAIN: go again

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert clients[0].call(XS_READ, b"/n\0").payload == b"100"


def test_malformed_message_ends_only_that_connection(connect: Callable[[], WireClient]) -> None:
    bad, good = connect(), connect()
    assert good.call(XS_WRITE, b"/k\0v").payload == b"OK\0"
    bad.sock.sendall(HEADER.pack(XS_WRITE, 1, 0, XENSTORE_PAYLOAD_MAX + 1) + b"x" * 64)
    with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: a reset
        assert bad.sock.recv(16) == b""
    assert good.call(XS_READ, b"/k\0").payload == b"v"
    assert good.call(XS_RM, b"/k\0").payload == b"OK\0"


def test_domain_connection_is_a_guest(server: RunningServer) -> None:
    dom0 = server.store.connect()
    make_guest_home(dom0, 1)
    make_guest_home(dom0, 2)
    dom0.write("/local/domain/2/secret", b"s")
    ours, theirs = socket.socketpair()
    server.server.add_domain_connection(1, theirs)
    server.thread.start()
    guest = WireClient(ours)
    try:
        assert guest.call(XS_WRITE, b"device/vbd/0\x004").payload == b"OK\0"  # relative to its home
        assert dom0.read("/local/domain/1/device/vbd/0") == b"4"
        assert guest.call(XS_READ, b"/local/domain/2/secret\0").payload == b"EACCES\0"
        assert guest.call(XS_DIRECTORY, b"device\0").payload == b"vbd\0"
        assert guest.call(XS_GET_PERMS, b"device/vbd/0\0").payload == b"n1\0r0\0"
    finally:
        guest.close()


@needs_utils
def test_command_line_server_persists_across_restarts(tmp_path: Path) -> None:
    directory = tempfile.mkdtemp(prefix="xs-", dir="/tmp")
    sock, db = os.path.join(directory, "socket"), str(tmp_path / "xs.db")
    env = {**os.environ, "XENSTORED_PATH": sock}

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "slimvisor.xenstore.server", "--socket", sock, "--db", db])
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        return proc

    proc = start()
    try:
        subprocess.run(["xenstore-write", "/persist/me", "yes"], env=env, check=True, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert not os.path.exists(sock)
    proc = start()
    try:
        out = subprocess.run(["xenstore-read", "/persist/me"], env=env, capture_output=True, text=True, timeout=10)
        assert out.stdout == "yes\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        shutil.rmtree(directory)


# -- guests' sockets, and a loop shared with other services ------------------------------------------


class SharedLoop:
    """A `slimvisor.runtime.loop.EventLoop` serving a xenstore (and whatever else) in a thread.

    The test thread calls into the xenstore under `lock`, as a daemon would from a loop callback.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.loop = EventLoop()
        self.store = Store()
        self.server = XenstoreServer(self.store, self.loop)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                self.loop.run_once(0.01)
            time.sleep(0)  # let the test thread take the lock

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.server.close()
        assert not self.loop.closed  # the loop is its owner's: still open
        self.loop.close()
        self.store.close()


@pytest.fixture
def shared() -> Iterator[SharedLoop]:
    directory = tempfile.mkdtemp(prefix="xs-", dir="/tmp")
    running = SharedLoop(directory)
    dom0 = running.store.connect()
    for domid in (1, 2):
        make_guest_home(dom0, domid)
    dom0.write("/local/domain/2/secret", b"two")
    dom0.close()
    yield running
    running.close()
    shutil.rmtree(directory)


def test_xenstore_vsock_port_is_a_valid_vsock_port() -> None:
    from slimvisor.xenstore import XENSTORE_VSOCK_PORT

    assert 1024 <= XENSTORE_VSOCK_PORT < 0xFFFFFFFF  # not privileged, not VMADDR_PORT_ANY


def test_domain_socket_clients_are_that_domain(shared: SharedLoop) -> None:
    path = shared.path("d1")
    shared.server.listen_domain(path, 1)
    shared.server.listen(shared.path("tools"))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert shared.server.domain_listeners() == {1: [path]}
    shared.thread.start()
    guest, tools = WireClient.connect(path), WireClient.connect(shared.path("tools"))
    try:
        assert guest.call(XS_GET_DOMAIN_PATH, b"1\0").payload == b"/local/domain/1\0"
        assert guest.call(XS_WRITE, b"data/x\0hello").payload == b"OK\0"  # relative: below its home
        assert tools.call(XS_READ, b"/local/domain/1/data/x\0").payload == b"hello"
        assert guest.call(XS_GET_PERMS, b"data/x\0").payload == b"n1\0r0\0"  # it owns what it made
        assert guest.call(XS_READ, b"/local/domain/2/secret\0").payload == b"EACCES\0"
        assert guest.call(XS_WRITE, b"/local/domain/2/x\0y").payload == b"EACCES\0"
        assert guest.call(XS_INTRODUCE, join(["3", "0", "0"])).payload == b"EACCES\0"  # not privileged
        assert guest.call(XS_WATCH, join(["data", "t"])).payload == b"OK\0"
        assert guest.wait_event() == ["data", "t"]
        assert tools.call(XS_WRITE, b"/local/domain/1/data/y\0z").payload == b"OK\0"
        assert guest.wait_event() == ["data/y", "t"]  # relative watch, relative path
    finally:
        guest.close()
        tools.close()


def test_forget_domain_closes_its_socket_and_connections(shared: SharedLoop) -> None:
    one, two = shared.path("d1"), shared.path("d2")
    shared.server.listen_domain(one, 1)
    shared.server.listen_domain(two, 2)
    shared.thread.start()
    a, b = WireClient.connect(one), WireClient.connect(two)
    extra, theirs = socket.socketpair()
    with shared.lock:
        shared.server.add_domain_connection(1, theirs)
    try:
        assert a.call(XS_WATCH, join(["/local/domain/1", "w"])).payload == b"OK\0"
        assert a.wait_event() == ["/local/domain/1", "w"]
        assert b.call(XS_READ, b"secret\0").payload == b"two"
        with shared.lock:
            shared.server.forget_domain(1)
            assert shared.store.watch_count(1) == 0
            assert all(c.domid != 1 for c in shared.store.connections)
        assert not os.path.exists(one)
        for sock in (a.sock, extra):
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(16) == b""
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            WireClient.connect(one)
        assert shared.server.domain_listeners() == {2: [two]}
        assert b.call(XS_READ, b"secret\0").payload == b"two"  # the other domain carries on
        with shared.lock:
            shared.server.listen_domain(one, 1)  # a domain that comes back (reboot) is served again
        again = WireClient.connect(one)
        assert again.call(XS_READ, b"data/x\0").payload == b"ENOENT\0"
        again.close()
    finally:
        a.close()
        b.close()
        extra.close()


def test_domain_socket_refuses_dom0_and_a_socket_in_use(shared: SharedLoop) -> None:
    path = shared.path("d1")
    with pytest.raises(ValueError, match="listen_domain: 0 is not a guest domain id"):
        shared.server.listen_domain(path, 0)
    with pytest.raises(ValueError, match="listen_domain: 32752 is not a guest domain id"):
        shared.server.listen_domain(path, 0x7FF0)
    shared.server.listen_domain(path, 1)
    with pytest.raises(FileExistsError, match="another backend is already listening there"):
        shared.server.listen_domain(path, 2)
    assert shared.server.domain_listeners() == {1: [path]}


def test_domain_connections_are_capped(shared: SharedLoop) -> None:
    path = shared.path("d1")
    shared.server.listen_domain(path, 1)
    shared.thread.start()
    clients = [WireClient.connect(path) for _ in range(MAX_DOMAIN_CONNECTIONS)]
    try:
        for client in clients:
            assert client.call(XS_GET_DOMAIN_PATH, b"1\0").payload == b"/local/domain/1\0"
        refused = WireClient.connect(path)
        with contextlib.suppress(ConnectionResetError):
            assert refused.sock.recv(16) == b""
        refused.close()
        clients.pop().close()
        deadline = time.monotonic() + 5
        while len([c for c in shared.store.connections if c.domid == 1]) >= MAX_DOMAIN_CONNECTIONS:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        clients.append(WireClient.connect(path))
        assert clients[-1].call(XS_GET_DOMAIN_PATH, b"1\0").payload == b"/local/domain/1\0"
    finally:
        for client in clients:
            client.close()


def test_a_guest_that_reads_no_replies_is_no_longer_read(shared: SharedLoop) -> None:
    """Replies a guest leaves unread are bounded per domain (Quotas.output_backlog, xenstored's
    "outstanding"): its requests wait in its socket, nothing is lost, everyone else carries on."""
    shared.server.listen_domain(shared.path("d1"), 1)
    shared.server.listen_domain(shared.path("d2"), 2)
    shared.server.listen(shared.path("tools"))
    shared.thread.start()
    guest, flood = WireClient.connect(shared.path("d1")), WireClient.connect(shared.path("d1"))
    other, tools = WireClient.connect(shared.path("d2")), WireClient.connect(shared.path("tools"))
    value = b"v" * 2000
    try:
        assert flood.call(XS_WRITE, b"big\0" + value).payload == b"OK\0"
        flood.sock.settimeout(2)
        sent = 0
        with contextlib.suppress(TimeoutError):  # sendall blocks once slimvisord stops reading it
            for sent in range(1, 100_000):
                flood.sock.sendall(request(XS_READ, b"big\0", sent))
        assert sent < 100_000
        bound = shared.store.quotas.output_backlog + HEADER.size + XENSTORE_PAYLOAD_MAX
        with shared.lock:
            assert shared.server._backlog[1] <= bound
        guest.sock.sendall(request(XS_GET_DOMAIN_PATH, b"1\0", 1))  # its domain's other connections wait too...
        assert other.call(XS_READ, b"secret\0").payload == b"two"  # ...not the others
        assert tools.call(XS_READ, b"/local/domain/1/big\0").payload == value
        flood.sock.settimeout(10)
        replies = [flood._next() for _ in range(sent - 1)]  # reading lets it go on; every request answered
        assert [r.req_id for r in replies] == list(range(1, sent)) and {r.payload for r in replies} == {value}
        assert flood.call(XS_GET_DOMAIN_PATH, b"1\0").payload == b"/local/domain/1\0"
        assert guest._next().payload == b"/local/domain/1\0"
    finally:
        for c in (guest, flood, other, tools):
            c.close()


def test_a_guest_that_reads_no_watch_events_is_dropped(shared: SharedLoop) -> None:
    """Watch events are not requests: a guest that leaves more than twice Quotas.output_backlog of
    them unread loses that connection; its domain, dom0 and other domains carry on."""
    shared.server.listen_domain(shared.path("d1"), 1)
    shared.server.listen_domain(shared.path("d2"), 2)
    shared.thread.start()
    deaf, guest, other = (WireClient.connect(shared.path(d)) for d in ("d1", "d1", "d2"))
    try:
        assert deaf.call(XS_WATCH, join(["/local/domain/1", "t"])).payload == b"OK\0"
        assert other.call(XS_WATCH, join(["/local/domain/2", "t"])).payload == b"OK\0"
        long = "x" * 3000
        with shared.lock:  # the toolstack, in-process: ~1.5 MiB of events at once
            dom0 = shared.store.connect(0)
            for i in range(500):
                dom0.write(f"/local/domain/1/{long}{i}", b"")
            dom0.write("/local/domain/2/note", b"")
            dom0.close()
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:  # what was sent before the drop, then the end
                deaf._next()
        assert guest.call(XS_GET_DOMAIN_PATH, b"1\0").payload == b"/local/domain/1\0"
        assert other.wait_event() == ["/local/domain/2", "t"]
        assert other.wait_event() == ["/local/domain/2/note", "t"]
        with shared.lock:
            assert shared.server._backlog.get(1, 0) <= shared.store.quotas.output_backlog
    finally:
        for c in (deaf, guest, other):
            c.close()


def test_in_process_changes_reach_socket_watchers(shared: SharedLoop) -> None:
    """A toolstack hosting the xenstore changes it directly, not over a socket: watches still fire."""
    path = shared.path("d1")
    shared.server.listen_domain(path, 1)
    shared.thread.start()
    guest = WireClient.connect(path)
    try:
        assert guest.call(XS_WATCH, join(["control", "t"])).payload == b"OK\0"
        assert guest.wait_event() == ["control", "t"]
        with shared.lock:
            toolstack = shared.store.connect()
            toolstack.write("/local/domain/1/control/shutdown", b"poweroff")
            toolstack.close()
        assert guest.wait_event() == ["control/shutdown", "t"]
        assert guest.call(XS_READ, b"control/shutdown\0").payload == b"poweroff"
    finally:
        guest.close()


def test_shared_loop_serves_other_fds_too(shared: SharedLoop) -> None:
    """The xenstore is one user of the loop: another reader on it keeps working, and stays after close."""
    ours, theirs = socket.socketpair()
    got: list[bytes] = []
    with shared.lock:
        shared.loop.add_reader(theirs.fileno(), lambda: got.append(theirs.recv(16)))
    shared.server.listen(shared.path("tools"))
    shared.thread.start()
    tools = WireClient.connect(shared.path("tools"))
    try:
        ours.send(b"ping")
        assert tools.call(XS_WRITE, b"/a\0b").payload == b"OK\0"
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert got == [b"ping"]
    finally:
        tools.close()
        with shared.lock:
            shared.loop.remove_reader(theirs.fileno())
        ours.close()
        theirs.close()


@needs_utils
def test_xenstore_utils_as_a_guest(shared: SharedLoop) -> None:
    """Debian's tools on a domain socket act as that domain (what a guest's vsock bridge gives it)."""
    path = shared.path("d1")
    shared.server.listen_domain(path, 1)
    shared.thread.start()
    env = {**os.environ, "XENSTORED_PATH": path}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)

    assert run("xenstore-write", "data/x", "hello").returncode == 0
    assert run("xenstore-read", "data/x").stdout == "hello\n"
    assert run("xenstore-read", "/local/domain/1/data/x").stdout == "hello\n"
    assert run("xenstore-read", "/local/domain/2/secret").returncode == 1  # it prints no errno...
    denied = run("xenstore-ls", "/local/domain/2")  # ...xenstore-ls does
    assert denied.returncode == 1 and "Permission denied" in denied.stderr, denied
    assert run("xenstore-write", "/local/domain/2/x", "y").returncode == 1
    assert run("xenstore-ls", "/local/domain/2").returncode == 1


@needs_utils
def test_command_line_serves_domains(tmp_path: Path) -> None:
    directory = tempfile.mkdtemp(prefix="xs-", dir="/tmp")
    sock, guest_sock = os.path.join(directory, "socket"), os.path.join(directory, "d4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimvisor.xenstore.server", "--socket", sock, "--db", str(tmp_path / "xs.db"),
         "--domain", f"4:{guest_sock}"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        guest = WireClient.connect(guest_sock)
        assert guest.call(XS_GET_DOMAIN_PATH, b"4\0").payload == b"/local/domain/4\0"
        assert guest.call(XS_WRITE, b"/x\0y").payload == b"EACCES\0"
        guest.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(guest_sock)
        shutil.rmtree(directory)
    bad = subprocess.run(
        [sys.executable, "-m", "slimvisor.xenstore.server", "--socket", sock, "--db", "x", "--domain", "0:/tmp/p"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "guest domain id" in bad.stderr
