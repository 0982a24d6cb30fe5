"""slimvisord as a member of a pool of hosts (docs/pool.md): XAPI's resource pool on etcd and VXLAN.

A member registers itself in etcd under a lease (`poolstore`), renewed by a keeper thread; the
time until which the lease certainly holds is written for the supervisors, which fence (pause)
their restartable domains once it has passed (`runtime.fence`), so a domain another member
restarts is never running twice. Every domain of a member has a pool record, claimed in one etcd
transaction with its uuid before anything starts, so names and uuids are unique pool-wide. `create`
places a domain (`placement`) and forwards it to the member chosen over the authenticated pool
link (`peers`); a switch name is pool-wide, each member's switch of that name joined to the others'
by a VXLAN device (`network.vxlan`). When a member's lease expires, its records with on_crash =
restart are taken over, by compare-and-swap on the record, by the member placement chooses, and
started there from the config the record keeps.

The keeper thread does only etcd I/O; everything that touches the daemon's state runs on its
loop (`_post`). Operations on the loop call etcd directly, each call bounded by the store's timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from slimvisor.model import units
from slimvisor.model.lifecycle import Action
from slimvisor.model.spec import NAME, SpecError
from slimvisor.runtime import fence
from slimvisor.runtime.paths import runtime_base, state_dir
from slimvisor.toolstack import api, domains, placement
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.peers import PEER_PORT, PeerAuthError, PeerListener
from slimvisor.toolstack.peers import connect as peer_connect
from slimvisor.toolstack.poolstore import (
    HostInfo,
    LeaseLost,
    PoolConflict,
    PoolError,
    PoolStore,
    PoolUnavailable,
    parse_endpoint,
)
from slimvisor.toolstack.registry import Domain, Toolstack, call
from slimvisor.toolstack.xlcfg import DomainConfig, check_host

log = logging.getLogger("slimvisord")

DEFAULT_TTL = 10  # seconds a member's lease lives without renewal: how soon HA acts on a lost host
MIN_TTL, MAX_TTL = 2, 300
RESTARTS = frozenset(a.value for a in Action if a.restarts)  # on_crash values that ask for a restart (HA)
PEER_TIMEOUT = 120.0  # one call to another member (a create boots its domain first)


@dataclass
class Membership:
    """What `pool init` or `pool join` said, kept in STATE/pool.json: a restarted daemon rejoins with it."""

    pool: str
    endpoints: list[str]
    host: str
    address: str
    port: int = PEER_PORT
    ttl: int = DEFAULT_TTL

    @staticmethod
    def path() -> Path:
        return state_dir() / "pool.json"

    def save(self) -> None:
        tmp = self.path().with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        tmp.rename(self.path())

    @classmethod
    def load(cls) -> Membership | None:
        try:
            return cls(**json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("%s: unreadable (%s): not rejoining a pool", cls.path(), e)
            return None


def check_endpoints(urls: list[str]) -> list[str]:
    """etcd client URLs as given (`--etcd URL[,URL...]`), checked as the store checks them."""
    if not urls:
        raise SpecError("--etcd: give at least one etcd client URL (http://HOST:2379)")
    for url in urls:
        try:
            parse_endpoint(url)
        except PoolError as e:
            raise SpecError(f"--etcd: {e}") from None
    return urls


def local_address(endpoint: str) -> str:
    """The address this host reaches etcd from: the pool's network (what other members dial)."""
    from pyroute2 import IPRoute

    host = parse_endpoint(endpoint)[0]
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=host)
        except Exception as e:
            raise SpecError(f"no route to the etcd endpoint {host!r} ({e}): give --address") from None
    for route in routes:
        if src := route.get_attr("RTA_PREFSRC"):
            return str(src)
    raise SpecError(f"no source address toward {host!r}: give --address")


def uplink_tap(vni: int) -> str:
    """The TAP uplink of a pool-wide switch, in its VXLAN bridge: named by the switch's VNI."""
    return f"svt{vni}"


