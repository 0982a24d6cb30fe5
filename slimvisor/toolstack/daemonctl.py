"""Finding and stopping the slimvisord of a run tree, for anyone: the CLI, systemd, tests, benchmarks.

Each run tree (RUN, see slimvisor.runtime.paths) has at most one daemon: the one holding the exclusive
flock on RUN/slimvisord.lock, which also writes its pid there. Nothing else tells daemons apart:
setproctitle overwrites the memory that /proc/PID/cmdline and /proc/PID/environ read, so every
daemon is a bare `slimvisord` with no environment, whatever its run tree. A pid read from the
file counts only while that process holds the very file open, so a stale pid (a daemon that was
killed) or a reused one is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import time
from pathlib import Path
from typing import IO

from slimvisor.runtime.paths import runtime_base

LOCK_NAME = "slimvisord.lock"
DEFAULT_STOP_TIMEOUT = 30.0
_PID_WIDTH = 10  # digits, space-padded: one write of a fixed size replaces any earlier pid whole


def lock_path(run_dir: Path | None = None) -> Path:
    return (run_dir or runtime_base()) / LOCK_NAME


def take_lock(run_dir: Path | None = None) -> IO[str] | None:
    """Open and lock the run tree's lock file for this daemon's life; None when another daemon has it.

    A pid left by an earlier daemon is cleared at once, so until `record_pid` the file names no one.
    """
    fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # not O_APPEND: pwrite at 0
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    os.ftruncate(lock.fileno(), 0)
    return lock


def record_pid(lock: IO[str]) -> None:
    """Write this process's pid into the lock it holds (after --daemonize forked: the final pid).

    One pwrite of a fixed size at offset 0, while the lock is held: a reader sees the whole pid or
    an empty file, never part of one.
    """
    data = f"{os.getpid():>{_PID_WIDTH}}\n".encode()
    os.pwrite(lock.fileno(), data, 0)
    os.ftruncate(lock.fileno(), len(data))


def clear_pid(lock: IO[str]) -> None:
    """On the way out: the file names no one before the lock goes with the process."""
    with contextlib.suppress(OSError):
        os.ftruncate(lock.fileno(), 0)


def daemon_pid(run_dir: Path | None = None) -> int | None:
    """The pid of the daemon of this run tree, or None when none runs (or one is still starting)."""
    path = lock_path(run_dir)
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())
            text = f.read()
        pid = int(text)
    except (OSError, ValueError):  # no file, or empty: no daemon wrote its pid
        return None
    return pid if holds_open(pid, st.st_dev, st.st_ino) else None


def holds_open(pid: int, dev: int, ino: int) -> bool:
    """Whether process `pid` has the file (dev, ino) open: what makes a pid read from a file believable."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):  # gone; a zombie lists no fds. PermissionError: not ours
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if (st.st_dev, st.st_ino) == (dev, ino):
                return True
    return False


def stop(run_dir: Path | None = None, sock: Path | None = None, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
    """Stop the run tree's daemon; returns its pid once it has exited, None when none was running.

    The daemon is asked over its API (`daemon-stop`); one that does not answer, lacks the operation,
    or is not the one on `sock` gets SIGTERM through a pidfd instead. Either way it closes cleanly
    and leaves its domains to their supervisors, as a daemon's death does. Raises TimeoutError when
    it is still running after `timeout` seconds, PermissionError when it is not ours to signal.
    """
    pid = daemon_pid(run_dir)
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return pid
    try:
        if daemon_pid(run_dir) != pid:  # it exited between the two looks: the pidfd may be another's
            return pid
        if sock is None:
            sock = api_socket_path() if run_dir is None else run_dir / "slimvisord.sock"
        deadline = time.monotonic() + timeout
        if not _ask_to_stop(pid, sock, min(timeout / 2, 10.0)):  # a busy one still gets SIGTERM
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not wait_exit(pidfd, deadline - time.monotonic()):
            raise TimeoutError(f"slimvisord (pid {pid}) is still running after {timeout:g} s")
    finally:
        os.close(pidfd)
    return pid


def api_socket_path() -> Path:
    from slimvisor.toolstack.api import socket_path

    return socket_path()


def _ask_to_stop(pid: int, sock: Path, timeout: float) -> bool:
    """Send `daemon-stop` to the daemon on `sock` if it is `pid`; False when it cannot be asked."""
    from slimvisor.toolstack.api import ApiError, Client

    try:
        with Client(sock, autostart=False, timeout=timeout) as client:
            if client.call("info").get("pid") != pid:
                return False  # the socket is another daemon's ($SLIMVISOR_SOCKET): leave that one alone
            client.call("daemon-stop")
    except (ApiError, OSError, ValueError):
        return False
    return True


def wait_exit(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind `pidfd` has exited (a zombie counts); False after `timeout`."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))
