"""Listening Unix sockets, shared by every dom0 endpoint (vhost-user, console, vsock, xenstore)."""

from __future__ import annotations

import os
import socket


def listen_unix(path: str) -> socket.socket:
    """A listening socket at `path`; refuses to replace a socket that is in use."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket from a process that died
        else:
            raise FileExistsError(f"{path}: another backend is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock
