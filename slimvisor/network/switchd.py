"""The dom0 switch process: one L2 switch, its vhost-user net ports, an optional TAP uplink.

Like Xen's netback plus a bridge, in one process: each domain's virtio-net device is a port
served here over vhost-user, so a frame goes from one guest's memory to another's without
leaving this process. Runners ask for ports over the control socket; ports whose owner process
died are reaped. `slimvisor switch start` daemonizes it and returns once it is ready.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from slimvisor.model.spec import NAME, SpecError, parse_mac
from slimvisor.network.tap import Tap, TapError
from slimvisor.runtime.control import ControlError, ControlServer, request
from slimvisor.runtime.paths import log_dir, runtime_base
from slimvisor.runtime.ratelimit import RateLimiter, TokenBucket
from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.server import VhostUserServer

log = logging.getLogger("slimvisor.switch")
REAP_INTERVAL = 2.0
UPLINK = "uplink"


def switch_dir(name: str) -> Path:
    return runtime_base() / "switch" / name


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or len(name) > 32:
        raise SpecError(f"switch name {name!r}: use letters, digits, '.', '_' and '-' (at most 32)")


def _limiter(rate: int | None, pps: int | None) -> RateLimiter | None:
    """`rate` bytes/s and `pps` packets/s, each with 100 ms worth of burst (Firecracker's buckets)."""
    if rate is None and pps is None:
        return None
    return RateLimiter(
        bandwidth=TokenBucket(size=max(rate // 10, 65536 + 12), refill_time=0.1) if rate else None,
        ops=TokenBucket(size=max(pps // 10, 1), refill_time=max(pps // 10, 1) / pps) if pps else None,
    )


class SwitchDaemon:
    def __init__(self, name: str, uplink: str | None) -> None:
        from slimvisor.network.switch import Switch

        self.name = name
        self.dir = switch_dir(name)
        self.loop = VhostUserServer(unsealed_memory=True)  # ports serve jailed engines only
        self.switch = Switch()
        self.ports: dict[str, Any] = {}  # port name -> (device, owner pid)
        self.owners: dict[str, int] = {}
        self.tap: Tap | None = None
        if uplink:
            self.tap = Tap(uplink)
            self.switch.add_port(UPLINK, None, self._to_tap, enforce_mac=False)
            self.loop.add_reader(self.tap.fd, self._from_tap)
        (self.dir / "ports").mkdir(parents=True, exist_ok=True)
        self.control = ControlServer(self.loop, str(self.dir / "control.sock"), self.handle)
        self.running = True
        self.loop.call_later(REAP_INTERVAL, self._reap)

    # -- uplink ---------------------------------------------------------------------------------
    def _to_tap(self, header: Any, frame: bytes) -> bool:
        assert self.tap is not None
        return self.tap.write(header.pack() + frame)

    def _from_tap(self) -> None:
        from slimvisor.devices.net import VnetHeader

        assert self.tap is not None
        for _ in range(64):  # bounded batch: the guests' kicks get their turn
            packet = self.tap.read()
            if packet is None:
                return
            if len(packet) > 12:
                self.switch.receive(UPLINK, VnetHeader.unpack(packet[:12]), packet[12:])

    # -- ports ----------------------------------------------------------------------------------
    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "add-port":
            return self._add_port(req)
        if op == "remove-port":
            return self._remove_port(str(req.get("port")))
        if op == "stats":
            ports = self.switch.stats()
            for port, dev in self.ports.items():  # what the virtio device saw, beside the switch's view
                ports[port].update({f"dev_{k}": v for k, v in dev.stats().items()})
            return {"switch": self.name, "uplink": self.tap.name if self.tap else None, "ports": ports}
        if op == "stop":
            self.running = False
            return {"ok": True}
        return {"error": f"not supported: {op!r}"}

    def _add_port(self, req: dict[str, Any]) -> dict[str, Any]:
        from slimvisor.devices.net import NetDevice

        port = str(req.get("port", ""))
        if not NAME.fullmatch(port) or port == UPLINK:
            return {"error": f"bad port name {port!r}"}
        if port in self.ports:
            return {"error": f"port {port} exists already"}
        try:
            mac = parse_mac(str(req.get("mac")), f"port {port}")
        except SpecError as e:
            return {"error": str(e)}
        rate, pps = req.get("rate"), req.get("pps")
        if rate is not None and (not isinstance(rate, int) or rate <= 0):
            return {"error": "rate must be a positive number of bytes per second"}
        if pps is not None and (not isinstance(pps, int) or pps <= 0):
            return {"error": "pps must be a positive number of packets per second"}
        path = self.dir / "ports" / f"{port}.sock"
        dev = NetDevice(mac, tx_limiter=_limiter(rate, pps), rx_limiter=_limiter(rate, pps))
        self.loop.add(dev, listen_unix(str(path)), port, str(path))
        self.switch.add_port(port, mac, dev.deliver)
        dev.on_transmit = functools.partial(self.switch.receive, port)  # the switch reads its clock
        self.ports[port] = dev
        owner = req.get("owner")
        if isinstance(owner, int) and owner > 0:
            self.owners[port] = owner
        log.info("port %s (%s) added", port, req.get("mac"))
        return {"socket": str(path)}

    def _remove_port(self, port: str) -> dict[str, Any]:
        if port not in self.ports:
            return {"error": f"no port {port}"}
        self.switch.remove_port(port)
        self.loop.remove(port)
        del self.ports[port]
        self.owners.pop(port, None)
        log.info("port %s removed", port)
        return {"ok": True}

    def _reap(self) -> None:
        for port, pid in list(self.owners.items()):
            if not _alive(pid):
                self._remove_port(port)
        self.loop.call_later(REAP_INTERVAL, self._reap)

    # -- life -----------------------------------------------------------------------------------
    def serve(self) -> None:
        while self.running:
            self.loop.run_once(1.0)

    def close(self) -> None:
        self.control.close()
        self.loop.close()
        if self.tap is not None:
            self.tap.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(name: str, uplink: str | None) -> int:
    """Start the switch in the background; returns its pid once it serves, or raises SpecError."""
    check_name(name)
    directory = switch_dir(name)
    if (directory / "control.sock").exists():
        try:
            request(str(directory / "control.sock"), {"op": "stats"}, timeout=2)
        except ControlError:
            shutil.rmtree(directory, ignore_errors=True)  # left by a switch that was killed
        else:
            raise SpecError(f"switch {name} is already running")
    directory.mkdir(parents=True, exist_ok=False)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon side
        os.close(ready_r)
        _daemon(name, uplink, ready_w)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        answer = ready.read().decode(errors="replace")
    os.waitpid(pid, 0)  # the intermediate child exits at once
    if not answer.startswith("ok "):
        shutil.rmtree(directory, ignore_errors=True)
        raise SpecError(answer.strip() or f"switch {name} failed to start (see {log_dir()}/switch-{name}.log)")
    return int(answer.split()[1])


def _daemon(name: str, uplink: str | None, ready_w: int) -> None:
    """Double fork, then serve; report readiness (or the error) on `ready_w`."""
    status = 1
    try:
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        # Forked without exec: whatever the caller held (slimvisord's lock file, its xenstore database,
        # its signal pipe) must not live on in the switch, or a stopped daemon could not start again.
        # Garbage of the caller's is finalized now, while its fds are still its own, and never later.
        gc.collect()
        gc.freeze()
        signal.set_wakeup_fd(-1)
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, os.sysconf("SC_OPEN_MAX"))
        from setproctitle import setproctitle

        setproctitle(f"slimvisor-switch {name}")  # forked from slimvisord it would otherwise be titled as the daemon
        logfile = open(log_dir() / f"switch-{name}.log", "a", buffering=1)  # noqa: SIM115
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(logfile.fileno(), 1)
        os.dup2(logfile.fileno(), 2)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)
        try:
            daemon = SwitchDaemon(name, uplink)
        except (TapError, OSError) as e:
            os.write(ready_w, f"switch {name}: {e}".encode())
            shutil.rmtree(switch_dir(name), ignore_errors=True)
            os._exit(1)
        (switch_dir(name) / "pid").write_text(f"{os.getpid()}\n")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: setattr(daemon, "running", False))
        os.write(ready_w, f"ok {os.getpid()}".encode())
        os.close(ready_w)
        log.info("switch %s up (uplink %s)", name, uplink or "none")
        from slimvisor.jail.seccomp import DOM0_SYSCALLS, confine

        confine(DOM0_SYSCALLS)
        try:
            daemon.serve()
        finally:
            daemon.close()
            log.info("switch %s stopped", name)
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def listing() -> list[dict[str, Any]]:
    """Every switch of this host (`brctl show`): name, pid, uplink and port count, or its error."""
    out: list[dict[str, Any]] = []
    root = runtime_base() / "switch"
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        entry: dict[str, Any] = {"name": directory.name, "pid": None, "uplink": None, "ports": None}
        with contextlib.suppress(OSError, ValueError):
            entry["pid"] = int((directory / "pid").read_text())
        try:
            stats = request(str(directory / "control.sock"), {"op": "stats"}, timeout=2)
            entry.update(uplink=stats["uplink"], ports=sum(port != UPLINK for port in stats["ports"]))
        except ControlError as e:
            entry["error"] = str(e)
        out.append(entry)
    return out


def stop(name: str, timeout: float = 10.0) -> None:
    check_name(name)
    control = switch_dir(name) / "control.sock"
    pid_file = switch_dir(name) / "pid"
    if not control.exists():
        raise SpecError(f"switch {name} is not running")
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    with contextlib.suppress(ControlError):
        request(str(control), {"op": "stop"})
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(switch_dir(name), ignore_errors=True)
