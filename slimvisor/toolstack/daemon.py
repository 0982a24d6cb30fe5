"""slimvisord: dom0's toolstack daemon. Registry of domains, the public API, and the xenstore.

This module is the daemon's life (start, re-attach, supervisors' ends, crashes) and the API's
framing (JSON lines, hello, dispatch); the operations live in modules by topic (`domains`,
`scheduling`, `cluster`, `xenstore`), which type the daemon as `registry.Toolstack`.

It owns no domain's processes itself: each domain has a supervisor (slimvisor.domain.supervisor)
that outlives the daemon. The daemon finds them again by scanning RUN/domains at start, so a
daemon killed with SIGKILL and started again lists, controls and serves the same domains and the
same xenstore (SQLite); also one killed in the middle of an operation (a run directory being
created is locked until its supervisor wrote state.json: the next daemon waits on that lock, then
keeps what a supervisor runs and clears the rest). One event loop serves the API socket, the xenstore sockets (tools and
every guest's vsock channel) and the supervisors' exits (pidfds).

    python3 -m slimvisor.toolstack.daemon [--daemonize] [--socket PATH]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from slimvisor import __version__
from slimvisor.domain import supervisor
from slimvisor.domain.supervisor import Record, domains_dir
from slimvisor.model import units
from slimvisor.model.lifecycle import Action
from slimvisor.runtime.build import BUILD_MISMATCH, build_id
from slimvisor.runtime.control import ControlError
from slimvisor.runtime.errors import SlimvisorError
from slimvisor.runtime.loop import EventLoop
from slimvisor.runtime.paths import log_dir, runtime_base, state_dir
from slimvisor.toolstack import api, cluster, daemonctl, domains, migration, pool, scheduling, xenstore
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.errors import api_code
from slimvisor.toolstack.registry import Domain, Operation, Toolstack, call, is_supervisor
from slimvisor.xenstore.server import XenstoreServer
from slimvisor.xenstore.store import Store, domain_path

log = logging.getLogger("slimvisord")

FEATURES = (
    "hello", "create", "list", "domain-info", "pause", "unpause", "shutdown", "reboot", "destroy", "mem-set",
    "sched-credit", "vcpu-pin", "console", "top", "info", "dmesg", "cluster-up", "cluster-down", "cluster-list",
    "daemon-stop", "migrate", "migrate-receive", "save", "restore",
    "pool-init", "pool-join", "pool-leave", "pool-list", "switch-start",
)  # fmt: skip
DMESG_LINES = 2000


class _ApiConnection:
    def __init__(self, sock: socket.socket, remote: bool = False) -> None:
        self.sock = sock
        self.remote = remote  # a pool member over TCP: no fds can pass (a console's are refused)
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
        self.pool: pool.Pool | None = None

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
        self._rejoin()
        log.info("slimvisord %s (API %d) serving %s, %d domains", build_id(), api.API_VERSION, self.sock_path,
                 len(self.domains))  # fmt: skip

    def serve(self) -> None:
        while not self.stopping:
            self.loop.run_once(None)

    def close(self) -> None:
        """Stop serving; domains keep running (their supervisors are not ours)."""
        if self.pool is not None:
            self.pool.close()
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

    # -- the pool (toolstack.pool) ------------------------------------------------------------------
    def enter_pool(self, membership: pool.Membership, first: bool) -> pool.Pool:
        member = pool.Pool(self, membership, lambda sock: self.adopt(sock, remote=True))
        member.start(first)
        self.pool = member
        for dom in self.domains.values():  # domains another member would restart follow the lease now
            with contextlib.suppress(Exception):
                call(dom, "fence", path=member.fence_path(dom.record.policies.on_crash.value))
        return member

    def leave_pool(self) -> None:
        assert self.pool is not None
        self.pool.close(leave=True)
        self.pool = None

    def _rejoin(self) -> None:
        """A member's daemon, started again, rejoins its pool (retrying while etcd cannot be reached)."""
        membership = pool.Membership.load()
        if membership is None or self.pool is not None or self.stopping:
            return
        try:
            self.enter_pool(membership, first=False)
        except (SlimvisorError, OSError) as e:
            log.warning("pool %s: cannot rejoin yet (%s); trying again", membership.pool, e)
            self.loop.call_later(2.0, self._rejoin)

    def adopt(self, sock: socket.socket, remote: bool = False) -> None:
        """Serve a connection as an API connection: a local client's, or an authenticated pool member's."""
        sock.setblocking(False)
        conn = self.clients[sock.fileno()] = _ApiConnection(sock, remote)
        self.loop.add_reader(sock.fileno(), lambda: self._readable(conn))

    def _rescan(self) -> None:
        """Find the domains that supervisors run now; clear what dead ones left behind."""
        alive: set[int] = set()
        for rundir in sorted(domains_dir().iterdir()):
            supervisor.wait_started(rundir)  # one being created when the last daemon died: its supervisor's?
            try:
                record = Record.load(rundir / "state.json")
                info = supervisor.call(rundir, "info", reply_timeout=5)
                dom = Domain(record, rundir, last_pids=info["pids"])
            except ControlError as e:
                if str(e).startswith(BUILD_MISMATCH) and is_supervisor(record.supervisor_pid):
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
            if dom.crashed is None and dom.foreign is None:  # a daemon killed in mem-set wrote only state.json
                with contextlib.suppress(Exception):
                    xenstore.set_memory_target(self, record.domid, record.memory_mib * units.MiB)
            self.watch(dom)
            alive.add(record.domid)
            log.info("re-attached %s (domain %d)", record.name, record.domid)
        for name in self.dom0.directory("/local/domain") if self.dom0.exists("/local/domain") else []:
            if name.isdigit() and int(name) not in alive:
                with contextlib.suppress(Exception):
                    self.dom0.rm(domain_path(int(name)))

    def watch(self, dom: Domain) -> None:
        """Register a started domain and follow its supervisor's life on a pidfd."""
        self.domains[dom.name] = dom
        xenstore.serve_domain(self, dom.record.domid, dom.rundir)
        if dom.crashed is not None:
            return
        if is_supervisor(dom.record.supervisor_pid):
            with contextlib.suppress(OSError):
                dom.pidfd = os.pidfd_open(dom.record.supervisor_pid)
                self.loop.add_reader(dom.pidfd, lambda: self.supervisor_gone(dom))
        if dom.pidfd < 0:
            self.loop.call_later(0, lambda: self.supervisor_gone(dom))

    def supervisor_gone(self, dom: Domain) -> None:
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
        if self.pool is not None:
            self.pool.gone(dom)
        xenstore.forget(self, dom.record.domid)
        if dom.rundir.exists():  # a supervisor killed while destroying, or a preserved crash
            self._clean_dead(dom.rundir, dom.last_pids)
        log.info("%s (domain %d) is gone", dom.name, dom.record.domid)

    def _crashed(self, dom: Domain, reason: str) -> None:
        """A domain whose supervisor died: take down what is left, then apply its on_crash."""
        action = dom.record.policies.on_crash
        log.warning("%s: crashed: %s; on_crash=%s", dom.name, reason, action)
        if is_supervisor(dom.record.supervisor_pid):  # alive but not answering
            with contextlib.suppress(ProcessLookupError):
                os.kill(dom.record.supervisor_pid, signal.SIGKILL)
        self._clean_dead(dom.rundir, dom.last_pids, keep_dir=True)
        allowed = dom.restarts.allow(time.monotonic())  # every crash counts, whatever its action
        if action.restarts and allowed and dom.record.spec:
            del self.domains[dom.name]
            try:
                new = domains.launch(self, dom.record, dom.rundir)
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
        self.supervisor_gone(dom)

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
        self.adopt(sock)

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
        handoff = False  # the connection now belongs to a domain's supervisor (a migration's state)
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
                if op in migration.HANDOFF:
                    req["_connection"] = conn.sock
                reply = OPERATIONS[op](self, req)
                fds = reply.pop("_fds", [])
                if fds and conn.remote:
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    raise ApiError(api.E_NOT_SUPPORTED, f"{op} passes fds: not over the pool link (run it there)")
                handoff = reply.pop("_handoff", False)
            reply = {"id": req_id, "ok": True, **reply}
        except SlimvisorError as e:  # an ApiError, or a typed error: its code from toolstack/errors.py
            reply = {"id": req_id, "error": {"code": api_code(e), "message": str(e)}}
        except (OSError, RuntimeError) as e:
            reply = {"id": req_id, "error": {"code": api.E_FAILED, "message": str(e)}}
        except Exception as e:  # a bug answers this request; the daemon keeps serving
            log.exception("internal error on %r", line[:200])
            reply = {"id": req_id, "error": {"code": api.E_FAILED, "message": f"internal error: {e}"}}
        self._reply(conn, reply, fds)
        if handoff and conn.sock.fileno() >= 0:
            self._drop(conn)  # our copy only: the supervisor reads the state on its own

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

    def log_lines(self) -> list[str]:
        return list(self.dmesg.lines)


