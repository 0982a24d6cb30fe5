"""The devices of one domain: which backends serve them, and the domain's control socket.

Disks, vsock, rng and the balloon are served by the domain's own backend process; network
cards are ports on a dom0 switch (a separate, shared process) that hands back a socket.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimvisor.devices.registry import local_factories
from slimvisor.engines import engine_for
from slimvisor.model import units
from slimvisor.model.spec import DomainSpec, SpecError, format_mac
from slimvisor.runtime.control import ControlError, ControlServer, request
from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.server import VhostUserServer
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK, VIRTIO_ID_NET


@dataclass
class LocalDevices:
    """Factories for the backend process, and the live devices once it built them (in the child)."""

    spec: DomainSpec
    rundir: Path
    built: dict[str, VirtioDevice] = field(default_factory=dict)
    incoming: bool = False  # a migration's target: disks are opened by `activate_disks`, once the source let go

    def factories(self) -> list[tuple[str, int, Callable[[], VirtioDevice]]]:
        """(name, virtio id, factory) of the devices the domain's backend serves (devices.registry),
        less those its engine provides itself (QEMU's balloon)."""
        own = engine_for(self.spec).own_devices
        out = []
        for name, virtio_id, make in local_factories(self.spec):
            if name in own:
                continue
            if self.incoming and virtio_id == VIRTIO_ID_BLOCK:
                make = self._pending_disk(name)
            out.append((name, virtio_id, self._keep(name, make)))
        return out

    def _pending_disk(self, name: str) -> Callable[[], VirtioDevice]:
        from slimvisor.devices.blk import BlockDevice
        from slimvisor.devices.registry import disk_name

        disk = next(d for i, d in enumerate(self.spec.disks) if disk_name(i) == name)
        return lambda: BlockDevice.pending(disk)

    def activate_disks(self) -> None:
        """Open every disk a migration's target held pending (OSError, ImageLockedError if it cannot)."""
        from slimvisor.devices.blk import BlockDevice

        for device in self.built.values():
            if isinstance(device, BlockDevice):
                device.activate()

    def _keep(self, name: str, make: Callable[[], VirtioDevice]) -> Callable[[], VirtioDevice]:
        def build() -> VirtioDevice:
            self.built[name] = dev = make()
            return dev

        return build

    def serve_on(self, server: VhostUserServer) -> list[tuple[Path, int]]:
        """Serve every device in `server`'s loop, in this process; returns (socket, virtio id) pairs.

        The daemon's supervisors do this (one process per domain, not two: density); `slimvisor run`
        forks a backend process instead (slimvisor.domain.backends).
        """
        served = []
        for name, virtio_id, make in self.factories():
            path = self.rundir / f"{name}.sock"
            listener = listen_unix(str(path))
            try:
                device = make()
            except BaseException:
                listener.close()
                raise
            server.add(device, listener, name, str(path))
            served.append((path, virtio_id))
        self.setup(server)
        return served

    def setup(self, server: VhostUserServer) -> None:
        """In the backend process: the domain's control socket, and channels on their sockets."""
        server.at_close(ControlServer(server, str(self.rundir / "control.sock"), self.handle).close)
        if self.spec.channels:
            from slimvisor.devices.console import ConsoleDevice
            from slimvisor.devices.console_unix import UnixPortBinding

            console = self.built["console"]
            assert isinstance(console, ConsoleDevice)
            for port_id, channel in enumerate(self.spec.channels, start=1):  # port 0 is hvc0
                server.at_close(UnixPortBinding(console, port_id, channel.path, loop=server).close)

    def set_memory_target(self, nbytes: object) -> None:
        """Inflate or deflate the domain's balloon so the guest keeps `nbytes` (the control op
        `balloon-set`, and the supervisor's mem-set for an engine without a balloon of its own).
        Raises SpecError naming what is wrong with the target."""
        balloon = self.built.get("balloon")
        if balloon is None:
            raise SpecError("this domain has no balloon (start it with --balloon)")
        if not isinstance(nbytes, int) or nbytes < 0 or nbytes % units.PAGE:
            raise SpecError("target_bytes must be a non-negative multiple of 4096")
        limit = self.spec.ram_mib * units.MiB
        if nbytes > limit:
            raise SpecError(f"target is above the domain's {self.spec.ram_mib} MiB")
        balloon.set_target(units.pages(limit - nbytes))  # type: ignore[attr-defined]

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        balloon = self.built.get("balloon")
        if op == "balloon-set":
            try:
                self.set_memory_target(req.get("target_bytes"))
            except SpecError as e:
                return {"error": str(e)}
            return {"ok": True}
        if op == "balloon-info" and balloon is None:
            return {"error": "this domain has no balloon (start it with --balloon)"}
        if op == "balloon-info":
            b: Any = balloon
            b.request_stats()
            return {"target_pages": b.target_pages, "actual_pages": b.actual_pages, "stats": b.stats()}
        return {"error": f"not supported: {op!r}"}


def switch_control(name: str) -> Path:
    from slimvisor.network.switchd import switch_dir

    return switch_dir(name) / "control.sock"


class NetPorts:
    """The domain's ports on dom0 switches, released on every way out."""

    def __init__(self, spec: DomainSpec) -> None:
        self.spec = spec
        self.held: list[tuple[str, str]] = []  # (switch, port)

    def acquire(self) -> list[tuple[Path, int]]:
        sockets = []
        for i, net in enumerate(self.spec.nets):
            control = switch_control(net.switch)
            if not control.exists():
                raise SpecError(f"net {i}: switch {net.switch} is not running (slimvisor switch start {net.switch})")
            port = f"{self.spec.name}.{i}"
            req = {"op": "add-port", "port": port, "mac": format_mac(net.mac_for(self.spec.name, i)),
                   "rate": net.rate, "pps": net.pps, "owner": os.getpid()}  # fmt: skip
            try:
                reply = request(str(control), req)
            except ControlError as e:
                raise SpecError(f"net {i}: switch {net.switch}: {e}") from e
            self.held.append((net.switch, port))
            sockets.append((Path(reply["socket"]), VIRTIO_ID_NET))
        return sockets

    def release(self) -> None:
        for switch, port in self.held:
            with contextlib.suppress(ControlError):  # a switch that is gone took its ports along
                request(str(switch_control(switch)), {"op": "remove-port", "port": port})
        self.held = []
