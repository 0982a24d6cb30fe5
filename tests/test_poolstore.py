"""The pool's records in etcd (issue 18), against real etcd members on 127.0.0.1.

Races run as threads, each with its own PoolStore as separate hosts would; "exactly one wins"
is what etcd's transactions promise and what these tests hold the store to.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socketserver
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import etcd3gw
import pytest

from slimvisor.testing.etcd import EtcdCluster, EtcdMember, free_port, local_members
from slimvisor.toolstack.poolstore import (
    MAX_RECORD,
    PREFIX,
    VNI_MAX,
    VNI_MIN,
    BadRecord,
    HostInfo,
    LeaseLost,
    PoolConflict,
    PoolError,
    PoolStore,
    PoolUnavailable,
)

RACERS = 8


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(local_members(1, "ps"), tmp_path_factory.mktemp("etcd")) as cluster:
        cluster.wait_healthy(30)
        yield cluster


def raw_client(url: str) -> etcd3gw.Etcd3Client:
    host, port = url.removeprefix("http://").split(":")
    return etcd3gw.Etcd3Client(host, int(port), timeout=5, api_path="/v3/")


@pytest.fixture
def store(etcd: EtcdCluster) -> PoolStore:
    """A store on an empty pool prefix (what an earlier test left is deleted)."""
    raw_client(etcd.endpoints[0]).delete_prefix(PREFIX)
    return PoolStore(etcd.endpoints)


def host(name: str = "h1", free: int = 512) -> HostInfo:
    return HostInfo(name, "127.0.0.1", 7700, 2, 1024, free, ["pv", "hvm"])


def domain(name: str = "d1", on: str = "h1", uid: str | None = None) -> dict[str, object]:
    return {"name": name, "uuid": uid or str(uuid.uuid4()), "host": on, "memory_mib": 64, "type": "pv",
            "on_crash": "restart", "state": "running", "image": None}  # fmt: skip


def race(count: int, work: Callable[[int], object]) -> list[object]:
    """Run work(0..count-1) in threads released together; each result, or the exception it raised."""
    start = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return results


class LostReplies(socketserver.ThreadingTCPServer):
    """An etcd endpoint whose replies are lost: each request reaches etcd and is applied, then the
    connection closes unanswered, as when a reply times out. (Requests here are one HTTP request a
    connection with a Content-Length body, which is what requests sends etcd3gw's posts as.)"""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: str) -> None:
        self.target = target.removeprefix("http://").split(":")
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            method, path, _ = self.rfile.readline().decode().split(" ", 2)
            headers = {}
            while (line := self.rfile.readline().decode().strip()) != "":
                name, value = line.split(":", 1)
                headers[name.strip()] = value.strip()
            body = self.rfile.read(int(headers.get("Content-Length", 0)))
            host, port = self.server.target  # type: ignore[attr-defined]
            etcd = http.client.HTTPConnection(host, int(port), timeout=5)
            etcd.request(method, path, body, {"Content-Type": "application/json"})
            etcd.getresponse().read()  # applied; the reply goes nowhere
            etcd.close()


class Events:
    """watch_hosts' callbacks, and a wait for one of them with a deadline."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def __call__(self, kind: str, name: str) -> None:
        with self.changed:
            self.seen.append((kind, name))
            self.changed.notify_all()

    def wait_for(self, event: tuple[str, str], timeout: float) -> float:
        """Seconds until `event` was seen; fails the test after `timeout`."""
        begun = time.monotonic()
        with self.changed:
            assert self.changed.wait_for(lambda: event in self.seen, timeout), f"no {event} in {self.seen}"
        return time.monotonic() - begun


def test_a_pool_is_created_once_with_its_secret(store):
    assert store.meta() is None
    secret = store.create_pool("lab")
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    assert store.secret() == secret
    assert store.meta()["name"] == "lab"
    with pytest.raises(PoolConflict, match=r"a pool \(lab\) already exists in etcd at http://127\.0\.0\.1:\d+"):
        PoolStore(store.endpoints).create_pool("other")
    assert store.secret() == secret


def test_register_update_and_leave(store):
    other = PoolStore(store.endpoints)
    store.register(host("h1"), ttl=10)
    other.register(host("h2"), ttl=10)
    assert sorted(h.name for h in store.hosts()) == ["h1", "h2"]
    with pytest.raises(PoolConflict, match="host h1 is already a member"):
        PoolStore(store.endpoints).register(host("h1"), ttl=10)
    store.update_host(host("h1", free=100))
    assert {h.name: h.free_memory_mib for h in other.hosts()} == {"h1": 100, "h2": 512}
    store.keepalive()
    store.leave()
    assert [h.name for h in other.hosts()] == ["h2"]
    with pytest.raises(PoolError, match="not registered"):
        store.keepalive()
    other.leave()
    assert store.hosts() == []


def test_an_expired_lease_removes_the_host_and_keepalive_says_so(store):
    events = Events()
    cancel = store.watch_hosts(events)
    try:
        store.register(host("h1"), ttl=2)
        events.wait_for(("put", "h1"), 5)
        registered = time.monotonic()
        events.wait_for(("delete", "h1"), 10)  # nobody refreshes the lease: etcd deletes the record
        expired_after = time.monotonic() - registered
    finally:
        cancel()
    print(f"lease ttl 2 s: record gone {expired_after:.2f} s after registering")
    assert 1.5 < expired_after < 5
    assert store.hosts() == []
    with pytest.raises(LeaseLost, match=r"lease of host h1 expired.*register again"):
        store.keepalive()
    with pytest.raises(LeaseLost, match=r"lease of host h1 expired"):
        store.update_host(host("h1", free=1))
    assert store.hosts() == []  # the update did not bring the record back without a lease
    store.leave()  # nothing to revoke: leaving is done already
    store.register(host("h1"), ttl=10)  # the caller registers again, under a fresh lease
    assert [h.name for h in store.hosts()] == ["h1"]


def test_racing_claims_for_one_name_have_one_winner(store):
    stores = [PoolStore(store.endpoints) for _ in range(RACERS)]
    claims = [domain("web", on=f"h{i}") for i in range(RACERS)]
    results = race(RACERS, lambda i: stores[i].claim_domain(claims[i]))
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    for r in results:
        assert r is None or (isinstance(r, PoolConflict) and "domain web already exists" in str(r))
    [(rec, _)] = store.domains()
    assert rec == claims[winners[0]]


def test_a_uuid_is_unique_and_release_respects_the_host(store):
    uid = str(uuid.uuid4())
    store.claim_domain(domain("d1", on="h1", uid=uid))
    with pytest.raises(PoolConflict, match=f"uuid {uid} is already used by domain d1 \\(on host h1\\)"):
        store.claim_domain(domain("d2", on="h2", uid=uid.upper()))  # one uuid, however it is spelt
    with pytest.raises(PoolConflict, match=r"domain d1 already exists in the pool \(on host h1\)"):
        store.claim_domain(domain("d1", on="h2"))
    store.release_domain("d1", host="h2")  # not its host: the record stays
    assert [rec["name"] for rec, _ in store.domains()] == ["d1"]
    store.put_domain({**domain("d1", on="h1", uid=uid), "state": "paused"})
    assert store.domains()[0][0]["state"] == "paused"
    with pytest.raises(PoolConflict, match=f"domain d1 has uuid {uid} in the pool"):
        store.put_domain(domain("d1", on="h1"))
    store.release_domain("d1", host="h1")
    assert store.domains() == []
    store.claim_domain(domain("d2", on="h2", uid=uid))  # name and uuid are both free again
    with pytest.raises(PoolError, match="domain d9 is not in the pool"):
        store.put_domain(domain("d9"))


def test_take_over_has_exactly_one_winner(store):
    store.claim_domain(domain("db", on="h1"))
    [(_, revision)] = store.domains()
    results = race(2, lambda i: PoolStore(store.endpoints).take_over("db", revision, f"h{i + 2}"))
    assert sorted(results) == [False, True], results
    [(rec, now)] = store.domains()
    assert rec["host"] == f"h{results.index(True) + 2}"
    assert now > revision
    assert store.take_over("db", revision, "h9") is False  # a stale revision never wins


def test_switch_vnis_are_stable_distinct_and_race_free(store, etcd):
    first = store.switch_vni("lan")
    assert VNI_MIN <= first <= VNI_MAX
    assert PoolStore(store.endpoints).switch_vni("lan") == first
    same = race(RACERS, lambda i: PoolStore(store.endpoints).switch_vni("dmz"))
    assert len(set(same)) == 1 and isinstance(same[0], int), same
    many = race(RACERS, lambda i: PoolStore(store.endpoints).switch_vni(f"net{i}"))
    assert all(isinstance(v, int) and VNI_MIN <= v <= VNI_MAX for v in many), many
    assert len(set(many) | {first, same[0]}) == RACERS + 2
    # The VNI a name hashes to is taken by another switch: it gets the next free one.
    raw_client(etcd.endpoints[0]).delete(PREFIX + "switches/lan")
    assert store.switch_vni("lan") == (first % VNI_MAX) + 1


def test_malformed_records_are_skipped(store, etcd, caplog):
    raw = raw_client(etcd.endpoints[0])
    store.register(host("good"), ttl=10)
    raw.put(PREFIX + "hosts/garbage", "{not json")
    raw.put(PREFIX + "hosts/badport", json.dumps({**host("badport").__dict__, "port": 99999}))
    raw.put(PREFIX + "hosts/liar", json.dumps(host("someone-else").__dict__))
    raw.put(PREFIX + "hosts/huge", json.dumps({**host("huge").__dict__, "pad": "x" * MAX_RECORD}))
    raw.put(PREFIX + "domains/odd", json.dumps({"name": "odd", "uuid": "not-a-uuid", "host": "h1"}))
    with caplog.at_level(logging.WARNING, logger="slimvisor.toolstack.poolstore"):
        assert [h.name for h in store.hosts()] == ["good"]
        assert store.domains() == []
    skipped = " ".join(r.getMessage() for r in caplog.records)
    for key in ("garbage", "badport", "liar", "huge"):
        assert f"hosts/{key}: skipping a malformed host record" in skipped
    assert "port 99999 is not an integer in 1..65535" in skipped
    assert "domains/odd: skipping a malformed domain record" in skipped


def test_bad_input_is_refused_before_etcd(store):
    with pytest.raises(BadRecord, match="domain name 'a/b'"):
        store.claim_domain(domain("a/b"))
    with pytest.raises(BadRecord, match="uuid 'nope' is not a UUID"):
        store.claim_domain(domain("d1", uid="nope"))
    with pytest.raises(PoolError, match=f"over the bound of {MAX_RECORD}"):
        store.claim_domain({**domain("d1"), "image": "x" * MAX_RECORD})
    with pytest.raises(BadRecord, match="engines"):
        store.register(HostInfo("h1", "127.0.0.1", 7700, 2, 1024, 512, ["xen"]), ttl=10)
    with pytest.raises(PoolError, match="lease ttl 0"):
        store.register(host("h1"), ttl=0)
    assert store.domains() == [] and store.hosts() == []
    with pytest.raises(PoolError, match="expected http://ADDRESS:PORT"):
        PoolStore(["https://127.0.0.1:2379"])


def test_three_members_survive_one_loss_and_fail_fast_on_quorum_loss(tmp_path: Path):
    with EtcdCluster(local_members(3, "q"), tmp_path) as cluster:
        cluster.wait_healthy(30)
        leader = cluster.leader()
        assert leader is not None
        # The leader's endpoint first: the store and its watch start there, and it dies first.
        order = [leader] + [i for i in range(3) if i != leader]
        endpoints = [cluster.endpoints[i] for i in order]
        store = PoolStore(endpoints)  # timeout 2 s: more than an election takes
        store.create_pool("lab")
        store.register(host("h1"), ttl=10)
        events = Events()
        cancel = store.watch_hosts(events)
        try:
            cluster.kill(leader)
            begun = time.monotonic()
            PoolStore(endpoints).register(host("h2"), ttl=10)
            reelected = time.monotonic() - begun
            events.wait_for(("put", "h2"), 10)  # the watch moved to a live member
            store.claim_domain(domain("d1"))
            store.keepalive()
            assert sorted(h.name for h in store.hosts()) == ["h1", "h2"]

            cluster.kill(order[1])  # one of three left: no quorum
            begun = time.monotonic()
            with pytest.raises(PoolUnavailable, match="etcd unavailable") as refused:
                store.claim_domain(domain("d2"))
            took = time.monotonic() - begun
        finally:
            cancel()
        print(
            f"a member killed: next register took {reelected:.2f} s; "
            f"quorum lost: PoolUnavailable after {took:.2f} s (timeout 2 s, 3 endpoints)"
        )
        for url in endpoints[:2]:
            assert f"{url}: connection refused" in str(refused.value)
        assert f"{endpoints[2]}: no answer within 2 s" in str(refused.value)
        assert took < 3 * 2 + 1
        with pytest.raises(PoolUnavailable, match="etcd unavailable") as lost:
            store.keepalive()
        assert not isinstance(lost.value, LeaseLost)  # not known to be expired: the caller keeps trying


def test_a_retry_after_a_lost_reply_accepts_its_own_applied_write(store, etcd):
    """The first endpoint applies each write but its reply is lost; the store retries on the next
    and must take the conflict with exactly its own record as the success it was."""
    with LostReplies(etcd.endpoints[0]) as lossy:

        def fresh() -> PoolStore:  # starts at the lossy endpoint
            return PoolStore([lossy.url, *etcd.endpoints])

        secret = fresh().create_pool("lab")
        assert store.secret() == secret
        rec = domain("d1")
        fresh().claim_domain(rec)
        assert store.domains()[0][0] == rec
        with pytest.raises(PoolConflict, match="domain d1 already exists"):
            fresh().claim_domain(domain("d1"))  # someone else's claim is still a conflict
        [(_, revision)] = store.domains()
        assert fresh().take_over("d1", revision, "h2") is True
        assert store.domains()[0][0]["host"] == "h2"
        fresh().register(host("h1"), ttl=10)  # its lease grant's reply is the one lost (that lease expires unused)
        assert [h.name for h in store.hosts()] == ["h1"]
        assert fresh().switch_vni("lan") == store.switch_vni("lan")


def test_an_etcd_member_in_a_netns_serves_there_and_leaves_nothing(tmp_path: Path):
    netns = f"svetcd{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        # Ports free out here, so nothing of ours answers the endpoint from this netns.
        member = EtcdMember("n0", client_port=free_port(), peer_port=free_port(), netns=netns)
        with EtcdCluster([member], tmp_path) as cluster:
            cluster.wait_healthy(30)
            assert cluster.leader() == 0
            pid = cluster._procs[0].pid
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            with pytest.raises(PoolUnavailable, match="connection refused"):  # not in our netns
                PoolStore(cluster.endpoints, timeout=1).hosts()
        assert not os.path.exists(f"/proc/{pid}")
        assert not (tmp_path / "n0" / "data").exists() and (tmp_path / "n0" / "etcd.log").exists()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)
