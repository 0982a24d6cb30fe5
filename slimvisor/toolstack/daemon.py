"""slimvisord: dom0's toolstack daemon. Registry of domains, the public API, and the xenstore.

It owns no domain's processes itself: each domain has a supervisor (slimvisor.domain.supervisor)
that outlives the daemon. The daemon finds them again by scanning RUN/domains at start, so a
daemon killed with SIGKILL and started again lists, controls and serves the same domains and the
same xenstore (SQLite). One event loop serves the API socket, the xenstore sockets (tools and
every guest's vsock channel) and the supervisors' exits (pidfds).

    python3 -m slimvisor.toolstack.daemon [--daemonize] [--socket PATH]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import select
import shutil
import signal
import socket
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from slimvisor import __version__
from slimvisor.domain import supervisor
from slimvisor.domain.check import check_spec, fill_defaults
from slimvisor.domain.supervisor import Record, domains_dir
from slimvisor.model.lifecycle import Action, Policies, RestartLimiter
from slimvisor.model.spec import DomainSpec, SpecError, VsockSpec
from slimvisor.runtime.build import BUILD_MISMATCH, build_id
from slimvisor.runtime.control import ControlError
from slimvisor.runtime.loop import EventLoop
from slimvisor.runtime.paths import log_dir, runtime_base, state_dir
from slimvisor.toolstack import api, daemonctl
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.xlcfg import DomainConfig, check_host, parse_xlcfg
from slimvisor.xenstore import XENSTORE_VSOCK_PORT
from slimvisor.xenstore.server import XenstoreServer
from slimvisor.xenstore.store import Store, domain_path
from slimvisor.xenstore.wire import Perm

log = logging.getLogger("slimvisord")

FEATURES = (
    "hello", "create", "list", "domain-info", "pause", "unpause", "shutdown", "reboot", "destroy", "mem-set",
    "sched-credit", "vcpu-pin", "console", "top", "info", "dmesg", "cluster-up", "cluster-down", "cluster-list",
    "daemon-stop",
)  # fmt: skip
FIRST_VSOCK_CID = 3  # 0-2 are reserved (virtio spec 5.10.4); a domain's CID is domid + 2
DMESG_LINES = 2000


@dataclass
class Domain:
    record: Record
    rundir: Path
    pidfd: int = -1
    last_pids: list[int] = field(default_factory=list)
    foreign: str | None = None  # the build of a supervisor this daemon may not drive (lock-step)
    crashed: str | None = None  # why, when the supervisor died and on_crash=preserve kept the domain
    destroying: bool = False
    restarts: RestartLimiter = field(default_factory=RestartLimiter)
    last_state: str = "running"  # what the supervisor said last (a busy one may not answer `list` in time)

    @property
    def name(self) -> str:
        return self.record.name


class _ApiConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.version: int | None = None


class _Dmesg(logging.Handler):
    """The daemon's own log, kept for `slimvisor dmesg` as xl dmesg shows the hypervisor's."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=DMESG_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.created))}] "
                          f"{record.getMessage()}")  # fmt: skip


