"""A backend process: serve devices over vhost-user until SIGTERM/SIGINT, then clean up.

Used standalone (`slimvisor backend blk --socket S DISK`, like qemu-storage-daemon) and by the
domain runner's forked backend process (slimvisor.domain.backends).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from types import FrameType

from slimvisor.devices.blk import BlockDevice
from slimvisor.domain.spec import DiskSpec
from slimvisor.vhostuser.server import Server, listen_unix

log = logging.getLogger("slimvisor.backend")


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve_blk(disks: list[tuple[socket.socket, str | None, DiskSpec]], queues: int = 1) -> None:
    """Serve each disk on its listening socket (path given: unlink it on exit)."""
    server = Server()
    pending = list(disks)
    try:
        for i, (listener, path, disk) in enumerate(disks):
            dev = BlockDevice(disk.path, readonly=disk.readonly, serial=disk.serial, num_queues=queues)
            server.add(dev, listener, f"vd{chr(ord('a') + i)}:{disk.path}", path)
            pending.pop(0)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _stop)
        server.serve_forever()
    finally:
        server.close()
        _close_listeners(pending)


def _close_listeners(listeners: list[tuple[socket.socket, str | None, DiskSpec]]) -> None:
    for sock, path, _ in listeners:
        sock.close()
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def listen_and_serve(socket_paths: list[str], disks: list[DiskSpec], queues: int) -> None:
    """Standalone mode: create the sockets ourselves."""
    listeners: list[tuple[socket.socket, str | None, DiskSpec]] = []
    try:
        for path, disk in zip(socket_paths, disks, strict=True):
            listeners.append((listen_unix(path), path, disk))
    except BaseException:
        _close_listeners(listeners)
        raise
    serve_blk(listeners, queues)

