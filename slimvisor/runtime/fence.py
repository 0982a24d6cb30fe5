"""A host's pool lease as a deadline on this machine's monotonic clock, shared by daemon and supervisors.

In a pool, another member restarts a host's restartable domains once that host's lease in etcd has
expired. So a domain must stop running here before that can happen, even when the daemon that
renews the lease is gone (killed, hung) while the domain's supervisor lives on. The daemon writes,
after each renewal that etcd confirmed, the time until which the lease certainly holds (the renewal's
send time plus the lease's TTL, less a margin); each supervisor of such a domain reads it and
fences its domain (pauses it) once that time has passed. CLOCK_MONOTONIC is one clock for every
process of the machine, and etcd counts the lease from when it received the renewal, which is later.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FENCED_DIR = "pool-fenced"  # beside the lease file: one empty file per domain fenced here
FENCE_MARGIN_S = 1.0  # fence this long before etcd can let the lease go (clock skew between processes is nil)


def write(path: Path, until: float) -> None:
    """Record `until` (time.monotonic()) atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"until_monotonic": until}))
    os.replace(tmp, path)


def deadline(path: Path) -> float | None:
    """The recorded time; None when there is none or it cannot be read (fence: nothing holds)."""
    try:
        value = json.loads(path.read_text())["until_monotonic"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return float(value) if isinstance(value, int | float) else None


def expired(path: Path, now: float | None = None) -> bool:
    until = deadline(path)
    return until is None or (time.monotonic() if now is None else now) >= until


def _mark_path(lease: Path, name: str) -> Path:
    return lease.with_name(FENCED_DIR) / name


def mark(lease: Path, name: str) -> None:
    """Domain `name` was fenced here (by its supervisor, which then ends)."""
    path = _mark_path(lease, name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.touch()


def marked(lease: Path, name: str) -> bool:
    return _mark_path(lease, name).exists()


def unmark(lease: Path, name: str) -> None:
    _mark_path(lease, name).unlink(missing_ok=True)
