"""A backend process: serve devices over vhost-user until SIGTERM/SIGINT, then clean up.

Used standalone (`slimvisor backend blk --socket S DISK`, like qemu-storage-daemon) and by the
domain runner, which passes already-listening sockets as inherited fds so the domain can start
connecting before this process has finished importing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
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


def main(argv: list[str] | None = None) -> None:
    """Internal entry for the domain runner: --fd N --disk SPEC pairs (fds inherited)."""
    p = argparse.ArgumentParser(prog="slimvisor-backend")
    p.add_argument("--fd", type=int, action="append", default=[])
    p.add_argument("--disk", action="append", default=[])
    p.add_argument("--queues", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="slimvisor-backend: %(message)s", stream=sys.stderr)
    disks = [
        (socket.socket(fileno=fd), None, DiskSpec.parse(spec))
        for fd, spec in zip(args.fd, args.disk, strict=True)
    ]
    serve_blk(disks, args.queues)


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


if __name__ == "__main__":
    main()
