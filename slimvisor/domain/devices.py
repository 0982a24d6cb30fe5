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

from slimvisor.devices.blk import blk_factory
from slimvisor.model.spec import DomainSpec, SpecError, format_mac
from slimvisor.runtime.control import ControlError, ControlServer, request
from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.server import VhostUserServer
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.spec import (
    VIRTIO_ID_BALLOON,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_NET,
    VIRTIO_ID_RNG,
    VIRTIO_ID_VSOCK,
)

PAGE = 4096


@dataclass
class LocalDevices:
    """Factories for the backend process, and the live devices once it built them (in the child)."""

    spec: DomainSpec
    rundir: Path
    built: dict[str, VirtioDevice] = field(default_factory=dict)

    def factories(self) -> list[tuple[str, int, Callable[[], VirtioDevice]]]:
        out: list[tuple[str, int, Callable[[], VirtioDevice]]] = [
            (f"vd{chr(ord('a') + i)}", VIRTIO_ID_BLOCK, self._keep(f"vd{chr(ord('a') + i)}", blk_factory(d)))
            for i, d in enumerate(self.spec.disks)
            if d.backend == "blk"  # the others are qemu-storage-daemon's (slimvisor.domain.qsd)
        ]
        if self.spec.vsock is not None:
            cid, uds = self.spec.vsock.cid, self.spec.vsock.uds
            out.append(("vsock", VIRTIO_ID_VSOCK, self._keep("vsock", lambda: _vsock(cid, uds))))
        if self.spec.rng:
            out.append(("rng", VIRTIO_ID_RNG, self._keep("rng", _rng)))
        if self.spec.balloon:
            deflate = self.spec.balloon_deflate_on_oom
            out.append(("balloon", VIRTIO_ID_BALLOON, self._keep("balloon", lambda: _balloon(deflate))))
        if self.spec.channels:
            names = [c.name for c in self.spec.channels]
            out.append(("console", VIRTIO_ID_CONSOLE, self._keep("console", lambda: _console(names))))
        return out

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
            from slimvisor.devices.console import ConsoleDevice, UnixPortBinding

            console = self.built["console"]
            assert isinstance(console, ConsoleDevice)
            for port_id, channel in enumerate(self.spec.channels, start=1):  # port 0 is hvc0
                server.at_close(UnixPortBinding(console, port_id, channel.path, loop=server).close)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        balloon = self.built.get("balloon")
        if op in ("balloon-set", "balloon-info") and balloon is None:
            return {"error": "this domain has no balloon (start it with --balloon)"}
        if op == "balloon-set":
            target = req.get("target_bytes")
            if not isinstance(target, int) or target < 0 or target % PAGE:
                return {"error": "target_bytes must be a non-negative multiple of 4096"}
            limit = self.spec.memory_mib << 20
            if target > limit:
                return {"error": f"target is above the domain's {self.spec.memory_mib} MiB"}
            balloon.set_target((limit - target) // PAGE)  # type: ignore[union-attr]
            return {"ok": True}
        if op == "balloon-info":
            b: Any = balloon
            b.request_stats()
            return {"target_pages": b.target_pages, "actual_pages": b.actual_pages, "stats": b.stats()}
        return {"error": f"not supported: {op!r}"}


def _vsock(cid: int, uds: str) -> VirtioDevice:
    from slimvisor.devices.vsock import VsockDevice

    return VsockDevice(cid, uds)


def _rng() -> VirtioDevice:
    from slimvisor.devices.rng import RngDevice

    return RngDevice()


def _console(names: list[str]) -> VirtioDevice:
    from slimvisor.devices.console import ConsoleDevice, PortSpec

    return ConsoleDevice([PortSpec(console=True), *(PortSpec(name=n) for n in names)])


def _balloon(deflate_on_oom: bool) -> VirtioDevice:
    from slimvisor.devices.balloon import BalloonDevice

    return BalloonDevice(deflate_on_oom=deflate_on_oom)


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