class Daemon:
    def __init__(self, sock_path: Path, db_path: Path) -> None:
        supervisor.preload()
        self.sock_path = sock_path
        self.loop = EventLoop()
        self.store = Store(db_path)
        self.dom0 = self.store.connect(0)
        self.xenstore = XenstoreServer(self.store, self.loop)
        self.xenstore_path = runtime_base() / "xenstored.sock"
        self.domains: dict[str, Domain] = {}
        self.clients: dict[int, _ApiConnection] = {}
        self.dmesg = _Dmesg()
        logging.getLogger().addHandler(self.dmesg)
        self.stopping = False
        self.started = time.time()

    # -- start, re-attach, stop ------------------------------------------------------------------
    def start(self) -> None:
        self.xenstore.listen(str(self.xenstore_path))
        self._rescan()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        self.listener.bind(str(self.sock_path))
        os.chmod(self.sock_path, 0o600)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._accept)
        log.info("slimvisord %s (API %d) serving %s, %d domains", build_id(), api.API_VERSION, self.sock_path,
                 len(self.domains))  # fmt: skip

    def serve(self) -> None:
        while not self.stopping:
            self.loop.run_once(None)

    def close(self) -> None:
        """Stop serving; domains keep running (their supervisors are not ours)."""
        for conn in list(self.clients.values()):
            self._drop(conn)
        with contextlib.suppress(AttributeError, OSError):
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.sock_path.unlink()
        for dom in self.domains.values():
            if dom.pidfd >= 0:
                os.close(dom.pidfd)
        self.xenstore.close()
        self.store.close()

    def _rescan(self) -> None:
        """Find the domains that supervisors run now; clear what dead ones left behind."""
        alive: set[int] = set()
        for rundir in sorted(domains_dir().iterdir()):
            try:
                record = Record.load(rundir / "state.json")
                info = supervisor.call(rundir, "info", reply_timeout=5)
                dom = Domain(record, rundir, last_pids=info["pids"])
            except ControlError as e:
                if str(e).startswith(BUILD_MISMATCH) and _is_supervisor(record.supervisor_pid):
                    log.warning("%s: supervised by another slimvisor build (%s): only destroy works", rundir.name, e)
                    dom = Domain(record, rundir, foreign=record.build)
                else:  # a preserved crash, or a supervisor that died while no daemon ran: on_crash decides
                    note = rundir / "crashed"
                    dom = Domain(record, rundir, crashed=note.read_text() if note.exists() else None)
                    if dom.crashed is None:
                        log.warning("%s: no live supervisor (%s)", rundir.name, e)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("%s: unreadable state (%s): cleaning up", rundir.name, e)
                self._clean_dead(rundir)
                continue
            self._watch(dom)
            alive.add(record.domid)
            log.info("re-attached %s (domain %d)", record.name, record.domid)
        for name in self.dom0.directory("/local/domain") if self.dom0.exists("/local/domain") else []:
            if name.isdigit() and int(name) not in alive:
                with contextlib.suppress(Exception):
                    self.dom0.rm(domain_path(int(name)))

    def _watch(self, dom: Domain) -> None:
        self.domains[dom.name] = dom
        self._serve_xenstore(dom)
        if dom.crashed is not None:
            return
        if _is_supervisor(dom.record.supervisor_pid):
            with contextlib.suppress(OSError):
                dom.pidfd = os.pidfd_open(dom.record.supervisor_pid)
                self.loop.add_reader(dom.pidfd, lambda: self._supervisor_gone(dom))
        if dom.pidfd < 0:
            self.loop.call_later(0, lambda: self._supervisor_gone(dom))

    def _serve_xenstore(self, dom: Domain) -> None:
        if dom.record.domid not in self.xenstore.domain_listeners():
            self.xenstore.listen_domain(str(dom.rundir / f"vsock_{XENSTORE_VSOCK_PORT}"), dom.record.domid)

    def _supervisor_gone(self, dom: Domain) -> None:
        if self.domains.get(dom.name) is not dom:
            return
        if dom.pidfd >= 0:
            self.loop.remove_reader(dom.pidfd)
            os.close(dom.pidfd)
            dom.pidfd = -1
        if dom.rundir.exists() and not dom.destroying and dom.crashed is None:
            self._crashed(dom, "its supervisor (the domain's dom0 process: console, devices) died")
            return
        del self.domains[dom.name]
        self.xenstore.forget_domain(dom.record.domid)
        with contextlib.suppress(Exception):
            self.dom0.rm(domain_path(dom.record.domid))
        with contextlib.suppress(Exception):
            self.store.release(dom.record.domid)
        if dom.rundir.exists():  # a supervisor killed while destroying, or a preserved crash
            self._clean_dead(dom.rundir, dom.last_pids)
        log.info("%s (domain %d) is gone", dom.name, dom.record.domid)

    def _crashed(self, dom: Domain, reason: str) -> None:
        """A domain whose supervisor died: take down what is left, then apply its on_crash."""
        action = dom.record.policies.on_crash
        log.warning("%s: crashed: %s; on_crash=%s", dom.name, reason, action)
        if _is_supervisor(dom.record.supervisor_pid):  # alive but not answering
            with contextlib.suppress(ProcessLookupError):
                os.kill(dom.record.supervisor_pid, signal.SIGKILL)
        self._clean_dead(dom.rundir, dom.last_pids, keep_dir=True)
        allowed = dom.restarts.allow(time.monotonic())  # every crash counts, whatever its action
        if action.restarts and allowed and dom.record.spec:
            del self.domains[dom.name]
            try:
                new = self._launch(dom.record, dom.rundir)
                new.restarts = dom.restarts
                log.info("%s: restarted (domain %d)", dom.name, dom.record.domid)
                return
            except Exception as e:
                self.domains[dom.name] = dom
                reason = f"{reason}; restart failed: {e}"
        if action == Action.PRESERVE or action.restarts:
            dom.crashed = reason  # listed as crashed until destroyed, as xl's preserve
            (dom.rundir / "crashed").write_text(reason)
            return
        dom.destroying = True
        self._supervisor_gone(dom)

    def _clean_dead(self, rundir: Path, pids: Sequence[int] = (), keep_dir: bool = False) -> None:
        with contextlib.suppress(Exception):
            from slimvisor.host.cgroup import DomainCgroup

            DomainCgroup.open(rundir.name).destroy()
        for pid in pids:  # UML is its own process group (engines.uml): its helpers go with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if keep_dir:  # what a restart or a preserved crash keeps: the record and the crash note
            for entry in rundir.iterdir():
                if entry.name not in ("state.json", "crashed"):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            shutil.rmtree(rundir, ignore_errors=True)

    # -- API connections -------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = self.clients[sock.fileno()] = _ApiConnection(sock)
        self.loop.add_reader(sock.fileno(), lambda: self._readable(conn))

    def _drop(self, conn: _ApiConnection) -> None:
        self.loop.remove_reader(conn.sock.fileno())
        self.clients.pop(conn.sock.fileno(), None)
        conn.sock.close()

    def _readable(self, conn: _ApiConnection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.buf += data
        while b"\n" in conn.buf:
            line, conn.buf = conn.buf.split(b"\n", 1)
            self._request(conn, line)
            if conn.sock.fileno() < 0:
                return
        if len(conn.buf) > api.MAX_LINE:
            self._reply(conn, {"error": {"code": api.E_BAD_REQUEST, "message": "request too long"}})
            self._drop(conn)

    def _request(self, conn: _ApiConnection, line: bytes) -> None:
        req_id: Any = None
        fds: list[int] = []
        try:
            try:
                req = json.loads(line)
            except ValueError as e:
                raise ApiError(api.E_BAD_REQUEST, f"not JSON: {e}") from None
            if not isinstance(req, dict):
                raise ApiError(api.E_BAD_REQUEST, "a request is a JSON object")
            req_id = req.get("id")
            op = req.get("op")
            if op == "hello":
                reply = self._hello(conn, req)
            elif conn.version is None:
                raise ApiError(api.E_BAD_REQUEST, "say hello first (API version negotiation)")
            elif op not in FEATURES:
                raise ApiError(api.E_NOT_SUPPORTED, f"operation {op!r} is not supported by slimvisord "
                               f"{__version__} (API {conn.version})")  # fmt: skip
            else:
                handler: Callable[[dict[str, Any]], dict[str, Any]] = getattr(self, "_op_" + op.replace("-", "_"))
                reply = handler(req)
                fds = reply.pop("_fds", [])
            reply = {"id": req_id, "ok": True, **reply}
        except ApiError as e:
            reply = {"id": req_id, "error": {"code": e.code, "message": e.message}}
        except (SpecError, ControlError, OSError, RuntimeError) as e:
            reply = {"id": req_id, "error": {"code": api.E_FAILED, "message": str(e)}}
        except Exception as e:  # a bug answers this request; the daemon keeps serving
            log.exception("internal error on %r", line[:200])
            reply = {"id": req_id, "error": {"code": api.E_FAILED, "message": f"internal error: {e}"}}
        self._reply(conn, reply, fds)

    def _reply(self, conn: _ApiConnection, reply: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = api.encode(reply)
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(5)
            if fds:
                socket.send_fds(conn.sock, [data[:1]], fds)
                data = data[1:]
            conn.sock.sendall(data)
            conn.sock.setblocking(False)
        except OSError:
            self._drop(conn)
        finally:
            for fd in fds:
                os.close(fd)

    def _hello(self, conn: _ApiConnection, req: dict[str, Any]) -> dict[str, Any]:
        version = req.get("version")
        if version not in api.SUPPORTED_VERSIONS:
            raise ApiError(api.E_VERSION, f"API version {version!r} is not supported; this daemon speaks "
                           f"{', '.join(map(str, api.SUPPORTED_VERSIONS))}")  # fmt: skip
        conn.version = version
        return {"version": version, "versions": list(api.SUPPORTED_VERSIONS), "features": list(FEATURES),
                "daemon": __version__, "build": build_id(), "xenstore": str(self.xenstore_path)}  # fmt: skip

    # -- operations ------------------------------------------------------------------------------
    def _domain(self, req: dict[str, Any]) -> Domain:
        """The domain a request names, by name or by id (as xl takes either)."""
        key = req.get("domain")
        if not isinstance(key, str | int):
            raise ApiError(api.E_BAD_REQUEST, "missing 'domain' (a name or an id)")
        for dom in self.domains.values():
            if dom.name == str(key) or str(dom.record.domid) == str(key):
                return dom
        raise ApiError(api.E_NO_DOMAIN, f"no domain {key!r}")

    def _call(self, dom: Domain, op: str, **args: Any) -> dict[str, Any]:
        if dom.crashed is not None:
            raise ApiError(api.E_FAILED, f"{dom.name} crashed ({dom.crashed}): only destroy works on it")
        if dom.foreign is not None:
            raise ApiError(api.E_FAILED, f"{dom.name} runs under slimvisor build {dom.foreign}, this daemon is "
                           f"{build_id()}: only destroy works on it")  # fmt: skip
        try:
            return supervisor.call(dom.rundir, op, **args)
        except ControlError as e:
            raise ApiError(api.E_FAILED, f"{dom.name}: {e}") from None

    def _op_create(self, req: dict[str, Any]) -> dict[str, Any]:
        text, filename = req.get("config"), req.get("filename", "<config>")
        overrides, cwd = req.get("overrides", []), req.get("cwd", "/")
        if not isinstance(text, str) or not isinstance(overrides, list) or not isinstance(cwd, str):
            raise ApiError(api.E_BAD_REQUEST, "create takes 'config' (the file's text), 'overrides' and 'cwd'")
        try:
            cfg = parse_xlcfg(text, str(filename), [str(o) for o in overrides], cwd)
            if cfg.name in self.domains:  # before the host checks: the running domain holds its disks
                raise ApiError(api.E_EXISTS, f"domain {cfg.name!r} already exists")
            check_host(cfg)
        except SpecError as e:
            raise ApiError(api.E_CONFIG, str(e)) from None
        try:
            dom = self.create(cfg, config_file=str(filename), paused=bool(req.get("paused")))
        except SpecError as e:  # found when the domain is built (a missing kernel): name the file too
            raise ApiError(api.E_CONFIG, f"{filename}: {e}") from None
        return {"domain": dom.record.domid, "name": dom.name, "warnings": cfg.warnings}

    def create(self, cfg: DomainConfig, config_file: str | None = None, paused: bool = False) -> Domain:
        """Start a domain from a parsed config (its paths absolute); on any failure nothing of it is left."""
        if cfg.name in self.domains:
            raise ApiError(api.E_EXISTS, f"domain {cfg.name!r} already exists")
        total_mib = psutil.virtual_memory().total >> 20
        if cfg.memory_mib > total_mib or (cfg.maxmem_mib or 0) > total_mib:
            raise ApiError(api.E_CONFIG, f"{config_file}: memory: {max(cfg.memory_mib, cfg.maxmem_mib or 0)} MiB "
                           f"is more than this host has ({total_mib} MiB)")  # fmt: skip
        spec = cfg.to_domain_spec()
        maxmem = max(cfg.maxmem_mib or cfg.memory_mib, cfg.memory_mib)
        spec.memory_mib = maxmem  # UML's memory is maxmem; the balloon holds the difference
        spec.balloon = True
        domid = self._next_domid()
        rundir = domains_dir() / cfg.name
        try:
            rundir.mkdir(mode=0o700)
        except FileExistsError:
            raise ApiError(api.E_EXISTS, f"domain {cfg.name!r} already exists (run dir {rundir})") from None
        try:
            if spec.vsock is None:
                spec.vsock = VsockSpec(cid=domid + FIRST_VSOCK_CID - 1, uds=str(rundir / "vsock"))
            spec.cmdline = f"{spec.cmdline} sv.xenstore={XENSTORE_VSOCK_PORT} sv.domid={domid}".strip()
            check_spec(spec)
            initrd = fill_defaults(spec)
            record = Record(
                domid=domid, name=cfg.name, uuid=cfg.uuid or str(uuidlib.uuid4()), memory_mib=cfg.memory_mib,
                maxmem_mib=maxmem, vcpus=cfg.vcpus, config_file=config_file, cpu_weight=cfg.cpu_weight, cap=cfg.cap,
                cpus=sorted(cfg.cpus) if cfg.cpus is not None else None,
                policies=Policies(*map(Action, (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash))), spec=spec.to_json(),
                initrd=initrd,
            )  # fmt: skip
            dom = self._launch(record, rundir, paused)
        except BaseException:
            self.xenstore.forget_domain(domid)
            with contextlib.suppress(Exception):
                self.dom0.rm(domain_path(domid))
            shutil.rmtree(rundir, ignore_errors=True)
            raise
        log.info("created %s (domain %d, %d MiB)", cfg.name, domid, cfg.memory_mib)
        return dom

    def _launch(self, record: Record, rundir: Path, paused: bool = False) -> Domain:
        """Start the domain `record` describes (a new one, or one restarted after a crash)."""
        assert record.spec is not None
        spec = DomainSpec.from_json(record.spec)
        assert spec.vsock is not None
        self._xenstore_introduce(record, spec.vsock.cid)
        if record.domid not in self.xenstore.domain_listeners():
            self.xenstore.listen_domain(str(rundir / f"vsock_{XENSTORE_VSOCK_PORT}"), record.domid)
        record.supervisor_pid = supervisor.spawn(spec, record, rundir, record.initrd, paused=paused)
        jailed = Record.load(rundir / "state.json")  # what the supervisor leased for the domain
        record.uid, record.jail = jailed.uid, jailed.jail
        dom = Domain(record, rundir)
        self._watch(dom)
        dom.last_pids = self._call(dom, "info")["pids"]
        if record.cpu_weight is not None or record.cap is not None or record.cpus is not None:
            try:
                self._sched(dom, cpu_weight=record.cpu_weight, cap=record.cap, cpus=record.cpus)
            except ApiError as e:
                log.warning("%s: scheduling parameters not applied: %s", record.name, e.message)
        if record.memory_mib < record.maxmem_mib:
            self._call(dom, "mem-set", target_bytes=record.memory_mib << 20)
        return dom

    def _next_domid(self) -> int:
        """Xen's way: ids go up and are not reused while the daemon's state lives (a file)."""
        path = state_dir() / "next-domid"
        try:
            domid = int(path.read_text())
        except (OSError, ValueError):
            domid = 1
        used = {d.record.domid for d in self.domains.values()}
        while domid in used or not 0 < domid < 0x7FF0:
            domid = domid + 1 if domid < 0x7FF0 else 1
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(domid + 1))
        tmp.rename(path)
        return domid

    def _xenstore_introduce(self, record: Record, cid: int) -> None:
        """The nodes libxl writes for a new domain, readable by it; data/ is the guest's to write."""
        base = domain_path(record.domid)
        guest_reads = [Perm(0, "n"), Perm(record.domid, "r")]
        entries = {
            "": b"", "name": record.name.encode(), "domid": str(record.domid).encode(),
            "vm": f"/vm/{record.uuid}".encode(), "memory/target": str(record.memory_mib << 10).encode(),
            "memory/static-max": str(record.maxmem_mib << 10).encode(), "cpu/0/availability": b"online",
            "device/vsock/cid": str(cid).encode(), "control/shutdown": b"",
        }  # fmt: skip
        with contextlib.suppress(Exception):
            self.dom0.rm(base)
        for key, value in entries.items():
            path = f"{base}/{key}".rstrip("/")
            self.dom0.write(path, value)
            self.dom0.set_perms(path, guest_reads)
        for writable in ("data", "attr", "control/shutdown"):
            self.dom0.write(f"{base}/{writable}", b"") if not self.dom0.exists(f"{base}/{writable}") else None
            self.dom0.set_perms(f"{base}/{writable}", [Perm(record.domid, "n")])
        self.dom0.write(f"/vm/{record.uuid}/name", record.name.encode())
        with contextlib.suppress(Exception):
            self.store.introduce(record.domid)

    def _op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        out = [{"name": "Domain-0", "domid": 0, "memory_mib": psutil.virtual_memory().total >> 20,
                "vcpus": os.cpu_count() or 1, "state": "running", "time_s": round(time.process_time(), 1)}]  # fmt: skip
        for dom in sorted(self.domains.values(), key=lambda d: d.record.domid):
            out.append(self._summary(dom))
        return {"domains": out}

    def _summary(self, dom: Domain) -> dict[str, Any]:
        try:
            if dom.crashed is not None:
                raise ControlError("crashed")
            if dom.foreign is not None:
                raise ControlError("another build")
            info = supervisor.call(dom.rundir, "info", reply_timeout=2)
            state = dom.last_state = info["state"]
            dom.last_pids = info["pids"]
        except ControlError:
            state = "crashed" if dom.crashed is not None else "running" if dom.foreign is not None else "dying"
            if state == "dying" and not dom.destroying and _is_supervisor(dom.record.supervisor_pid):
                state = dom.last_state  # alive but busy (blocked on UML's mconsole): not dying
        cpu = 0.0
        for i, p in enumerate(_processes(dom.last_pids)):
            with contextlib.suppress(psutil.Error):
                cpu += sum(p.cpu_times()[:2])
                if i == 0 and state == "running" and p.status() == psutil.STATUS_SLEEPING:
                    state = "blocked"  # xl's b: the engine waits for something to do
        return {"name": dom.name, "domid": dom.record.domid, "uuid": dom.record.uuid,
                "memory_mib": dom.record.memory_mib, "maxmem_mib": dom.record.maxmem_mib,
                "vcpus": dom.record.vcpus, "state": state, "time_s": round(cpu, 1),
                "uid": dom.record.uid, "jail": dom.record.jail}  # fmt: skip

    def _op_domain_info(self, req: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(req)
        info = self._call(dom, "info")
        return {"domain": self._summary(dom), "record": info["record"], "reason": info["reason"],
                "pids": info["pids"], "supervisor": info["supervisor"], "viewers": info["viewers"],
                "limits": info.get("limits", {})}  # fmt: skip

    def _op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._domain(req), "pause")

    def _op_unpause(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._domain(req), "unpause")

    def _op_shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._domain(req), "shutdown", timeout=req.get("timeout", 60))

    def _op_reboot(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._call(self._domain(req), "shutdown", reboot=True, timeout=req.get("timeout", 60))

    def _op_destroy(self, req: dict[str, Any]) -> dict[str, Any]:
        self.destroy_and_wait(self._domain(req).name)
        return {}

    def destroy_and_wait(self, name: str, timeout: float = 20.0) -> None:
        """Always works, and returns once the domain is gone (as `xl destroy`): asks the supervisor,
        kills it if it does not answer or does not finish in time, then clears what is left."""
        dom = self.domains[name]
        dom.destroying = True
        try:
            if dom.crashed is not None:
                pass  # nothing runs: only the record is left
            elif dom.foreign is not None:
                os.kill(dom.record.supervisor_pid, signal.SIGTERM)  # every build destroys its domain on SIGTERM
            else:
                supervisor.call(dom.rundir, "destroy", reply_timeout=5)
            if dom.pidfd >= 0 and not select.select([dom.pidfd], [], [], timeout)[0]:
                raise TimeoutError(f"not gone after {timeout} s")
        except (ControlError, ProcessLookupError, TimeoutError) as e:
            log.warning("%s: supervisor did not destroy the domain (%s): killing it", dom.name, e)
            with contextlib.suppress(ProcessLookupError):
                os.kill(dom.record.supervisor_pid, signal.SIGKILL)
        self._supervisor_gone(dom)

    def _op_cluster_up(self, req: dict[str, Any]) -> dict[str, Any]:
        from slimvisor.toolstack import cluster

        count, template = req.get("count"), req.get("template")
        if not isinstance(count, int) or not (template is None or isinstance(template, str)):
            raise ApiError(api.E_BAD_REQUEST, "cluster-up takes 'count' (an integer) and 'template' (text or null)")
        try:
            return cluster.up(self, str(req.get("cluster", "cluster")), count, template,
                              str(req.get("filename", "<template>")), Path(str(req.get("cwd", "/"))),
                              prefix=str(req.get("prefix", "node")),
                              subnet=str(req.get("subnet", cluster.DEFAULT_SUBNET)))  # fmt: skip
        except SpecError as e:
            raise ApiError(api.E_CONFIG, str(e)) from None

    def _op_cluster_down(self, req: dict[str, Any]) -> dict[str, Any]:
        from slimvisor.toolstack import cluster

        try:
            return cluster.down(self, str(req.get("cluster", "cluster")))
        except SpecError as e:
            raise ApiError(api.E_NO_DOMAIN, str(e)) from None

    def _op_cluster_list(self, req: dict[str, Any]) -> dict[str, Any]:
        from slimvisor.toolstack import cluster

        return {"clusters": [dataclasses.asdict(cluster.Cluster.load(n)) for n in cluster.names()]}

    def _op_mem_set(self, req: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(req)
        target = req.get("target_bytes")
        if not isinstance(target, int) or target <= 0:
            raise ApiError(api.E_BAD_REQUEST, "mem-set takes 'target_bytes', a positive integer")
        if target > dom.record.maxmem_mib << 20:
            raise ApiError(api.E_BAD_REQUEST, f"{dom.name}: {target >> 20} MiB is above maxmem "
                           f"({dom.record.maxmem_mib} MiB)")  # fmt: skip
        self._call(dom, "mem-set", target_bytes=target)
        dom.record.memory_mib = target >> 20
        self.dom0.write(f"{domain_path(dom.record.domid)}/memory/target", str(target >> 10).encode())
        return {}

    def _sched(self, dom: Domain, **args: Any) -> dict[str, Any]:
        args = {k: v for k, v in args.items() if v is not None}
        if "cpu_weight" in args and not (isinstance(args["cpu_weight"], int) and 1 <= args["cpu_weight"] <= 65535):
            raise ApiError(api.E_BAD_REQUEST, "weight must be an integer 1..65535 (xl's credit weight)")
        if "cap" in args and not (isinstance(args["cap"], int) and 0 <= args["cap"] <= 100 * dom.record.vcpus):
            raise ApiError(api.E_BAD_REQUEST, f"cap must be 0 (none) .. {100 * dom.record.vcpus} (% of one CPU)")
        reply = self._call(dom, "sched", **args)
        for key in ("cpu_weight", "cap", "cpus"):
            if key in args:
                setattr(dom.record, key, args[key])
        return reply

    def _op_sched_credit(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("domain") is None:
            return {"domains": [{"name": d.name, "domid": d.record.domid, **self._sched(d)}
                                for d in self.domains.values()]}  # fmt: skip
        dom = self._domain(req)
        return {"domains": [{"name": dom.name, "domid": dom.record.domid,
                             **self._sched(dom, cpu_weight=req.get("weight"), cap=req.get("cap"))}]}  # fmt: skip

    def _op_vcpu_pin(self, req: dict[str, Any]) -> dict[str, Any]:
        dom = self._domain(req)
        if req.get("vcpu") not in (0, "all"):
            raise ApiError(api.E_BAD_REQUEST, f"{dom.name} has 1 vCPU (0); got {req.get('vcpu')!r}")
        cpus = req.get("cpus")
        if cpus == "all":
            cpus = sorted(os.sched_getaffinity(0))
        if not isinstance(cpus, list) or not cpus or not all(isinstance(c, int) for c in cpus):
            raise ApiError(api.E_BAD_REQUEST, "cpus must be a non-empty list of host CPU numbers, or 'all'")
        return self._sched(dom, cpus=cpus)

    def _op_console(self, req: dict[str, Any]) -> dict[str, Any]:
        """Hand the client a connection to the domain's console (several viewers may attach)."""
        dom = self._domain(req)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(dom.rundir / "console.sock"))
        except OSError as e:
            sock.close()
            raise ApiError(api.E_FAILED, f"{dom.name}: console: {e.strerror or e}") from None
        return {"name": dom.name, "_fds": [sock.detach()]}

    def _op_top(self, req: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for dom in sorted(self.domains.values(), key=lambda d: d.record.domid):
            summary = self._summary(dom)
            rss = read = written = 0
            for p in _processes(dom.last_pids):
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
                    io = p.io_counters()
                    read, written = read + io.read_bytes, written + io.write_bytes
            summary |= {"rss_bytes": rss, "read_bytes": read, "write_bytes": written}
            rows.append(summary)
        return {"domains": rows, "time": time.time()}

    def _op_info(self, req: dict[str, Any]) -> dict[str, Any]:
        from slimvisor.host.cgroup import cgroups_available
        from slimvisor.jail import uid_range

        vm = psutil.virtual_memory()
        return {
            "host": platform.node(), "release": platform.release(), "machine": platform.machine(),
            "nr_cpus": os.cpu_count(), "total_memory_mib": vm.total >> 20, "free_memory_mib": vm.available >> 20,
            "slimvisor_version": __version__, "build": build_id(), "api_versions": list(api.SUPPORTED_VERSIONS),
            "features": list(FEATURES), "engines": {"pv": "uml", "hvm": "not supported"},
            "cgroups": cgroups_available(), "domains": len(self.domains), "xenstore": str(self.xenstore_path),
            "jail_uids": "-".join(map(str, uid_range())),
            "uptime_s": round(time.time() - self.started), "pid": os.getpid(),
        }  # fmt: skip

    def _op_dmesg(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"lines": list(self.dmesg.lines)}

    def _op_daemon_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        """Stop once this reply is sent, as on SIGTERM: domains keep running (their supervisors are not ours)."""
        log.info("stopping on request; %d domains keep running", len(self.domains))
        self.stopping = True
        return {"pid": os.getpid()}


def _is_supervisor(pid: int) -> bool:
    try:
        return " ".join(psutil.Process(pid).cmdline()).startswith("slimvisor-supervisor")
    except psutil.Error:
        return False


def _processes(pids: list[int]) -> list[psutil.Process]:
    """The domain's processes: each engine process with its children (UML's helpers), the backend."""
    out: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimvisord", description="slimvisor's toolstack daemon")
    parser.add_argument("--socket", type=Path, default=None, help="API socket [default: RUN/slimvisord.sock]")
    parser.add_argument("--daemonize", action="store_true", help="detach and log to /var/log/slimvisor")
    args = parser.parse_args(argv)
    sock_path = args.socket or api.socket_path()
    lock = daemonctl.take_lock()
    if lock is None:
        print("slimvisord: already running", file=sys.stderr)
        return 0 if args.daemonize else 1
    if args.daemonize:
        _daemonize()
    daemonctl.record_pid(lock)  # how `slimvisor daemon stop` (and anyone) finds this daemon
    from setproctitle import setproctitle

    setproctitle("slimvisord")
    logging.basicConfig(level=logging.INFO, format="slimvisord: %(message)s")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a few fds per domain: hundreds of domains
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = Daemon(sock_path, state_dir() / "xenstore.db")

    def on_signal(signum: int, frame: object) -> None:
        daemon.stopping = True

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    daemon.loop.add_reader(wake_r, lambda: _drain(wake_r))
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    daemon.start()
    try:
        daemon.serve()
    finally:
        daemon.close()
        daemonctl.clear_pid(lock)
    return 0


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 512)


def _daemonize() -> None:
    if os.fork() != 0:
        os._exit(0)
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_dir() / "slimvisord.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


if __name__ == "__main__":
    sys.exit(main())
