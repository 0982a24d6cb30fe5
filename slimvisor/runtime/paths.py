"""Where slimvisor keeps run-time state and logs on the host."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from slimvisor.runtime.errors import SlimvisorError


def runtime_base() -> Path:
    """Run directories (sockets, UML's umid dirs, switches, domains): /run/slimvisor as root.

    $SLIMVISOR_RUN_DIR, $SLIMVISOR_STATE_DIR and $SLIMVISOR_LOG_DIR move the three trees, so a
    test (or a second toolstack) runs a daemon of its own beside the system's.
    """
    if env := os.environ.get("SLIMVISOR_RUN_DIR"):
        base = Path(env)
    elif os.geteuid() == 0:
        base = Path("/run/slimvisor")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"slimvisor-{os.getuid()}"
        base.mkdir(exist_ok=True, mode=0o700)
        check_private_dir(base)  # in /tmp anyone could have made it first
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


class UnsafeDirError(SlimvisorError, PermissionError):
    """A directory slimvisor keeps sockets in is not private to this user."""


def check_private_dir(path: Path) -> None:
    """`path` must be a real directory (not a symlink), ours, and closed to group and others:
    a run directory another user made in /tmp first would let them take over our sockets."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirError(f"{path}: not a directory (a symlink?): remove it, or set SLIMVISOR_RUN_DIR")
    if st.st_uid != os.geteuid():
        raise UnsafeDirError(f"{path}: owned by uid {st.st_uid}, not by you: remove it, or set SLIMVISOR_RUN_DIR")
    if st.st_mode & 0o077:
        raise UnsafeDirError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, open to others; expected 0700")


def log_dir() -> Path:
    """Console and daemon logs: /var/log/slimvisor as root, as Xen keeps /var/log/xen."""
    if env := os.environ.get("SLIMVISOR_LOG_DIR"):
        base = Path(env)
    else:
        base = Path("/var/log/slimvisor") if os.geteuid() == 0 else Path.home() / ".local/state/slimvisor"
    base.mkdir(parents=True, exist_ok=True)
    return base


def state_dir() -> Path:
    """State that outlives a reboot of the daemon (the xenstore database): /var/lib/slimvisor as root."""
    if env := os.environ.get("SLIMVISOR_STATE_DIR"):
        base = Path(env)
    else:
        base = Path("/var/lib/slimvisor") if os.geteuid() == 0 else Path.home() / ".local/share/slimvisor"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base