def uplink_vni(tap: str | None) -> int | None:
    """The VNI of a pool-wide switch's uplink TAP; None for any other uplink."""
    match = re.fullmatch(r"svt([0-9]{1,8})", tap or "")
    return int(match.group(1)) if match else None


def unreachable(e: PoolUnavailable, consequence: str = "") -> ApiError:
    """What an operation says when etcd cannot be reached (no answer, or no quorum)."""
    return ApiError(api.E_FAILED, f"the pool's database cannot be reached{consequence}: {e}")


def stop_switch(name: str) -> None:
    """Stop switch `name` here; a pool-wide one's VXLAN link goes too (found by its uplink's name)."""
    from slimvisor.network import switchd, vxlan

    uplink = next((s.get("uplink") for s in switchd.listing() if s["name"] == name), None)
    switchd.stop(name)
    if (vni := uplink_vni(uplink)) is not None:
        vxlan.detach(vni)


def engines_here() -> list[str]:
    from slimvisor.engines.qemu.engine import qemu_binary

    return ["pv", "pvh", "hvm"] if qemu_binary() is not None else ["pv"]


class Pool:
    """The daemon's membership in a pool: lease keeper, records, placement, switches, HA."""

    def __init__(self, ts: Toolstack, membership: Membership, adopt: Callable[[Any], None]) -> None:
        self.ts = ts
        self.m = membership
        self.store = PoolStore(membership.endpoints)  # the loop's
        self.keeper = PoolStore(membership.endpoints)  # the lease's: its thread's alone once started
        self.lease_file = runtime_base() / "pool-lease"
        self.listener: PeerListener | None = None
        self.adopt = adopt  # the daemon serves an authenticated peer socket as an API connection
        self.leaving = False
        self.registered = False
        self.last_error = ""
        self._stop = threading.Event()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._cancel_watch: Callable[[], None] | None = None
        self._secret = ""

    # -- life ------------------------------------------------------------------------------------
    def start(self, first: bool) -> None:
        """Serve the pool link and keep the lease. `first` (pool init/join): the host must register
        now, or this raises; a daemon rejoining at start keeps trying in the background instead
        (its old lease may still hold its name for up to a TTL)."""
        self._secret = self.store.secret()
        if first:
            self.keeper.register(self.host_info(), self.m.ttl)
            self.registered = True
            fence.write(self.lease_file, time.monotonic() + self.m.ttl - fence.FENCE_MARGIN_S)
        self.listener = PeerListener(self.ts.loop, self.m.address, self.m.port, self._secret, self.adopt)
        self.ts.loop.add_reader(self._wake_r, self._run_tasks)
        self._thread = threading.Thread(target=self._keep, name="pool-lease", daemon=True)
        self._thread.start()
        with contextlib.suppress(PoolUnavailable):
            self._cancel_watch = self.store.watch_hosts(self._host_event)
        self.ts.loop.call_later(self.m.ttl, self._tick)
        log.info("pool %s: member %s at %s:%d (lease %d s)", self.m.pool, self.m.host, self.m.address, self.m.port,
                 self.m.ttl)  # fmt: skip

    def close(self, leave: bool = False) -> None:
        """Stop keeping the lease (the daemon stops; its domains' supervisors fence at its end), or
        `leave`: give it back now, after releasing this host's domain records (first: while etcd
        cannot be reached, this raises PoolUnavailable and the host stays a member)."""
        if leave:
            for name in list(self.ts.domains):
                self.store.release_domain(name, host=self.m.host)
        self._stop.set()
        if self._cancel_watch is not None:
            with contextlib.suppress(Exception):
                self._cancel_watch()
        if self.listener is not None:
            self.listener.close()
        with contextlib.suppress(OSError, ValueError):
            self.ts.loop.remove_reader(self._wake_r)
        if self._thread is not None:
            self._thread.join(timeout=self.store.timeout * 3)
        if leave:
            with contextlib.suppress(PoolUnavailable):  # else the lease expires by itself within a TTL
                self.keeper.leave()
            self.lease_file.unlink(missing_ok=True)  # the domains left are this host's alone now
            from slimvisor.network import vxlan

            for vni in vxlan.attached():  # its switches are this host's alone too
                vxlan.detach(vni)
            for dom in self.ts.domains.values():
                with contextlib.suppress(Exception):
                    call(dom, "fence", path=None)
            self.m.path().unlink(missing_ok=True)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def host_info(self) -> HostInfo:
        vm = psutil.virtual_memory()
        return HostInfo(name=self.m.host, address=self.m.address, port=self.m.port, cpus=os.cpu_count() or 1,
                        memory_mib=units.mib(vm.total), free_memory_mib=units.mib(vm.available),
                        engines=engines_here(), leaving=self.leaving)  # fmt: skip

    # -- the keeper thread: etcd I/O only ------------------------------------------------------------
    def _keep(self) -> None:
        store = self.keeper
        period = max(self.m.ttl / 3, 0.5)
        while not self._stop.wait(0 if not self.registered else period):
            sent = time.monotonic()
            try:
                if self.registered:
                    store.keepalive()
                else:
                    store.register(self.host_info(), self.m.ttl)
                    self.registered = True
                    log.info("pool %s: registered %s", self.m.pool, self.m.host)
                    self._post(self.scan)
                fence.write(self.lease_file, sent + self.m.ttl - fence.FENCE_MARGIN_S)
                store.update_host(self.host_info())
                self.last_error = ""
            except LeaseLost:
                self.registered = False
                self._note("the lease expired: registering again (restartable domains here were fenced; "
                           "those the pool still has here start again)")  # fmt: skip
            except PoolConflict as e:  # our old lease still holds the name after a restart: wait it out
                self._note(str(e))
                self._stop.wait(1.0)
            except PoolUnavailable as e:
                self._note(str(e))
                self._stop.wait(min(period, 1.0))
            except Exception as e:  # a bug must not end the lease thread silently
                log.exception("pool lease keeper")
                self._note(f"internal error: {e}")
                self._stop.wait(1.0)

    def _note(self, error: str) -> None:
        if error != self.last_error:
            log.warning("pool %s: %s", self.m.pool, error)
        self.last_error = error

    def _host_event(self, kind: str, name: str) -> None:
        """From the watch's thread: a member's key went (its lease expired, or it left)."""
        if kind == "delete":
            self._post(self.scan)

    def _post(self, task: Callable[[], None]) -> None:
        """Run `task` on the daemon's loop (from any thread)."""
        self._tasks.put(task)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _run_tasks(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                task()
            except (PoolUnavailable, PoolConflict) as e:
                self._note(str(e))
            except Exception:
                log.exception("pool task")

    def _tick(self) -> None:
        """Now and then, whatever the watch missed: adopt arrivals, settle fenced domains, take over."""
        if self._stop.is_set():
            return
        try:
            self.scan()
        except (PoolUnavailable, PoolConflict) as e:
            self._note(str(e))
        except Exception:
            log.exception("pool scan")
        self.ts.loop.call_later(max(self.m.ttl / 2, 1.0), self._tick)

    # -- records ---------------------------------------------------------------------------------
    def claim(self, cfg: DomainConfig, uuid: str, kind: str, disks: list[int]) -> None:
        """A new domain of this host: its name and uuid are the pool's from now on (one transaction)."""
        try:
            self.store.claim_domain(self._record(cfg, uuid, kind, disks))
        except PoolConflict as e:
            raise ApiError(api.E_EXISTS, str(e)) from None
        except PoolUnavailable as e:
            raise unreachable(e, ", so no domain can be created") from None

    def _record(self, cfg: DomainConfig, uuid: str, kind: str, disks: list[int]) -> dict[str, Any]:
        return {"name": cfg.name, "uuid": uuid, "host": self.m.host, "memory_mib": cfg.memory_mib, "type": kind,
                "on_crash": cfg.on_crash, "state": "running", "config": cfg.to_json(), "disks": disks,
                "moving_to": None}  # fmt: skip

    def fence_path(self, on_crash: str) -> str | None:
        """The lease file a domain's supervisor fences on: only for those another member would restart."""
        return str(self.lease_file) if on_crash in RESTARTS else None

    def gone(self, dom: Domain) -> None:
        """A domain of this host ended for good: its record goes, unless it moved away or was fenced
        (then the scan starts it here again if the pool still has it here, once the lease holds)."""
        if fence.marked(self.lease_file, dom.name):
            log.warning("%s: fenced (this host's lease may have expired); the pool decides where it runs next",
                        dom.name)  # fmt: skip
            return
        try:
            rec = self._find(dom.name)
            if rec is None or rec[0].get("host") != self.m.host or rec[0].get("moving_to"):
                return
            self.store.release_domain(dom.name, host=self.m.host)
        except PoolUnavailable as e:
            self._note(f"{dom.name}: its pool record stays until the pool's database is back: {e}")

    def _find(self, name: str) -> tuple[dict[str, Any], int] | None:
        return next(((r, rev) for r, rev in self.store.domains() if r.get("name") == name), None)

    def moving(self, name: str, target: str) -> None:
        """The source's note, once the target has the domain waiting: the target adopts the record."""
        found = self._find(name)
        if found is not None:
            self.store.put_domain({**found[0], "moving_to": target})

    def hosts(self) -> dict[str, HostInfo]:
        """The live members, by name; what cannot be placed, created or reached while etcd is away
        says so in the caller's words (an ApiError)."""
        try:
            return {h.name: h for h in self.store.hosts()}
        except PoolUnavailable as e:
            raise unreachable(e) from None

    def reserved(self, records: list[tuple[dict[str, Any], int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec, _ in records:
            if isinstance(rec.get("memory_mib"), int):
                out[str(rec.get("host"))] = out.get(str(rec.get("host")), 0) + rec["memory_mib"]
        return out

    def place(self, memory_mib: int, kind: str, host: str | None = None, exclude: tuple[str, ...] = (),
              planned: dict[str, int] | None = None) -> HostInfo:  # fmt: skip
        """The member a domain goes to: `host` if given (and a member), else by placement's policy."""
        hosts = self.hosts()
        if host is not None:
            if host not in hosts:
                raise ApiError(api.E_CONFIG, f"--host {host}: not a live member of pool {self.m.pool} "
                               f"(members: {', '.join(sorted(hosts)) or 'none'})")  # fmt: skip
            return hosts[host]
        try:
            reserved = self.reserved(self.store.domains())
        except PoolUnavailable as e:
            raise unreachable(e) from None
        for name, mib in (planned or {}).items():
            reserved[name] = reserved.get(name, 0) + mib
        try:
            return placement.choose(hosts.values(), reserved, memory_mib, kind, exclude)  # type: ignore[return-value]
        except placement.NoRoom as e:
            raise ApiError(api.E_FAILED, str(e)) from None

    @contextlib.contextmanager
    def peer(self, host: str) -> Iterator[api.Client]:
        """An API client on another member's daemon, over the authenticated pool link."""
        with api.Client(sock=self.channel(host), timeout=PEER_TIMEOUT) as client:
            yield client

    def channel(self, host: str) -> Any:
        """A connected socket to `host`'s daemon (a migration's stream): the caller owns it."""
        info = self.hosts().get(host)
        if info is None:
            raise ApiError(api.E_FAILED, f"{host} is not a live member of pool {self.m.pool}")
        try:
            return peer_connect(info.address, info.port, self._secret, timeout=10.0)
        except OSError as e:
            raise ApiError(api.E_FAILED, f"pool member {host} ({info.address}:{info.port}): {e.strerror or e}") \
                from None
        except PeerAuthError as e:  # its message names the member
            raise ApiError(api.E_FAILED, str(e)) from None

    # -- switches --------------------------------------------------------------------------------
    def switch_up(self, name: str) -> int:
        """Switch `name` here, joined to its namesakes on the other members by VXLAN; its VNI."""
        from slimvisor.network import switchd, vxlan

        vni = self.store.switch_vni(name)
        tap = uplink_tap(vni)
        running = any(s["name"] == name for s in switchd.listing() if s.get("pid"))
        if not running:
            switchd.start(name, tap)
        try:
            vxlan.attach(tap, vni, self.m.address, self._peers(self.store.hosts()))
        except Exception:
            if not running:
                with contextlib.suppress(SpecError, OSError):
                    switchd.stop(name)
            raise
        return vni

    def _peers(self, hosts: Iterable[HostInfo]) -> list[str]:
        """The VXLAN peers of this member's switches: every other member's address."""
        return [h.address for h in hosts if h.name != self.m.host]

    def _refresh_peers(self, hosts: dict[str, HostInfo]) -> None:
        """Every pool-wide switch here joined to the members there are now (attach again: a switch
        restarted by hand has a new TAP outside its bridge; attach is idempotent, ~8 ms)."""
        from slimvisor.network import switchd, vxlan

        peers = self._peers(hosts.values())
        running = {s.get("uplink") for s in switchd.listing() if s.get("pid")}
        for vni in vxlan.attached():
            if uplink_tap(vni) not in running:
                continue  # its switch is stopped: nothing to join until it starts again
            try:
                vxlan.attach(uplink_tap(vni), vni, self.m.address, peers)
            except vxlan.VxlanError as e:
                self._note(f"pool-wide switch of VNI {vni}: {e}")

    # -- the scan: arrivals, fenced domains, HA ---------------------------------------------------------
    def scan(self) -> None:
        if not self.registered:
            return
        hosts = {h.name: h for h in self.store.hosts()}
        if self.m.host not in hosts:
            return  # our own lease is gone: this host takes over nothing (its restartable domains are fenced)
        self._refresh_peers(hosts)
        records = self.store.domains()
        for rec, _ in records:
            name = str(rec.get("name"))
            if rec.get("moving_to") == self.m.host:
                self._adopt(rec, name)
            elif fence.marked(self.lease_file, name):
                fence.unmark(self.lease_file, name)
                if rec.get("host") == self.m.host and name not in self.ts.domains:
                    log.warning("%s: fenced here, and the pool still has it here: starting it again", name)
                    self._restart(rec)
            elif rec.get("host") == self.m.host and name in self.ts.domains:
                self._publish(rec, self.ts.domains[name])
            elif rec.get("host") == self.m.host and not rec.get("moving_to"):
                # Gone while etcd could not be reached (creates, restarts and arrivals run on this
                # loop, as this scan does: none is half-way now).
                log.info("%s: no longer here: its pool record goes", name)
                self.store.release_domain(name, host=self.m.host)
        self._take_over(records, hosts)

    def _publish(self, rec: dict[str, Any], dom: Domain) -> None:
        """The domain's state as `list --pool` shows it everywhere (running, paused, crashed, ...)."""
        state = domains.summary(dom)["state"]
        state = "running" if state == "blocked" else state  # xl's b is a moment's, not worth a write
        if state != rec.get("state") and state != "dying":
            self.store.put_domain({**rec, "state": state})

    def _adopt(self, rec: dict[str, Any], name: str) -> None:
        dom = self.ts.domains.get(name)
        state = domains.summary(dom)["state"] if dom is not None else None
        if state in ("running", "paused", "blocked"):
            self.store.put_domain({**rec, "host": self.m.host, "moving_to": None})
            log.info("%s: arrived from %s; its pool record is this host's", name, rec.get("host"))
        elif dom is None:
            self.store.put_domain({**rec, "moving_to": None})  # the arrival failed: it stays where it was

    def _take_over(self, records: list[tuple[dict[str, Any], int]], hosts: dict[str, HostInfo]) -> None:
        reserved = self.reserved([(r, v) for r, v in records if r.get("host") in hosts])
        for rec, rev in records:
            lost = rec.get("host") not in hosts and rec.get("moving_to") not in hosts
            restartable = rec.get("on_crash") in RESTARTS and rec.get("config") and rec.get("state") != "crashed"
            if not lost or not restartable:
                continue
            name, memory, kind = rec.get("name"), rec.get("memory_mib"), rec.get("type")
            if not isinstance(name, str) or not NAME.fullmatch(name) or not isinstance(memory, int):
                continue
            try:
                chosen = placement.choose(hosts.values(), reserved, memory, str(kind))
            except placement.NoRoom as e:
                self._note(f"{name}: host {rec.get('host')} is gone, and {e}")
                continue
            if chosen.name != self.m.host:
                continue  # that member's scan takes it
            if not self.store.take_over(name, rev, self.m.host):
                continue  # another member was first
            reserved[self.m.host] = reserved.get(self.m.host, 0) + memory
            log.warning("%s: host %s is gone (its lease expired): restarting it here (on_crash=%s)", name,
                        rec.get("host"), rec.get("on_crash"))  # fmt: skip
            self._restart({**rec, "host": self.m.host, "moving_to": None})

    def _restart(self, rec: dict[str, Any]) -> None:
        from slimvisor.storage import probe_disk

        name = str(rec["name"])
        try:
            cfg = DomainConfig.from_json(rec.get("config"))
            cfg.uuid = str(rec["uuid"])
            sizes = rec.get("disks") or []
            for i, (disk, size) in enumerate(zip(cfg.disks, sizes, strict=False)):
                if probe_disk(disk.path, disk.format, disk.readonly, locked_ok=True) != size:
                    raise SpecError(f"disk {i} ({disk.path}) is not the image it ran on (a different size here): "
                                    "HA needs shared storage")  # fmt: skip
            for net in cfg.nets:
                self.switch_up(net.switch)
            check_host(cfg)
            domains.create(self.ts, cfg, config_file=f"{rec.get('host')}:{name}", claimed=True)
        except Exception as e:
            log.error("%s: HA restart failed: %s", name, e)
            with contextlib.suppress(Exception):
                self.store.put_domain({**rec, "state": "crashed", "reason": f"HA restart on {self.m.host}: {e}"})

    # -- what `pool list` and `list --pool` show ------------------------------------------------------
    def listing(self) -> dict[str, Any]:
        hosts = self.hosts()
        rows = []
        for rec, _ in self.store.domains():
            host = rec.get("host")
            state = rec.get("state", "running") if host in hosts else "host-lost"
            rows.append({"name": rec.get("name"), "uuid": rec.get("uuid"), "host": host, "state": state,
                         "memory_mib": rec.get("memory_mib"), "type": rec.get("type"),
                         "on_crash": rec.get("on_crash"), "moving_to": rec.get("moving_to")})  # fmt: skip
        return {"pool": self.m.pool, "host": self.m.host, "registered": self.registered, "problem": self.last_error,
                "hosts": [dataclasses.asdict(h) for h in sorted(hosts.values(), key=lambda h: h.name)],
                "domains": sorted(rows, key=lambda r: str(r["name"]))}  # fmt: skip


# -- operations ------------------------------------------------------------------------------------
def _membership(req: dict[str, Any], pool: str | None) -> Membership:
    etcd, host, address = req.get("etcd"), req.get("host"), req.get("address")
    port, ttl = req.get("port", PEER_PORT), req.get("ttl", DEFAULT_TTL)
    if not isinstance(etcd, list) or not all(isinstance(u, str) for u in etcd):
        raise ApiError(api.E_BAD_REQUEST, "'etcd' is a list of etcd client URLs")
    if not isinstance(host, str) or not NAME.fullmatch(host):
        raise ApiError(api.E_CONFIG, f"--name {host!r}: a host name is letters, digits, '.', '_' and '-'")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ApiError(api.E_CONFIG, f"--port {port!r}: a TCP port (1-65535)")
    if not isinstance(ttl, int) or not MIN_TTL <= ttl <= MAX_TTL:
        raise ApiError(api.E_CONFIG, f"--ttl {ttl!r}: {MIN_TTL}..{MAX_TTL} seconds")
    try:
        endpoints = check_endpoints(etcd)
        if address is None:
            address = local_address(endpoints[0])
        import ipaddress

        ipaddress.IPv4Address(str(address))
    except SpecError as e:
        raise ApiError(api.E_CONFIG, str(e)) from None
    except ValueError:
        raise ApiError(api.E_CONFIG, f"--address {address!r}: an IPv4 address of this host") from None
    return Membership(pool=pool or "", endpoints=endpoints, host=host, address=str(address), port=port, ttl=ttl)


def _enter(ts: Toolstack, m: Membership, create: bool) -> dict[str, Any]:
    if ts.pool is not None:
        raise ApiError(api.E_EXISTS, f"this host is already {ts.pool.m.host} in pool {ts.pool.m.pool} "
                       "(slimvisor pool leave first)")  # fmt: skip
    store = PoolStore(m.endpoints)
    try:
        if create:
            store.create_pool(m.pool)
        meta = store.meta()
        if meta is None:
            raise ApiError(api.E_CONFIG, f"no pool at {', '.join(m.endpoints)} (slimvisor pool init makes one)")
        m.pool = str(meta.get("name", ""))
        clash = sorted(n for n in ts.domains if any(r.get("name") == n for r, _ in store.domains()))
        if clash:
            raise ApiError(api.E_EXISTS, f"domain names {', '.join(clash)} are taken in pool {m.pool}: "
                           "rename or destroy them here first")  # fmt: skip
        member: Pool = ts.enter_pool(m, first=True)
    except PoolConflict as e:
        raise ApiError(api.E_EXISTS, str(e)) from None
    except PoolUnavailable as e:
        raise ApiError(api.E_FAILED, f"etcd: {e}") from None
    except OSError as e:
        raise ApiError(api.E_FAILED, f"pool link on {m.address}:{m.port}: {e.strerror or e}") from None
    m.save()
    for dom in ts.domains.values():  # what ran here before is the pool's now
        spec = dom.record.spec or {}
        with contextlib.suppress(ApiError, PoolConflict):
            member.store.claim_domain({"name": dom.name, "uuid": dom.record.uuid, "host": m.host,
                                       "memory_mib": dom.record.memory_mib, "type": spec.get("type", "pv"),
                                       "on_crash": dom.record.policies.on_crash.value, "state": "running",
                                       "config": None, "disks": [], "moving_to": None})  # fmt: skip
    return member.listing()


def op_pool_init(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    name = req.get("pool", "pool")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ApiError(api.E_CONFIG, f"pool name {name!r}: letters, digits, '.', '_' and '-'")
    return _enter(ts, _membership(req, name), create=True)


def op_pool_join(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return _enter(ts, _membership(req, None), create=False)


def member(ts: Toolstack) -> Pool:
    if ts.pool is None:
        raise ApiError(api.E_CONFIG, "this host is in no pool (slimvisor pool init / pool join)")
    assert isinstance(ts.pool, Pool)
    return ts.pool


def op_pool_leave(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """Leave; or, with `evacuating`, only say so (placement passes this host over from the next
    renewal on) while the client migrates the domains away."""
    pool = member(ts)
    if req.get("evacuating"):
        pool.leaving = True
        return {"pool": pool.m.pool, "host": pool.m.host, "leaving": True}
    try:
        ts.leave_pool()
    except PoolUnavailable as e:
        raise ApiError(api.E_FAILED, f"etcd: {e}") from None
    return {"pool": pool.m.pool, "host": pool.m.host, "kept": sorted(ts.domains)}


def op_pool_list(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    try:
        return member(ts).listing()
    except PoolUnavailable as e:
        raise unreachable(e) from None


def op_switch_start(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """A pool-wide switch: on this member now, on the others when a domain there needs it."""
    name = req.get("switch")
    if not isinstance(name, str):
        raise ApiError(api.E_BAD_REQUEST, "switch-start takes 'switch'")
    try:
        vni = member(ts).switch_up(name)
    except SpecError as e:
        raise ApiError(api.E_CONFIG, str(e)) from None
    except PoolUnavailable as e:
        raise unreachable(e) from None
    return {"switch": name, "vni": vni}


OPERATIONS = {"pool-init": op_pool_init, "pool-join": op_pool_join, "pool-leave": op_pool_leave,
              "pool-list": op_pool_list, "switch-start": op_switch_start}  # fmt: skip
