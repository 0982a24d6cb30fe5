"""Per-domain uids: each domain's engine runs as a uid of its own, leased for the domain's life.

A lease is an flock on RUN/uids/UID, a host-wide directory whatever SLIMVISOR_RUN_DIR says (uids
are a host resource: two toolstacks must never hand out the same one). The lock is held by the
dom0 process that owns the domain (runner or supervisor) and by nobody in the jail, so a hostile
engine cannot release it; it goes when that process does, and the domain goes with it (the engine
is its PID namespace's init and dies with its parent). The search starts at a random point of
the range, so a uid just released is not the next one handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
from dataclasses import dataclass
from pathlib import Path

from slimvisor.jail.spawn import JailError

DEFAULT_RANGE = (0xA0000, 0xAFFFF)  # 655360-720895: above the ranges Debian and systemd allocate
LEASE_DIR = Path("/run/slimvisor-uids")


def uid_range() -> tuple[int, int]:
    """The uids domains may get: $SLIMVISOR_UID_RANGE as FIRST-LAST, else 655360-720895."""
    text = os.environ.get("SLIMVISOR_UID_RANGE")
    if not text:
        return DEFAULT_RANGE
    first, dash, last = text.partition("-")
    try:
        lo, hi = int(first), int(last)
    except ValueError:
        lo = hi = -1
    if not dash or not 1000 <= lo <= hi < 0xFFFFFFFF:
        raise JailError(f"SLIMVISOR_UID_RANGE={text!r}: expected FIRST-LAST, both from 1000 to 4294967294")
    return lo, hi


def _is_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@dataclass
class UidLease:
    uid: int
    fd: int

    @property
    def gid(self) -> int:
        return self.uid  # a group of its own, same number

    @classmethod
    def acquire(cls, owner: str, lease_dir: Path = LEASE_DIR) -> UidLease:
        """Lease a free uid (not an account in the passwd database, not leased by anyone)."""
        lo, hi = uid_range()
        lease_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        size = hi - lo + 1
        start = secrets.randbelow(size)
        for i in range(size):
            uid = lo + (start + i) % size
            if _is_account(uid):
                continue
            fd = os.open(lease_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{owner} {os.getpid()}\n".encode())  # who holds it, for a person looking
            return cls(uid, fd)
        raise JailError(f"no free uid in {lo}-{hi} for {owner} (SLIMVISOR_UID_RANGE sets the range)")

    def release(self) -> None:
        """Give the uid back (the file stays: unlinking it would race with a concurrent acquire)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