# -- the daemon's own operations -----------------------------------------------------------------
def op_info(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    from slimvisor.host.cgroup import cgroups_available
    from slimvisor.jail import uid_range

    vm = psutil.virtual_memory()
    return {
        "host": platform.node(), "release": platform.release(), "machine": platform.machine(),
        "nr_cpus": os.cpu_count(), "total_memory_mib": vm.total >> 20, "free_memory_mib": vm.available >> 20,
        "slimvisor_version": __version__, "build": build_id(), "api_versions": list(api.SUPPORTED_VERSIONS),
        "features": list(FEATURES), "engines": _engines(),
        "cgroups": cgroups_available(), "domains": len(ts.domains), "xenstore": str(ts.xenstore_path),
        "jail_uids": "-".join(map(str, uid_range())),
        "uptime_s": round(time.time() - ts.started), "pid": os.getpid(),
    }  # fmt: skip


def op_dmesg(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return {"lines": ts.log_lines()}


def op_daemon_stop(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """Stop once this reply is sent, as on SIGTERM: domains keep running (their supervisors are not ours)."""
    log.info("stopping on request; %d domains keep running", len(ts.domains))
    ts.stopping = True
    return {"pid": os.getpid()}




# Every operation of the API but hello (the framing's own), by topic; the order of FEATURES is the API's.
OPERATIONS: dict[str, Operation] = {
    **domains.OPERATIONS, **scheduling.OPERATIONS, **cluster.OPERATIONS, **migration.OPERATIONS, **pool.OPERATIONS,
    "info": op_info, "dmesg": op_dmesg, "daemon-stop": op_daemon_stop,
}  # fmt: skip
assert set(OPERATIONS) == set(FEATURES) - {"hello"}, "an operation without a handler, or one not in FEATURES"


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



def _engines() -> dict[str, str]:
    """Which engine runs each domain type here; HVM/PVH with the accelerator QEMU uses and why."""
    from slimvisor.engines.qemu.engine import host_accel, qemu_binary

    if qemu_binary() is None:
        qemu = "not available: install qemu-system-x86"
    else:
        accel = host_accel()
        qemu = f"qemu ({accel.name}: {accel.reason})"
    return {"pv": "uml", "pvh": qemu, "hvm": qemu}

if __name__ == "__main__":
    sys.exit(main())
