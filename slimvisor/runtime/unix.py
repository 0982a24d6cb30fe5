"""Listening Unix sockets, shared by every dom0 endpoint (vhost-user, console, vsock, xenstore)."""

from __future__ import annotations

import os
import socket
import stat


def listen_unix(path: str) -> socket.socket:
    """A listening socket at `path`; replaces a stale socket, refuses one in use and anything
    that is not a socket (`backend blk --socket ~/somefile` must not delete the file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path}: exists and is not a socket; refusing to replace it")
    if st is not None:
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
