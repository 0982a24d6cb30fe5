"""The pool's records in etcd: membership under leases, pool-wide unique names, VNIs (issue 18).

A pool of hosts keeps what must be agreed on pool-wide in etcd (Debian's etcd-server), spoken to
through its v3 JSON gateway with etcd3gw. Every check-then-write is one etcd transaction, so two
hosts racing for a domain name, a uuid, a VNI or a failed host's domain cannot both win. Each
member's record lives under a lease it keeps alive: when the host stops refreshing it (crash,
partition), etcd deletes the record after the TTL, and that deletion is what the others act on.

Keys (all values JSON, all under `PREFIX`; docs/pool.md):
  meta, secret, hosts/<host> (under the host's lease), domains/<name>, uuids/<uuid>,
  switches/<name>, vnis/<N>

Bounds: a record is at most `MAX_RECORD` bytes of JSON, written or read (a bigger one read back is
skipped); a prefix read returns at most `MAX_HOSTS` hosts or `MAX_DOMAINS` domains (more is an
error, never a silent truncation); every request has the store's timeout and a call tries each
endpoint once, so a call fails within about timeout x len(endpoints). Records other hosts wrote
are checked before use: a malformed one is logged and skipped.

Failure model: a request that timed out may still have been applied; a call that retries on
another endpoint therefore accepts a conflict with exactly the record it was writing as success
(its own earlier attempt), never one written by anyone else.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from slimvisor.model.spec import NAME
from slimvisor.runtime.errors import SlimvisorError

log = logging.getLogger(__name__)

PREFIX = "/slimvisor/pool/"
API_PATH = "/v3/"  # etcd >= 3.4's gateway (Debian 12 ships 3.4); set so no /version probe precedes each client
POOL_VERSION = 1  # meta's "version": the layout of these records
MAX_RECORD = 16 * 1024  # bytes of JSON in one value: a domain record is well under 1 KiB
MAX_HOSTS = 256  # hosts a prefix read returns before it is an error
MAX_DOMAINS = 4096  # domains (and switches) likewise; with MAX_RECORD a read stays under 64 MiB
MAX_TTL = 3600  # seconds: a longer lease would leave a dead host "alive" for too long
TRANSIENT_ROUNDS = 8  # rounds over the endpoints while etcd answers "try again" (leader changed, no leader)
TRANSIENT_PAUSE_S = 0.4  # between such rounds: an election takes one or two election timeouts (1 s each)
TRANSIENT = "~"  # marks such a failure in the list (not shown)
ATTEMPTS = 16  # compare-and-swap rounds a call retries when others keep changing the record
WATCH_IDLE_S = 30.0  # a watch stream silent this long is reopened (a partitioned member sends nothing)
WATCH_PAUSE_S = 0.5  # between attempts to reopen a watch when no endpoint answers
MAX_WATCH_MESSAGE = 1 << 20  # bytes of one watch message before the stream is dropped and reopened
VNI_MIN = 1  # RFC 7348 section 5: the VXLAN Network Identifier is 24 bits
VNI_MAX = 2**24 - 1
ENGINES = ("pv", "pvh", "hvm")  # domain types a host can run
LEASE_NOT_FOUND = "etcdserver: requested lease not found"  # etcd's ErrGRPCLeaseNotFound
SECRET_HEX = re.compile(r"[0-9a-f]{64}")
RECORD_KEYS = ("name", "uuid", "host")  # what every domain record has, at least

_T = TypeVar("_T")


class PoolError(SlimvisorError):
    """A pool operation failed; the subclasses say why."""


class PoolUnavailable(PoolError):
    """etcd did not answer: unreachable, or no quorum / no leader."""


class LeaseLost(PoolUnavailable):
    """This host's lease expired (etcd deleted its record): it must register again."""


class PoolConflict(PoolError):
    """A name, uuid, host or pool is already taken."""


class BadRecord(PoolError, ValueError):
    """A record (given to the store, or read back from etcd) that does not check out; says which field."""


