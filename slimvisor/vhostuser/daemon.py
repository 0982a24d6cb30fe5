"""A backend process: serve devices over vhost-user until SIGTERM/SIGINT, then clean up.

Used standalone (`slimvisor backend blk --socket S DISK`, like qemu-storage-daemon), by a
domain's forked backend process (slimvisor.domain.backends) and by the switch process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.server import VhostUserServer
from slimvisor.virtio.device import VirtioDevice


@dataclass
class Listening:
    """A device to serve on an already-listening socket (`path` is unlinked on exit, if given)."""

    sock: socket.socket
    name: str
    make_device: Callable[[], VirtioDevice]
    path: str | None = None

    def close(self) -> None:
        self.sock.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(
    endpoints: list[Listening],
    setup: Callable[[VhostUserServer], None] | None = None,
    *,
    unsealed_memory: bool = False,
) -> None:
    """Build each device and serve them all in one event loop until a stop signal."""
    server = VhostUserServer(unsealed_memory=unsealed_memory)
    pending = list(endpoints)
    try:
        for ep in endpoints:
            server.add(ep.make_device(), ep.sock, ep.name, ep.path)
            pending.pop(0)
        if setup is not None:
            setup(server)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _stop)
        from slimvisor.jail.seccomp import DOM0_SYSCALLS, confine

        confine(DOM0_SYSCALLS)
        server.serve_forever()
    finally:
        server.close()
        for ep in pending:
            ep.close()


def listen_and_serve(
    socket_paths: list[str], devices: list[tuple[str, Callable[[], VirtioDevice]]], *, unsealed_memory: bool = False
) -> None:
    """Standalone backend: create the sockets ourselves, one per (name, device factory), in order."""
    endpoints: list[Listening] = []
    try:
        for path, (name, make) in zip(socket_paths, devices, strict=True):
            endpoints.append(Listening(listen_unix(path), name, make, path))
    except BaseException:
        for ep in endpoints:
            ep.close()
        raise
    serve(endpoints, unsealed_memory=unsealed_memory)
