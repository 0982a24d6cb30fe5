"""A domain's supervisor: the dom0 process that owns one domain for its whole life.

The daemon forks one per domain (`spawn`) and keeps nothing it cannot find again: everything about
the domain lives here and in its run directory (RUN/domains/NAME: state.json, supervisor.sock,
console.sock), so domains outlive the daemon and a restarted daemon re-attaches by scanning.
The supervisor owns the engine (a UML process tree), the device backends, switch ports, the console
(a ring buffer, a log and any number of viewers, as xenconsoled), the domain's cgroup, and the
lifecycle policies on_poweroff / on_reboot / on_crash of xl.cfg.

Its control socket speaks dom0-internal JSON (`slimvisor.runtime.control`); every request carries the
build id and a mismatched build is refused, since daemon and supervisors change in lock-step.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimvisor.devices.registry import model_modules
from slimvisor.domain.console import ConsolePump
from slimvisor.domain.devices import LocalDevices
from slimvisor.domain.incarnation import Incarnation
from slimvisor.domain.isolation import Isolation
from slimvisor.domain.migration import Incoming, Outgoing
from slimvisor.domain.qsd import StorageDaemon
from slimvisor.engines import engine_for
from slimvisor.engines.base import EngineError, Instance, Unsupported
from slimvisor.host.cgroup import pin, pin_thread
from slimvisor.jail import jail_root
from slimvisor.model import units
from slimvisor.model.lifecycle import Action, Event, Policies, RestartLimiter, State
from slimvisor.model.spec import DEFAULT_UML, DomainSpec, SpecError
from slimvisor.runtime import fence
from slimvisor.runtime.build import build_id, mismatch
from slimvisor.runtime.control import ControlServer, request
from slimvisor.runtime.logfile import RotatingLog
from slimvisor.runtime.paths import log_dir, runtime_base
from slimvisor.vhostuser.server import VhostUserServer

log = logging.getLogger("slimvisor.supervisor")

RING_BYTES = 128 * 1024  # console history a new viewer sees first
VIEWER_BACKLOG = 1 << 20  # a viewer further behind than this is dropped, never waited for
FENCE_CHECK_S = 0.25  # how often a pool's restartable domain looks at its host's lease (runtime.fence)



def domains_dir() -> Path:
    path = runtime_base() / "domains"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


STARTING = "starting"  # a run dir's lock, held by whoever creates the domain until state.json is written


def hold_starting(rundir: Path) -> int:
    """Lock a new run dir as being started; the fd (inherited by `spawn`'s children) holds it.

    The daemon holds it from the run dir's making, the new supervisor until it wrote state.json:
    a daemon that finds a run dir without state.json knows from it whether anyone still starts it."""
    fd = os.open(rundir / STARTING, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_started(rundir: Path, timeout: float = 30.0) -> None:
    """Return once nobody holds `rundir`'s starting lock (or after `timeout`): its state.json is
    then written, or never will be."""
    try:
        fd = os.open(rundir / STARTING, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
    finally:
        os.close(fd)


@dataclass
class Record:
    """What state.json says about a domain: enough for a restarted daemon to list it."""

    domid: int
    name: str
    uuid: str
    memory_mib: int
    maxmem_mib: int
    vcpus: int
    policies: Policies
    created: float = field(default_factory=time.time)
    supervisor_pid: int = 0
    build: str = field(default_factory=build_id)
    config_file: str | None = None
    cpu_weight: int | None = None
    cap: int | None = None
    cpus: list[int] | None = None
    spec: dict[str, Any] | None = None  # DomainSpec.to_json(): the toolstack restarts a crashed domain from it
    initrd: str | None = None
    uid: int | None = None  # the uid its engine runs as (leased for the domain's life)
    jail: str | None = None  # the host directory its engine's jail root is mounted on (in the jail's namespace)
    vcpu_cpus: dict[str, list[int]] | None = None  # vcpu-pin of single vCPUs: vCPU number -> host CPUs
    fence: str | None = None  # in a pool, for a domain another member would restart: the host's lease file

    @classmethod
    def load(cls, path: Path) -> Record:
        raw = json.loads(path.read_text())
        raw["policies"] = Policies(**raw["policies"])
        return cls(**raw)

    def save(self, rundir: Path) -> None:
        tmp = rundir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        tmp.rename(rundir / "state.json")


class _Viewer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.backlog = bytearray()


class Supervisor:
    def __init__(self, spec: DomainSpec, record: Record, rundir: Path, initrd: str | None,
                 arriving: bool = False) -> None:  # fmt: skip
        """`arriving`: the domain comes from elsewhere (migration, restore): its console log goes on."""
        self.spec = spec
        self.record = record
        self.rundir = rundir
        self.initrd = initrd
        self.loop = VhostUserServer(unsealed_memory=True)  # its front-end is UML in the jail
        self.state = State.RUNNING
        self.reason = ""
        self.done = False
        self.current: Incarnation | None = None
        self.restarts = RestartLimiter()
        self.requested: Event | None = None  # poweroff or reboot after a shutdown/reboot request
        self.requested_via = ""  # how it was asked for
        self.ring = bytearray()
        self.viewers: dict[int, _Viewer] = {}
        self.console = ConsolePump(self.loop, self._guest_output)
        log_path = log_dir() / f"{spec.name}.console.log"
        if not arriving:
            with contextlib.suppress(FileNotFoundError):  # a new domain of the same name starts a new log
                log_path.rename(log_path.with_suffix(".log.old"))
        self.console_log = RotatingLog(log_path)  # bounded, mode 0640
        self.isolation: Isolation | None = None
        self.storage: StorageDaemon | None = None
        self.departure: Outgoing | None = None  # the domain's state leaving (migrate, save)
        self.after_departure = "destroy"  # then: destroy, keep (running as it was), pause
        self.was_paused = False
        self.arrival: Incoming | None = None  # the domain's state arriving (a migration's target, restore)
        self.stay_paused = False  # after the arrival (create -p, migrate -p, restore -p)

    # -- life ------------------------------------------------------------------------------------
    def start(self, paused: bool = False, incoming: tuple[int, bool] | None = None) -> None:
        """Boot the first incarnation and open the sockets; raises when the domain cannot start.

        `paused` (xl create -p): the domain counts as paused from now on, and is stopped through
        its mconsole as soon as UML opens it, early in its boot. `incoming` (fd, peer): the domain
        is not booted but arrives on `fd`, from a migration's source (`peer`) or a saved file; it
        is paused until it has arrived, then runs (stays paused with `paused`).
        """
        self.isolation = Isolation(self.spec.name, self.record.maxmem_mib, overhead=engine_for(self.spec).overhead)
        self.record.uid, self.record.jail = self.isolation.uid, str(jail_root(self.rundir))
        if incoming is not None:
            fd, peer = incoming
            self.arrival = Incoming(self.loop, fd, peer=peer, done=self._arrived)
            self.stay_paused, paused = paused, False
        self.local = LocalDevices(self.spec, self.rundir, incoming=incoming is not None)
        self.storage = StorageDaemon(self.spec, self.rundir)  # its disks too are served for the domain's life
        self.served = self.storage.devices(self.local.serve_on(self.loop))  # for the domain's life: UML reconnects
        self._boot(paused, incoming=incoming is not None)
        self.control = ControlServer(self.loop, str(self.rundir / "supervisor.sock"), self._handle)
        self.console_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.console_listener.bind(str(self.rundir / "console.sock"))
        os.chmod(self.rundir / "console.sock", 0o600)
        self.console_listener.listen(8)
        self.console_listener.setblocking(False)
        self.loop.add_reader(self.console_listener.fileno(), self._accept_viewer)
        if paused:
            self.state = State.PAUSED
            self._pause_when_ready(self.current, time.monotonic() + 60)
        self._check_fence()

    def _check_fence(self) -> None:
        """A pool's restartable domain ends once its host's lease may have expired: by then another
        member may start it (docs/pool.md). Checked every FENCE_CHECK_S, whatever the daemon does."""
        if self.done or self.record.fence is None:
            return
        lease = Path(self.record.fence)
        if fence.expired(lease):
            fence.mark(lease, self.spec.name)
            self._say("fenced: this host's pool lease may have expired; destroyed, for the pool to start again")
            self.destroy()
            return
        self.loop.call_later(FENCE_CHECK_S, self._check_fence)

    def _op_fence(self, req: dict[str, Any]) -> dict[str, Any]:
        """The daemon's say on fencing: `path` the lease file to follow, or None (the host left its pool)."""
        path = req.get("path")
        was, self.record.fence = self.record.fence, str(path) if path is not None else None
        self.record.save(self.rundir)
        if was is None and self.record.fence is not None:
            self._check_fence()
        return {"ok": True}

    def _pause_when_ready(self, inc: Incarnation | None, deadline: float) -> None:
        if inc is not self.current or self.state != State.PAUSED:
            return  # unpaused or ended meanwhile
        try:
            self._stop(timeout=0.2)  # the loop keeps serving; a late answer still stopped it ("Already stopped")
        except RuntimeError as e:
            if time.monotonic() > deadline:
                self._say(f"could not pause: {e}")
                self.state = State.RUNNING
                return
            self.loop.call_later(0.02, lambda: self._pause_when_ready(inc, deadline))

    def serve(self) -> None:
        while not self.done:
            self.loop.run_once(None)

    def _boot(self, paused: bool = False, incoming: bool = False) -> None:
        assert self.isolation is not None
        self.current = inc = Incarnation(self.spec, self.rundir, self.initrd, self.isolation.identity(), self.served,
                                         paused, incoming)  # fmt: skip
        assert inc.instance is not None
        self._apply_pinning()
        if not incoming:  # an arriving domain's balloon arrives with it
            self._apply_memory_target()
        self.state = State.MIGRATING if incoming else State.RUNNING
        self.console.attach(inc.out_r, inc.in_w)
        self.loop.add_reader(inc.instance.pidfd, lambda: self._engine_exited(inc))
        self.loop.add_reader(inc.instance.event_fd(), lambda: self._notified(inc))

    def _unwatch(self, inc: Incarnation) -> None:
        self.console.detach()
        if inc.instance is not None:
            self.loop.remove_reader(inc.instance.pidfd)
            self.loop.remove_reader(inc.instance.event_fd())

    def _teardown(self) -> None:
        if self.current is not None:
            self._unwatch(self.current)
            self.current.drain(self._output)
            self.current.close()
            self.current = None

    def _ended(self, event: Event, reason: str) -> None:
        """The incarnation ended by `event` (poweroff, reboot, crash): apply the domain's policy."""
        self._teardown()
        if self.requested is not None and event != Event.CRASH:  # the guest went down because we asked
            reason = f"{self.requested} requested through {self.requested_via}; {reason}"
            event, self.requested = self.requested, None
        action = self.record.policies.on(event)
        self._say(f"{reason}; on_{event}={action}")
        if action.restarts:
            if not self.restarts.allow(time.monotonic()):
                self.state, self.reason = State.CRASHED, f"{reason}; restarted too often, preserved"
                self._say(self.reason)
                return
            if action == Action.RENAME_RESTART:
                _keep_log_copy(self.spec.name)
            try:
                self._boot()
            except Exception as e:
                self.state, self.reason = State.CRASHED, f"restart failed: {e}"
                self._say(self.reason)
            return
        if action == Action.PRESERVE:
            self.state, self.reason = (State.CRASHED if event == Event.CRASH else State.SHUTDOWN), reason
            return
        self.reason = reason
        self.destroy()

    def destroy(self, then: Callable[[], None] | None = None) -> None:
        """Tear everything down; the supervisor process then exits. `then` runs once the engine is
        gone and the devices (their disks) are closed: a migration's GO to its target."""
        if self.done:
            return
        self.state = State.DYING
        self._teardown()
        for viewer in list(self.viewers.values()):
            self._drop_viewer(viewer)
        with contextlib.suppress(AttributeError):
            self.control.close()
            self.loop.remove_reader(self.console_listener.fileno())
            self.console_listener.close()
        if self.isolation is not None:
            self.isolation.close()
        if self.storage is not None:
            self.storage.close()
        self.loop.close()  # the devices, their sockets and files
        if then is not None:
            then()
        self.console_log.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        self.done = True

    def _say(self, text: str) -> None:
        log.info("%s: %s", self.spec.name, text)
        self._output(f"\r\n[slimvisor: {self.spec.name}: {text}]\r\n".encode())

    # -- engine events ---------------------------------------------------------------------------
    # Each callback is bound to its incarnation: an event already collected for a torn-down one
    # (whose fd number a new incarnation may reuse) is ignored.
    def _guest_output(self, data: bytes) -> None:
        self._output(data)
        if self.current is not None and self.current.saw(data):
            self._ended(Event.REBOOT, "guest rebooted")

    def _notified(self, inc: Incarnation) -> None:
        if inc is not self.current or inc.instance is None:
            return
        started = inc.started
        rebooted = inc.notified()
        statuses, inc.migration = inc.migration, []
        for status in statuses:
            for side in (self.departure, self.arrival):
                if side is not None and not side.finished:
                    side.engine_status(status)
        if inc is not self.current:  # a migration's end took the domain down
            return
        if rebooted:
            self._ended(Event.REBOOT, "guest rebooted")
        elif inc.started and not started:
            self._apply_pinning()  # its vCPU threads exist now
            if self.arrival is not None and not self.arrival.finished:
                self.arrival.start(inc.instance)
            else:
                self._apply_memory_target()  # and its monitor answers

    def _engine_exited(self, inc: Incarnation) -> None:
        if inc is not self.current or inc.instance is None:
            return
        if self.arrival is not None and not self.arrival.finished:  # it never ran here: nothing to apply
            self.arrival.engine_status("failed")
            return
        if self.departure is not None and not self.departure.finished:
            self.departure.engine_status("failed")  # the domain's on_crash follows below
        rc = inc.instance.wait()
        inc.notified()  # what it reported just before it exited (a reboot, a panic) tells why
        inc.drain(self._output)
        self._ended(*inc.exit_reason(rc))

    # -- console ---------------------------------------------------------------------------------
    def _output(self, data: bytes) -> None:
        self.console_log.write(data)
        self.ring += data
        del self.ring[:-RING_BYTES]
        for viewer in list(self.viewers.values()):
            self._send(viewer, data)

    def _send(self, viewer: _Viewer, data: bytes) -> None:
        if not viewer.backlog:
            try:
                data = data[viewer.sock.send(data) :]
            except BlockingIOError:
                pass
            except OSError:
                self._drop_viewer(viewer)
                return
            if not data:
                return
            self.loop.add_writer(viewer.sock.fileno(), lambda: self._send(viewer, b""))
        viewer.backlog += data
        if len(viewer.backlog) > VIEWER_BACKLOG:
            self._drop_viewer(viewer)
            return
        if not data:  # writable again
            try:
                del viewer.backlog[: viewer.sock.send(viewer.backlog)]
            except BlockingIOError:
                return
            except OSError:
                self._drop_viewer(viewer)
                return
            if not viewer.backlog:
                self.loop.remove_writer(viewer.sock.fileno())

    def _accept_viewer(self) -> None:
        try:
            sock, _ = self.console_listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        viewer = self.viewers[sock.fileno()] = _Viewer(sock)
        self.loop.add_reader(sock.fileno(), lambda: self._viewer_input(viewer))
        self._send(viewer, bytes(self.ring))

    def _viewer_input(self, viewer: _Viewer) -> None:
        try:
            data = viewer.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_viewer(viewer)
            return
        self.console.type(data)  # refused past MAX_PENDING_INPUT: a guest that does not read drops it

    def _drop_viewer(self, viewer: _Viewer) -> None:
        fd = viewer.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        self.viewers.pop(fd, None)
        viewer.sock.close()

    # -- control ---------------------------------------------------------------------------------
    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("build") != build_id():
            return {"error": mismatch(build_id(), req.get("build"))}
        op = req.get("op")
        name = f"_op_{str(op).replace('-', '_')}"
        handler: Callable[[dict[str, Any]], dict[str, Any]] | None = getattr(self, name, None)
        if handler is None:
            return {"error": f"not supported: {op!r}"}
        return handler(req)

    def _op_info(self, req: dict[str, Any]) -> dict[str, Any]:
        pids = self.current.pids() if self.current is not None else []
        limits = self.isolation.limits if self.isolation is not None else {}
        migration: dict[str, Any] | None = None
        if self.departure is not None:
            migration = {"direction": "out", **self.departure.progress}
        elif self.arrival is not None:
            migration = {"direction": "in", **self.arrival.figures, "status": self.arrival.status}
        return {"record": asdict(self.record), "state": self.state, "reason": self.reason, "pids": pids,
                "supervisor": os.getpid(), "viewers": len(self.viewers), "limits": limits,
                "migration": migration}  # fmt: skip

    # -- migration, save, restore (domain.migration) ---------------------------------------------
    def _op_migrate(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send the domain's state down the fd passed with the request: to a migration's target
        (`peer`, the handshake) or into a file (save). `then`: destroy (migrate, save), keep it
        running as it was (save -c) or pause it (save -p) once the state is out."""
        fds: list[int] = req.get("_fds", [])
        if len(fds) != 1:
            return {"error": "migrate takes the channel's fd"}
        then, live, peer = req.get("then", "destroy"), bool(req.get("live", True)), bool(req.get("peer", True))
        if then not in ("destroy", "keep", "pause"):
            return {"error": f"then must be destroy, keep or pause, not {then!r}"}
        if self.current is None or self.current.instance is None or self.state not in (State.RUNNING, State.PAUSED):
            return {"error": f"domain is {self.state}"}
        try:
            engine_for(self.spec).check_migratable(self.spec)
        except Unsupported as e:
            return {"error": str(e)}
        self.was_paused, self.after_departure = self.state == State.PAUSED, then
        warnings = []
        if live and (why := engine_for(self.spec).why_not_live(self.spec)) is not None:
            live = False
            warnings.append(why)
        self.state = State.MIGRATING
        file = req.get("file")
        paths_ok = isinstance(file, list) and len(file) == 2 and all(isinstance(f, str) for f in file)
        if file is not None and not paths_ok:
            return {"error": "file is [part, final]: the save file's paths"}
        self.departure = Outgoing(self.loop, self.current.instance, fds.pop(), peer=peer,
                                  live=live and not self.was_paused, done=self._departed,
                                  file=(file[0], file[1]) if file else None)  # fmt: skip
        self._say(f"migration out begins ({'live' if live and not self.was_paused else 'stopped'}, "
                  f"{'to a peer' if peer else 'to a file'})")  # fmt: skip
        return {"ok": True, "warnings": warnings}

    def _departed(self, why: str | None) -> None:
        assert self.departure is not None
        instance = self.current.instance if self.current is not None else None
        if why is not None or self.after_departure != "destroy":
            if why is not None:
                self._say(f"migration out failed: {why}; the domain stays here")
            resume = not self.was_paused and (why is not None or self.after_departure == "keep")
            if instance is not None and resume:
                with contextlib.suppress(EngineError):  # an engine that exited: its on_crash follows
                    instance.resume()  # QEMU's `cont` from postmigrate, or a no-op on a running guest
            if instance is not None:
                self.state = State.RUNNING if resume else State.PAUSED
            if why is None:
                self._say(f"state saved; the domain {'runs on' if resume else 'stays paused'}")
            return
        self.reason = "migrated" if self.departure.peer else "saved"
        self._say(f"state {'sent to the target' if self.departure.peer else 'saved'}; "
                  "the domain is stopped and destroyed here")  # fmt: skip
        departure = self.departure

        def go() -> None:
            if (problem := departure.go()) is not None:
                log.error("%s: could not tell the target to run: %s", self.spec.name, problem)

        self.destroy(then=go if departure.peer else None)

    def _arrived(self, why: str | None) -> None:
        if why is not None:
            self._say(f"migration in failed: {why}; destroyed")
            self.reason = f"migration in failed: {why}"
            self.destroy()
            return
        try:
            self.local.activate_disks()  # the source closed them before it said GO
        except OSError as e:
            self._say(f"the domain arrived but its disks cannot be opened: {e}; destroyed")
            self.destroy()
            return
        instance = self.current.instance if self.current is not None else None
        if instance is not None and not self.stay_paused:
            with contextlib.suppress(EngineError):  # an engine that exited: its on_crash follows
                instance.resume()
        self.state = State.PAUSED if self.stay_paused else State.RUNNING
        self._apply_pinning()
        self.record.save(self.rundir)
        self._say(f"arrived; {'paused' if self.stay_paused else 'running'}")

    def _engine(self, request: Callable[[Instance], None]) -> None:
        """One request to the running engine; RuntimeError, with the message callers show, if it fails."""
        if self.current is None or self.current.instance is None or self.state not in (State.RUNNING, State.PAUSED):
            raise RuntimeError(f"domain is {self.state}")
        try:
            request(self.current.instance)
        except EngineError as e:
            raise RuntimeError(str(e)) from e

    def _op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.state != State.PAUSED:
            self._stop()
            self.state = State.PAUSED
        return {"ok": True}

    def _stop(self, timeout: float = 5.0) -> None:
        self._engine(lambda instance: instance.pause(timeout))

    def _op_unpause(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.state != State.PAUSED:
            return {"error": f"domain is {self.state}, not paused"}
        with contextlib.suppress(RuntimeError):  # not stopped yet (create -p): nothing to resume
            self._engine(lambda instance: instance.resume())
        self.state = State.RUNNING
        return {"ok": True}

    def _op_shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        """The guest's own path down (ctrl-alt-del through mconsole), then destroy after `timeout`."""
        reboot = bool(req.get("reboot"))
        timeout = req.get("timeout", 60)
        if not isinstance(timeout, int | float) or timeout <= 0:
            return {"error": "timeout must be a positive number of seconds"}
        if self.state == State.PAUSED:
            self._op_unpause(req)
        via = req.get("via")
        if via is None:  # else the toolstack asks the guest itself (Xen's control/shutdown)
            self._engine(lambda instance: instance.request_shutdown())
            via = engine_for(self.spec).shutdown_via
        self.requested = Event.REBOOT if reboot else Event.POWEROFF
        self.requested_via = str(via)
        incarnation = self.current

        def overdue() -> None:
            if self.current is incarnation and not self.done:
                self._ended(self.requested or Event.POWEROFF, f"guest did not {'reboot' if reboot else 'shut down'} "
                            f"within {timeout} s: destroyed")  # fmt: skip

        self.loop.call_later(float(timeout), overdue)
        return {"ok": True}

    def _op_destroy(self, req: dict[str, Any]) -> dict[str, Any]:
        self.loop.call_later(0, self.destroy)
        return {"ok": True}

    def _apply_memory_target(self) -> None:
        """Every boot starts ballooned down to the domain's target (xl's memory= below maxmem=, or the
        last mem-set); an engine whose monitor is not up yet gets it once it says it started."""
        if self.record.memory_mib < self.spec.ram_mib:
            with contextlib.suppress(SpecError, EngineError):
                self._set_memory_target(self.record.memory_mib * units.MiB)

    def _set_memory_target(self, target: object) -> None:
        """The engine's balloon, or ours served beside it; SpecError or EngineError says why not."""
        if not isinstance(target, int):
            raise SpecError("target_bytes must be a non-negative multiple of 4096")
        instance = self.current.instance if self.current is not None else None
        if instance is None:
            raise SpecError(f"domain is {self.state}")
        try:
            instance.set_memory_target(target)
        except Unsupported:  # the engine has no balloon: ours, served beside it
            self.local.set_memory_target(target)

    def _op_mem_set(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.current is None:
            return {"error": f"domain is {self.state}"}
        target = req.get("target_bytes")
        try:
            self._set_memory_target(target)
        except (SpecError, EngineError) as e:
            return {"error": str(e)}
        assert isinstance(target, int)
        self.record.memory_mib = units.mib(target)  # state.json: a restarted daemon lists the new target
        self.record.save(self.rundir)
        return {"ok": True}

    def _op_sched(self, req: dict[str, Any]) -> dict[str, Any]:
        """Weight and cap (cgroup) and pinning (affinity); remembered so restarts keep them."""
        if "cpus" in req:
            self.record.cpus = req["cpus"]
            self._apply_pinning()
        cgroup = self.isolation.cgroup if self.isolation is not None else None
        for key in ("cpu_weight", "cap"):
            if key in req:
                if cgroup is None:
                    return {"error": "not supported on this host: no cgroup cpu controller"}
                (cgroup.set_weight if key == "cpu_weight" else cgroup.set_cap)(req[key])
                setattr(self.record, key, req[key])
        self.record.save(self.rundir)
        out: dict[str, Any] = {"cpus": self.record.cpus}
        if cgroup is not None:
            out |= {"cpu_weight": cgroup.weight(), "cap": cgroup.cap()}
        return out

    def _op_vcpu_pin(self, req: dict[str, Any]) -> dict[str, Any]:
        """Pin one vCPU's host thread (QEMU has one per vCPU); kept for the next boots too."""
        vcpu, cpus = req.get("vcpu"), req.get("cpus")
        if not isinstance(vcpu, int) or not 0 <= vcpu < self.spec.vcpus or not isinstance(cpus, list):
            return {"error": f"vcpu must be 0..{self.spec.vcpus - 1}, cpus a list of host CPUs"}
        threads = self._vcpu_threads()
        thread = threads[vcpu] if vcpu < len(threads) else None
        if thread is not None:
            try:
                pin_thread(thread, set(cpus))
            except ValueError as e:
                return {"error": str(e)}
        self.record.vcpu_cpus = {**(self.record.vcpu_cpus or {}), str(vcpu): sorted(cpus)}
        self.record.save(self.rundir)
        return {"cpus": sorted(cpus), "thread": thread}

    def _vcpu_threads(self) -> list[int]:
        """The engine's vCPU tasks now (none while it cannot say: QEMU before its monitor is up)."""
        with contextlib.suppress(EngineError):
            if self.current is not None and self.current.instance is not None:
                return self.current.instance.vcpu_threads()
        return []

    def _apply_pinning(self) -> None:
        if self.current is None or (self.record.cpus is None and not self.record.vcpu_cpus):
            return
        threads = self._vcpu_threads()
        if self.record.cpus is not None:
            pin(self.current.pids(), set(self.record.cpus))
            # The engine's vCPU tasks: UML runs the guest's processes in child processes of its own,
            # QEMU a thread per vCPU; affinity is inherited only by new ones, so these are pinned too.
            for task in threads:
                with contextlib.suppress(ValueError):  # it exited meanwhile
                    pin([task], set(self.record.cpus))
        for vcpu, cpus in (self.record.vcpu_cpus or {}).items():
            if int(vcpu) < len(threads):
                pin_thread(threads[int(vcpu)], set(cpus))


def _keep_log_copy(name: str) -> None:
    src = log_dir() / f"{name}.console.log"
    with contextlib.suppress(OSError):
        shutil.copyfile(src, log_dir() / f"{name}.console.log.{int(time.time())}")


# What a supervisor imports once it serves devices: imported in the daemon before it forks, their
# pages are shared by every supervisor instead of copied into each (density).
SUPERVISOR_MODULES = (
    *model_modules(), "slimvisor.storage.overlay", "slimvisor.host.cgroup", "setproctitle",
)  # fmt: skip


def preload() -> None:
    for module in SUPERVISOR_MODULES:
        importlib.import_module(module)
    from slimvisor.engines.uml import uml_filter
    from slimvisor.jail.spawn import shared_libraries

    uml_filter()  # computed once in the daemon, inherited by every supervisor it forks
    with contextlib.suppress(OSError):
        shared_libraries(DEFAULT_UML)


def spawn(spec: DomainSpec, record: Record, rundir: Path, initrd: str | None, paused: bool = False,
          incoming: tuple[int, bool] | None = None) -> int:  # fmt: skip
    """Fork a detached supervisor for a new domain; returns its pid once it booted or failed.
    `incoming`: (fd, peer) the domain arrives on, instead of booting (Supervisor.start).

    The supervisor is a grandchild in a session of its own, so it outlives the daemon. It reports
    through a pipe: "pid N" once its domain's engine runs, or the reason it could not start.
    """
    ready_r, ready_w = os.pipe()
    gc.collect()
    gc.freeze()  # the child's collections leave the pages it shares with the daemon alone (density)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(ready_r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _become_supervisor(spec, record, rundir, initrd, ready_w, paused, incoming)
        finally:
            os._exit(1)
    gc.unfreeze()  # the daemon itself keeps collecting everything
    os.close(ready_w)
    os.waitpid(child, 0)
    with os.fdopen(ready_r, "rb") as f:
        answer = f.readline().decode(errors="replace").rstrip("\n")
    if not answer.startswith("pid "):
        raise RuntimeError(answer or "the domain's supervisor died while starting")
    return int(answer.split()[1])


def _tell(ready_w: int, line: str) -> None:  # pragma: no cover - runs in the child
    """Answer the daemon that spawned us; one killed meanwhile no longer reads (EPIPE), and its
    successor finds the domain by its state.json: the domain lives on either way."""
    with contextlib.suppress(OSError):
        os.write(ready_w, line.encode())


def _become_supervisor(spec: DomainSpec, record: Record, rundir: Path, initrd: str | None, ready_w: int,
                       paused: bool, incoming: tuple[int, bool] | None) -> None:  # fmt: skip  # pragma: no cover
    """In the grandchild: drop the daemon's fds and signal handlers, run the domain, never return."""
    record.supervisor_pid = os.getpid()
    record.save(rundir)  # first: a daemon killed now and started again finds who is starting the domain
    # (its starting lock, inherited from the daemon, goes with the fds closed below)
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    from setproctitle import setproctitle

    setproctitle(f"slimvisor-supervisor {spec.name}")  # not the daemon's command line: `pkill -f` tells them apart
    keep = sorted({ready_w, *([incoming[0]] if incoming else [])})
    for low, high in zip([2, *keep], [*keep, os.sysconf("SC_OPEN_MAX")], strict=True):
        os.closerange(low + 1, high)
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log_dir() / f"{spec.name}.supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)
    logging.root.handlers = [logging.StreamHandler(sys.stderr)]  # the daemon's handlers' fds are gone
    logging.root.setLevel(logging.INFO)
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    supervisor = Supervisor(spec, record, rundir, initrd, arriving=incoming is not None)
    try:
        supervisor.start(paused, incoming)
        record.save(rundir)
    except BaseException as e:
        _tell(ready_w, f"{e}\n")
        supervisor.destroy()
        os._exit(1)
    _tell(ready_w, f"pid {os.getpid()}\n")
    os.close(ready_w)
    from slimvisor.engines.qemu.engine import QEMU_SYSCALLS
    from slimvisor.engines.uml import UML_SYSCALLS
    from slimvisor.jail.seccomp import DOM0_SYSCALLS, confine

    # Filters stack: the engines it starts later inherit this one too.
    confine([*DOM0_SYSCALLS, *UML_SYSCALLS, *QEMU_SYSCALLS])

    wake_r, wake_w = os.pipe()  # SIGTERM (destroy) must wake the loop out of epoll
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    supervisor.loop.add_reader(wake_r, supervisor.destroy)
    status = 0
    try:
        supervisor.serve()
    except BaseException:
        log.exception("supervisor failed")
        supervisor.destroy()
        status = 1
    os._exit(status)


def call(rundir: Path, op: str, *, reply_timeout: float = 10.0, fds: tuple[int, ...] = (),
         **args: Any) -> dict[str, Any]:  # fmt: skip
    """Ask a domain's supervisor; raises ControlError (also for a mismatched build).

    `reply_timeout` is how long to wait for the answer; `fds` go along (a migration's channel); every
    other keyword is the request's (`shutdown`'s own `timeout`, before the guest is destroyed, must
    reach the supervisor)."""
    return request(str(rundir / "supervisor.sock"), {"op": op, "build": build_id(), **args}, reply_timeout, fds)