@dataclass
class HostInfo:
    """One member as it registers itself: where its daemon listens and what it can run."""

    name: str
    address: str
    port: int
    cpus: int
    memory_mib: int
    free_memory_mib: int
    engines: list[str]  # domain types it can run: "pv", "pvh", "hvm"
    leaving: bool = False

    def check(self) -> None:
        """Raise BadRecord naming the first field that is not what a member may claim."""
        _check_name(self.name, "host")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise BadRecord(f"host {self.name}: address {self.address!r} is not an IP address") from None
        for field, low, high in (("port", 1, 65535), ("cpus", 1, 1 << 16),
                                 ("memory_mib", 0, 1 << 40), ("free_memory_mib", 0, 1 << 40)):  # fmt: skip
            value = getattr(self, field)
            if type(value) is not int or not low <= value <= high:
                raise BadRecord(f"host {self.name}: {field} {value!r} is not an integer in {low}..{high}")
        if not isinstance(self.engines, list) or not all(e in ENGINES for e in self.engines):
            raise BadRecord(f"host {self.name}: engines {self.engines!r} are not among {', '.join(ENGINES)}")
        if type(self.leaving) is not bool:
            raise BadRecord(f"host {self.name}: leaving {self.leaving!r} is not a boolean")

    @classmethod
    def parse(cls, data: Any) -> HostInfo:
        """A record another host wrote, decoded from JSON: BadRecord (or TypeError) unless every field checks out."""
        if not isinstance(data, dict):
            raise BadRecord("not a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        host = cls(**{k: v for k, v in data.items() if k in fields})  # a field missing: TypeError
        host.check()
        return host


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRecord(f"{what} name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return name


def _check_uuid(value: object) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return str(uuidlib.UUID(value))  # the canonical lower-case form, so one uuid has one key
    except ValueError:
        raise BadRecord(f"uuid {value!r} is not a UUID") from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with `prefix` (its last byte plus one)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def _encode_record(rec: dict[str, Any], what: str) -> str:
    text = json.dumps(rec, sort_keys=True)
    if len(text.encode()) > MAX_RECORD:
        raise PoolError(f"{what}: the record is {len(text.encode())} bytes, over the bound of {MAX_RECORD}")
    return text


def _absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


def _unchanged(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)}


def _put(key: str, value: str, lease: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease is not None:
        request["lease"] = str(lease)
    return {"request_put": request}


def _range(key: str) -> dict[str, Any]:
    return {"request_range": {"key": _b64(key)}}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


@dataclass(frozen=True)
class _KV:
    """One key as etcd returned it, decoded; the value is still untrusted bytes."""

    key: str
    value: bytes
    mod_revision: int
    lease: int

    @classmethod
    def parse(cls, kv: dict[str, Any]) -> _KV:
        return cls(
            key=base64.b64decode(kv["key"]).decode(errors="replace"),
            value=base64.b64decode(kv.get("value", "")),
            mod_revision=int(kv.get("mod_revision", 0)),
            lease=int(kv.get("lease", 0)),
        )

    def json(self) -> Any:
        if len(self.value) > MAX_RECORD:
            raise ValueError(f"{len(self.value)} bytes, over the bound of {MAX_RECORD}")
        return json.loads(self.value)


def _txn_ranges(response: dict[str, Any]) -> list[_KV | None]:
    """The key each request_range of a transaction's taken branch found, None where none."""
    found: list[_KV | None] = []
    for reply in response.get("responses", []):
        kvs = reply.get("response_range", {}).get("kvs", []) if "response_range" in reply else None
        if kvs is not None:
            found.append(_KV.parse(kvs[0]) if kvs else None)
    return found


def parse_endpoint(url: str) -> tuple[str, int]:
    """An etcd client URL, http://ADDRESS[:PORT] (2379 by default): the one check of it, for the
    store and for `pool init/join --etcd` alike. PoolError naming the URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise PoolError(f"{url!r} is not an etcd client URL: expected http://ADDRESS:PORT")
    try:
        return parts.hostname, parts.port or 2379
    except ValueError as e:
        raise PoolError(f"{url!r}: {e}") from None


class PoolStore:
    """One host's view of the pool in etcd; its methods are safe to call from several threads."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0) -> None:
        if not endpoints:
            raise PoolError("no etcd endpoints given")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._clients = [self._client(url) for url in self.endpoints]
        self._current = 0  # the endpoint that answered last: calls start there
        self._lock = threading.Lock()
        self._lease: int | None = None
        self._host: str | None = None

    def _client(self, url: str) -> Etcd3Client:
        try:
            host, port = parse_endpoint(url)
        except PoolError as e:
            raise PoolError(f"etcd endpoint {e}") from None
        return Etcd3Client(host, port, "http", timeout=self.timeout, api_path=API_PATH)

    # -- talking to etcd ---------------------------------------------------------------------------
    def _call(self, request: Callable[[Etcd3Client], _T], attempts: list[int] | None = None) -> _T:
        """`request` on the endpoint that answered last, else on each other in turn.

        `attempts`, when given, gets one entry per endpoint tried: more than one means an earlier
        try may have been applied before it failed (see the module's failure model)."""
        start = self._current
        failures: list[str] = []
        for step in range(len(self._clients) * TRANSIENT_ROUNDS):
            i = (start + step) % len(self._clients)
            if step and i == start:  # every endpoint failed: again only if one said "try again"
                if not failures[-1].startswith(TRANSIENT):
                    break
                time.sleep(TRANSIENT_PAUSE_S)
            if attempts is not None:
                attempts.append(i)
            try:
                result = request(self._clients[i])
            except etcd_errors.InternalServerError as e:  # a leader election under way: etcd's own clients retry
                failures.append(f"{TRANSIENT}{self.endpoints[i]}: {_why(e, self.timeout)}")
                continue
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError) as e:
                failures.append(f"{self.endpoints[i]}: {_why(e, self.timeout)}")
                continue
            except etcd_errors.Etcd3Exception as e:
                why = _why(e, self.timeout)
                if why == LEASE_NOT_FOUND:
                    raise LeaseLost(f"etcd at {self.endpoints[i]}: {why} (expired)") from None
                raise PoolError(f"etcd at {self.endpoints[i]} refused the request: {why}") from None
            self._current = i
            return result
        shown = dict.fromkeys(f.removeprefix(TRANSIENT) for f in failures)
        raise PoolUnavailable(f"etcd unavailable (no answer, or no quorum): {'; '.join(shown)}")

    def _post(self, path: str, body: dict[str, Any], attempts: list[int] | None = None) -> dict[str, Any]:
        def request(client: Etcd3Client) -> dict[str, Any]:
            reply = client.post(client.get_url(path), json=body)
            if not isinstance(reply, dict):
                raise etcd_errors.InternalServerError(f"etcd answered {path} with {reply!r}")
            return reply

        return self._call(request, attempts)

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
             failure: list[dict[str, Any]] | None = None,
             attempts: list[int] | None = None) -> tuple[bool, dict[str, Any]]:  # fmt: skip
        reply = self._post("/kv/txn", {"compare": compare, "success": success, "failure": failure or []}, attempts)
        return bool(reply.get("succeeded", False)), reply

    def _get(self, key: str) -> _KV | None:
        reply = self._post("/kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs", [])
        return _KV.parse(kvs[0]) if kvs else None

    def _get_prefix(self, prefix: str, limit: int, what: str) -> tuple[list[_KV], int]:
        """Every key under `prefix` (at most `limit`, else PoolError) and the store's revision."""
        key = PREFIX + prefix
        reply = self._post("/kv/range", {"key": _b64(key), "range_end": _prefix_end(key), "limit": str(limit)})
        if reply.get("more"):
            raise PoolError(f"more than {limit} {what} in the pool under {key}: over the bound")
        revision = int(reply.get("header", {}).get("revision", 0))
        return [_KV.parse(kv) for kv in reply.get("kvs", [])], revision

    # -- the pool itself ---------------------------------------------------------------------------
    def create_pool(self, name: str) -> str:
        """Create the pool's meta record and peer secret, both or neither; return the secret."""
        _check_name(name, "pool")
        secret = secrets.token_hex(32)
        meta = json.dumps({"name": name, "version": POOL_VERSION, "created": int(time.time())}, sort_keys=True)
        secret_rec = json.dumps({"secret": secret})
        attempts: list[int] = []
        ok, reply = self._txn(
            [_absent(PREFIX + "meta"), _absent(PREFIX + "secret")],
            [_put(PREFIX + "meta", meta), _put(PREFIX + "secret", secret_rec)],
            [_range(PREFIX + "meta"), _range(PREFIX + "secret")],
            attempts,
        )
        if ok:
            return secret
        existing_meta, existing_secret = _txn_ranges(reply)
        if len(attempts) > 1 and existing_secret is not None and existing_secret.value == secret_rec.encode():
            return secret  # our own attempt that timed out was applied
        other = _safe_json(existing_meta)
        pool = other.get("name") if isinstance(other, dict) else None
        raise PoolConflict(f"a pool ({pool or 'unnamed'}) already exists in etcd at {', '.join(self.endpoints)}")

    def meta(self) -> dict[str, Any] | None:
        """The pool's meta record; None when there is no pool in this etcd."""
        kv = self._get(PREFIX + "meta")
        if kv is None:
            return None
        data = _safe_json(kv)
        if not isinstance(data, dict):
            raise PoolError(f"the pool's meta record in etcd is not a JSON object: {kv.value[:80]!r}")
        return data

    def secret(self) -> str:
        """The pool's peer-link key (64 hex digits)."""
        kv = self._get(PREFIX + "secret")
        if kv is None:
            raise PoolError(f"no pool in etcd at {', '.join(self.endpoints)} (no secret record)")
        data = _safe_json(kv)
        value = data.get("secret") if isinstance(data, dict) else None
        if not isinstance(value, str) or not SECRET_HEX.fullmatch(value):
            raise PoolError("the pool's secret record in etcd is not 64 hex digits")
        return value

    # -- membership --------------------------------------------------------------------------------
    def register(self, host: HostInfo, ttl: int) -> None:
        """Join: put hosts/<name> under a fresh lease of `ttl` seconds, unless the name is taken.

        Also how a host comes back after LeaseLost; the store keeps one registration (the last)."""
        host.check()
        if not 1 <= ttl <= MAX_TTL:
            raise PoolError(f"lease ttl {ttl}: expected 1..{MAX_TTL} seconds")
        key = PREFIX + "hosts/" + host.name
        value = _encode_record(dataclasses.asdict(host), f"host {host.name}")
        granted = self._post("/lease/grant", {"TTL": str(ttl), "ID": "0"})
        if "ID" not in granted:
            raise PoolError(f"etcd granted no lease: {granted.get('error', granted)}")
        lease = int(granted["ID"])
        attempts: list[int] = []
        try:
            ok, reply = self._txn([_absent(key)], [_put(key, value, lease)], [_range(key)], attempts)
        except PoolError:
            self._revoke_quietly(lease)
            raise
        if not ok:
            (existing,) = _txn_ranges(reply)
            if not (len(attempts) > 1 and existing is not None and existing.lease == lease):
                self._revoke_quietly(lease)
                raise PoolConflict(f"host {host.name} is already a member of the pool (its record is in etcd)")
        with self._lock:
            self._lease, self._host = lease, host.name

    def _revoke_quietly(self, lease: int) -> None:
        try:
            self._post("/kv/lease/revoke", {"ID": str(lease)})
        except PoolError as e:
            log.warning("could not revoke etcd lease %x (it expires by itself): %s", lease, e)

    def _registered(self) -> tuple[int, str]:
        with self._lock:
            if self._lease is None or self._host is None:
                raise PoolError("this host is not registered in the pool")
            return self._lease, self._host

    def keepalive(self) -> None:
        """Refresh the lease; LeaseLost when etcd already expired it (register again)."""
        lease, host = self._registered()
        reply = self._post("/lease/keepalive", {"ID": str(lease)})
        if int(reply.get("result", {}).get("TTL", 0)) <= 0:
            raise LeaseLost(f"the lease of host {host} expired: etcd removed its record, register again")

    def update_host(self, host: HostInfo) -> None:
        """Replace this host's record (capacity, leaving), still under its lease."""
        lease, name = self._registered()
        if host.name != name:
            raise PoolError(f"host {host.name}: this store registered {name}")
        host.check()
        key = PREFIX + "hosts/" + name
        value = _encode_record(dataclasses.asdict(host), f"host {name}")
        held = {"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": str(lease)}
        ok, _ = self._txn([held], [_put(key, value, lease)])
        if not ok:
            raise LeaseLost(f"the lease of host {name} expired: etcd removed its record, register again")

    def hosts(self) -> list[HostInfo]:
        """Every member with a live lease whose record checks out (a malformed one is logged, skipped)."""
        kvs, _ = self._get_prefix("hosts/", MAX_HOSTS, "hosts")
        return [host for host in (_host_record(kv) for kv in kvs) if host is not None]

    def leave(self) -> None:
        """Revoke the lease: etcd deletes this host's record at once (done already if it expired)."""
        lease, _ = self._registered()
        with contextlib.suppress(LeaseLost):
            self._post("/kv/lease/revoke", {"ID": str(lease)})
        with self._lock:
            self._lease = self._host = None

    def watch_hosts(self, callback: Callable[[str, str], None]) -> Callable[[], None]:
        """Call `callback("put"|"delete", host)` from a thread for each change after this call.

        Returns cancel (which waits for the thread). PoolUnavailable if etcd cannot be read now.
        The stream survives members dying: on any break it reopens on another endpoint and first
        reports what changed meanwhile; a stream silent for WATCH_IDLE_S is reopened the same way
        (a partitioned member sends nothing), so a missed change shows within that time."""
        watch = _HostWatch(self, callback)
        watch.start()
        return watch.cancel

    # -- domains -----------------------------------------------------------------------------------
    def claim_domain(self, rec: dict[str, Any]) -> None:
        """Take the domain's name and uuid pool-wide in one transaction, or PoolConflict naming which."""
        name, uuid, _ = _check_record(rec)
        rec = {**rec, "uuid": uuid}
        value = _encode_record(rec, f"domain {name}")
        dkey, ukey = PREFIX + "domains/" + name, PREFIX + "uuids/" + uuid
        attempts: list[int] = []
        ok, reply = self._txn(
            [_absent(dkey), _absent(ukey)],
            [_put(dkey, value), _put(ukey, json.dumps({"name": name}))],
            [_range(dkey), _range(ukey)],
            attempts,
        )
        if ok:
            return
        by_name, by_uuid = _txn_ranges(reply)
        if len(attempts) > 1 and by_name is not None and by_name.value == value.encode():
            return  # our own attempt that timed out was applied
        if by_name is not None:
            other = _safe_json(by_name)
            where = other.get("host") if isinstance(other, dict) else None
            raise PoolConflict(f"domain {name} already exists in the pool (on host {where or 'unknown'})")
        owner = _safe_json(by_uuid)
        other_name = owner.get("name") if isinstance(owner, dict) else None
        other_rec = self._domain(other_name) if isinstance(other_name, str) and NAME.fullmatch(other_name) else None
        where = other_rec[0].get("host") if other_rec else None
        raise PoolConflict(
            f"uuid {uuid} is already used by domain {other_name or 'unknown'} (on host {where or 'unknown'})"
        )

    def _domain(self, name: str) -> tuple[dict[str, Any], int] | None:
        kv = self._get(PREFIX + "domains/" + name)
        if kv is None:
            return None
        return _domain_record(kv)

    def put_domain(self, rec: dict[str, Any]) -> None:
        """Update a claimed domain's record (state, host, image); its uuid may not change."""
        name, uuid, _ = _check_record(rec)
        rec = {**rec, "uuid": uuid}
        value = _encode_record(rec, f"domain {name}")
        key = PREFIX + "domains/" + name
        for _ in range(ATTEMPTS):
            current = self._domain(name)
            if current is None:
                raise PoolError(f"domain {name} is not in the pool (claim it first)")
            old, revision = current
            if old.get("uuid") != uuid:
                raise PoolConflict(f"domain {name} has uuid {old.get('uuid')} in the pool, not {uuid}")
            ok, _ = self._txn([_unchanged(key, revision)], [_put(key, value)])
            if ok:
                return
        raise PoolError(f"domain {name}: its record kept changing, gave up after {ATTEMPTS} tries")

    def release_domain(self, name: str, host: str | None = None) -> None:
        """Drop the domain's name and uuid; with `host`, only while the record still says that host."""
        for _ in range(ATTEMPTS):
            current = self._domain(name)
            if current is None:
                return
            rec, revision = current
            if host is not None and rec.get("host") != host:
                log.info("domain %s is now on host %s: host %s does not release it", name, rec.get("host"), host)
                return
            key = PREFIX + "domains/" + name
            ukey = PREFIX + "uuids/" + _check_uuid(rec["uuid"])
            ok, _ = self._txn([_unchanged(key, revision)], [_delete(key), _delete(ukey)])
            if ok:
                return
        raise PoolError(f"domain {name}: its record kept changing, gave up after {ATTEMPTS} tries")

    def domains(self) -> list[tuple[dict[str, Any], int]]:
        """Every domain record that checks out, with its mod_revision (for take_over)."""
        kvs, _ = self._get_prefix("domains/", MAX_DOMAINS, "domains")
        return [rec for rec in (_domain_record(kv) for kv in kvs) if rec is not None]

    def take_over(self, name: str, revision: int, host: str) -> bool:
        """Move the record to `host` if nobody changed it since `revision`; True for exactly one racer."""
        _check_name(host, "host")
        current = self._domain(name)
        if current is None or current[1] != revision:
            return False
        rec = {**current[0], "host": host}
        key = PREFIX + "domains/" + name
        attempts: list[int] = []
        ok, _ = self._txn([_unchanged(key, revision)], [_put(key, _encode_record(rec, f"domain {name}"))],
                          attempts=attempts)  # fmt: skip
        if ok:
            return True
        if len(attempts) > 1:  # did our own timed-out attempt win?
            now = self._domain(name)
            return now is not None and now[0] == rec
        return False

    # -- networks ----------------------------------------------------------------------------------
    def switch_vni(self, switch: str) -> int:
        """The switch's pool-wide VNI: allocated once (switch and VNI keys created together)."""
        _check_name(switch, "switch")
        skey = PREFIX + "switches/" + switch
        # Start where the name hashes to, so racing switches rarely probe the same VNIs.
        vni = VNI_MIN + zlib.crc32(switch.encode()) % (VNI_MAX - VNI_MIN + 1)
        for _ in range(ATTEMPTS * 4):
            vkey = PREFIX + f"vnis/{vni}"
            ok, reply = self._txn(
                [_absent(skey), _absent(vkey)],
                [_put(skey, json.dumps({"vni": vni})), _put(vkey, json.dumps({"switch": switch}))],
                [_range(skey), _range(vkey)],
            )
            if ok:
                return vni
            by_switch, by_vni = _txn_ranges(reply)
            if by_switch is not None:
                data = _safe_json(by_switch)
                found = data.get("vni") if isinstance(data, dict) else None
                if type(found) is int and VNI_MIN <= found <= VNI_MAX:
                    return found
                raise PoolError(f"switch {switch}: its record in etcd has no valid VNI: {by_switch.value[:80]!r}")
            if by_vni is not None:
                vni = VNI_MIN if vni == VNI_MAX else vni + 1
        raise PoolError(f"switch {switch}: no free VNI found after {ATTEMPTS * 4} tries")


