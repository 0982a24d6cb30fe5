"""One boot of a domain: its backend process, switch ports, its engine's instance and console pipes.

Shared by the foreground runner (`slimvisor run`) and the daemon's per-domain supervisor. A guest
reboot ends an incarnation and the caller starts a fresh one (as Xen's on_reboot=restart: destroy,
create again) rather than letting UML re-exec itself in place, which can hang under host load.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from slimvisor.domain.backends import BackendProcess
from slimvisor.domain.devices import LocalDevices, NetPorts
from slimvisor.domain.qsd import StorageDaemon
from slimvisor.engines import engine_for
from slimvisor.engines.base import EngineError, EngineEvent, Identity, Instance
from slimvisor.model.lifecycle import Event
from slimvisor.model.spec import DomainSpec


class Incarnation:
    """`served`: the domain's devices, when the caller serves them itself (socket, virtio id);
    None: fork a backend process for them, which lives as long as this incarnation."""

    def __init__(self, spec: DomainSpec, rundir: Path, initrd: str | None, who: Identity,
                 served: list[tuple[Path, int]] | None = None, paused: bool = False,
                 incoming: bool = False) -> None:  # fmt: skip
        self.backend: BackendProcess | None = None
        self.storage: StorageDaemon | None = None  # qemu-storage-daemon's disks, when not `served`
        self.ports = NetPorts(spec)
        self.instance: Instance | None = None
        self.engine = engine_for(spec)
        self.in_w = self.out_r = -1
        self.panic: str | None = None
        self.rebooted = False  # the engine reported a guest reboot (its exit then is that reboot)
        self.started = False  # the engine reported that the guest started (its vCPUs exist)
        self.migration: list[str] = []  # migration statuses the engine reported, not yet taken
        try:
            if served is not None:
                devices = list(served)
            else:
                self.storage = StorageDaemon(spec, rundir)
                devices = self.storage.devices(self._fork_backend(spec, rundir))
            devices += self.ports.acquire()
            in_r, self.in_w = os.pipe()
            self.out_r, out_w = os.pipe()
            try:
                self.instance = self.engine.start(spec, rundir, devices, initrd, who, in_r, out_w, paused, incoming)
            except EngineError as e:
                raise EngineError(f"{e}{self._last_words()}") from None
            finally:
                os.close(in_r)
                os.close(out_w)
            os.set_blocking(self.in_w, False)
            os.set_blocking(self.out_r, False)
        except BaseException:
            self.close()
            raise

    def _last_words(self) -> str:
        """What an engine that died while starting printed (QEMU says why there)."""
        data = b""
        with contextlib.suppress(OSError):
            os.set_blocking(self.out_r, False)
            data = os.read(self.out_r, 4096)
        text = " ".join(data.decode(errors="replace").split())
        return f": {text}" if text else ""

    def _fork_backend(self, spec: DomainSpec, rundir: Path) -> list[tuple[Path, int]]:
        (rundir / "control.sock").unlink(missing_ok=True)  # a killed backend's
        local = LocalDevices(spec, rundir)
        factories = local.factories()
        if not factories:
            return []
        self.backend, paths = BackendProcess.start([(n, f) for n, _, f in factories], rundir, local.setup)
        return [(p, vid) for p, (_, vid, _) in zip(paths, factories, strict=True)]

    def pids(self) -> list[int]:
        out = [self.instance.pid] if self.instance is not None else []
        return out + ([self.backend.pid] if self.backend is not None else [])

    def saw(self, data: bytes) -> bool:
        """Note console output; True once the guest announced a reboot."""
        assert self.instance is not None
        reboot = False
        for event, detail in self.instance.console_seen(data):
            if event == EngineEvent.PANICKED:
                self.panic = detail
            reboot = reboot or event == EngineEvent.REBOOT_REQUESTED
        return reboot

    def notified(self) -> bool:
        """Read what the engine reported (a panic, a reboot); True once the guest asked to reboot."""
        assert self.instance is not None
        for event, detail in self.instance.events():
            if event == EngineEvent.PANICKED:
                self.panic = self.panic or detail
            self.rebooted = self.rebooted or event == EngineEvent.REBOOT_REQUESTED
            self.started = self.started or event == EngineEvent.STARTED
            if event == EngineEvent.MIGRATION:
                self.migration.append(detail)
        return self.rebooted and self.panic is None

    def drain(self, sink: Callable[[bytes], None]) -> None:
        """What UML printed last (its helpers may hold the pipe open: no waiting for EOF)."""
        with contextlib.suppress(OSError):
            while self.out_r >= 0 and (data := os.read(self.out_r, 65536)):
                sink(data)

    def exit_reason(self, rc: int) -> tuple[Event, str]:
        """How the engine's exit with `rc` ended this incarnation: (poweroff|crash, reason)."""
        if self.panic is not None:
            return Event.CRASH, f"guest kernel panic: {self.panic}"
        if self.rebooted:
            return Event.REBOOT, "guest rebooted"
        if rc == 0:
            return Event.POWEROFF, "domain powered off"
        return Event.CRASH, f"{self.engine.program} crashed ({exit_status(rc)})"

    def close(self) -> None:
        if self.instance is not None:
            self.instance.close()
            self.instance = None
        self.ports.release()
        if self.backend is not None:
            self.backend.stop()
            self.backend = None
        if self.storage is not None:
            self.storage.close()
            self.storage = None
        for fd in (self.in_w, self.out_r):
            if fd >= 0:
                os.close(fd)
        self.in_w = self.out_r = -1


def exit_status(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"
