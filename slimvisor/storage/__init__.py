"""Disk images the block backend serves: raw files and copy-on-write overlays.

    open_disk(path, fmt="raw", readonly=False) -> Disk
    probe_disk(path, fmt="raw", readonly=False) -> int   (what open_disk would refuse; the size)
    pending_disk(path, fmt="raw", readonly=False) -> PendingDisk   (opened later: a migration's target)
    create_overlay(path, base, cluster_size=DEFAULT_CLUSTER_SIZE) -> OverlayHeader
    read_header(path) -> OverlayHeader      (an overlay's base, size and cluster size)

Formats are never guessed from a file's contents: a guest can write anything into a raw image,
and an overlay header names a host file to read from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from slimvisor.model.spec import DISK_FORMATS
from slimvisor.storage.disk import Disk, PendingDisk, RawDisk, probe_raw
from slimvisor.storage.overlay import (
    DEFAULT_CLUSTER_SIZE,
    OverlayDisk,
    OverlayError,
    OverlayHeader,
    create_overlay,
    is_overlay,
    probe_overlay,
    read_header,
)

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "Disk",
    "OverlayDisk",
    "OverlayError",
    "OverlayHeader",
    "PendingDisk",
    "RawDisk",
    "create_overlay",
    "is_overlay",
    "open_disk",
    "pending_disk",
    "probe_disk",
    "read_header",
]


def open_disk(path: str, fmt: str = "raw", readonly: bool = False) -> Disk:
    """Open the image at `path` in format `fmt` ("raw" or "overlay"). Raises OSError, or
    OverlayError (a ValueError naming the file) for a bad overlay."""
    openers: dict[str, Callable[[str, bool], Disk]] = {"raw": RawDisk, "overlay": OverlayDisk}
    return _by_format(path, fmt, openers)(path, readonly)


def probe_disk(path: str, fmt: str = "raw", readonly: bool = False, locked_ok: bool = False) -> int:
    """What `open_disk` would refuse, checked without keeping the image (no lock taken, an overlay's
    bitmap not read), and the disk's size: the check at create, before the backend opens it.
    `locked_ok`: another holder's lock is no reason (a migration's source holds it)."""
    return _by_format(path, fmt, {"raw": probe_raw, "overlay": probe_overlay})(path, readonly, locked_ok)


def pending_disk(path: str, fmt: str = "raw", readonly: bool = False) -> PendingDisk:
    """The disk at `path` as a migration's target serves it until the source let go of the image:
    checked and sized now, opened (and locked) by `PendingDisk.open`."""
    size = probe_disk(path, fmt, readonly, locked_ok=True)
    return PendingDisk(path, size, readonly, lambda: open_disk(path, fmt, readonly))


_T = TypeVar("_T")


def _by_format(path: str, fmt: str, table: dict[str, _T]) -> _T:
    if fmt not in table:
        raise ValueError(f"{path}: unknown disk format {fmt!r} (known: {', '.join(DISK_FORMATS)})")
    return table[fmt]