# -- reading what other hosts wrote ----------------------------------------------------------------
def _safe_json(kv: _KV | None) -> Any:
    if kv is None:
        return None
    try:
        return kv.json()
    except ValueError as e:
        log.warning("etcd key %s: unreadable record (%s)", kv.key, e)
        return None


def _host_record(kv: _KV) -> HostInfo | None:
    try:
        host = HostInfo.parse(kv.json())
        if PREFIX + "hosts/" + host.name != kv.key:
            raise ValueError(f"the record names host {host.name}")
        return host
    except (ValueError, TypeError) as e:
        log.warning("etcd key %s: skipping a malformed host record (%s)", kv.key, e)
        return None


def _check_record(rec: dict[str, Any]) -> tuple[str, str, str]:
    """A domain record's name, canonical uuid and host; BadRecord naming what is wrong."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a domain record must be a dict, not {type(rec).__name__}")
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise BadRecord(f"domain record lacks {', '.join(missing)}")
    return _check_name(rec["name"], "domain"), _check_uuid(rec["uuid"]), _check_name(rec["host"], "host")


def _domain_record(kv: _KV) -> tuple[dict[str, Any], int] | None:
    try:
        rec = kv.json()
        name, _, _ = _check_record(rec)
        if PREFIX + "domains/" + name != kv.key:
            raise ValueError(f"the record names domain {name}")
        return rec, kv.mod_revision
    except ValueError as e:
        log.warning("etcd key %s: skipping a malformed domain record (%s)", kv.key, e)
        return None


def _why(error: etcd_errors.Etcd3Exception, timeout: float) -> str:
    """One short line from etcd3gw's error: the gateway's message, the socket's errno text, or a timeout."""
    text = error.detail_text or " ".join(str(a) for a in error.args)
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(text)
        return str(body.get("error") or body.get("message"))[:200]
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno_text:
        return errno_text.group(1).lower()
    if isinstance(error, etcd_errors.ConnectionTimeoutError):
        return f"no answer within {timeout:g} s"
    return (text.splitlines()[0][:200] if text.strip() else "") or type(error).__name__


# -- watching the members --------------------------------------------------------------------------
class _HostWatch:
    """A thread following hosts/ through etcd's watch stream, reopening it on any failure."""

    def __init__(self, store: PoolStore, callback: Callable[[str, str], None]) -> None:
        self.store = store
        self.callback = callback
        kvs, self.revision = store._get_prefix("hosts/", MAX_HOSTS, "hosts")
        self.known = _host_names(kvs)
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None  # the open stream's, shut down to wake the thread on cancel
        self.thread = threading.Thread(target=self._run, name="poolstore-watch-hosts", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self.stopping.set()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=self.store.timeout + 5)

    def _emit(self, kind: str, name: str | None) -> None:
        if name is None:
            return
        if kind == "put":
            self.known.add(name)
        else:
            self.known.discard(name)
        try:
            self.callback(kind, name)
        except Exception:
            log.exception("watch_hosts callback failed on %s %s", kind, name)

    def _resync(self) -> None:
        """After a break: report hosts that came or went meanwhile, then watch from now."""
        kvs, revision = self.store._get_prefix("hosts/", MAX_HOSTS, "hosts")
        now = _host_names(kvs)
        for name in sorted(self.known - now):
            self._emit("delete", name)
        for name in sorted(now - self.known):
            self._emit("put", name)
        self.revision = revision

    def _run(self) -> None:
        broken = False
        while not self.stopping.is_set():
            try:
                if broken:
                    self._resync()
                self._follow()
            except (PoolError, requests.RequestException, ValueError, KeyError, OSError) as e:
                if not self.stopping.is_set():
                    log.info("watch on pool hosts broke (%s); reopening", e)
            broken = True
            self.stopping.wait(WATCH_PAUSE_S)

    def _follow(self) -> None:
        """Stream events from `revision + 1` on the endpoint that answers, until it breaks."""
        key = PREFIX + "hosts/"
        body = {"create_request": {"key": _b64(key), "range_end": _prefix_end(key),
                                   "start_revision": str(self.revision + 1)}}  # fmt: skip

        def open_stream(client: Etcd3Client) -> requests.Response:
            try:
                return client.session.post(client.get_url("/watch"), json=body, stream=True,
                                           timeout=(self.store.timeout, WATCH_IDLE_S))  # fmt: skip
            except requests.RequestException as e:
                raise etcd_errors.ConnectionFailedError(str(e)) from None

        response = self.store._call(open_stream)
        with response:
            connection = getattr(response.raw, "connection", None)  # urllib3's, while the stream is open
            self.sock = getattr(connection, "sock", None)
            if self.stopping.is_set():
                return
            for message in _messages(response):
                result = message.get("result")
                if not isinstance(result, dict):
                    raise ValueError(f"watch message without a result: {str(message)[:200]}")
                if result.get("canceled") or result.get("compact_revision"):
                    raise ValueError(f"watch canceled by etcd: {result.get('cancel_reason', 'compacted')}")
                for event in result.get("events", []):
                    kv = _KV.parse(event["kv"])
                    self.revision = max(self.revision, kv.mod_revision)
                    self._emit("delete" if event.get("type") == "DELETE" else "put", _host_name(kv.key))


def _host_name(key: str) -> str | None:
    name = key.removeprefix(PREFIX + "hosts/")
    return name if name != key and NAME.fullmatch(name) else None


def _host_names(kvs: list[_KV]) -> set[str]:
    return {name for name in (_host_name(kv.key) for kv in kvs) if name is not None}


def _messages(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The gateway's newline-separated JSON messages, each bounded by MAX_WATCH_MESSAGE."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_WATCH_MESSAGE:
            raise ValueError(f"a watch message over {MAX_WATCH_MESSAGE} bytes")
        for line in lines:
            if line.strip():
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message
