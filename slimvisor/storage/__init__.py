"""Disk images the block backend serves: raw files and copy-on-write overlays.

    open_disk(path, fmt="raw", readonly=False) -> Disk
    create_overlay(path, base, cluster_size=DEFAULT_CLUSTER_SIZE) -> OverlayHeader
    read_header(path) -> OverlayHeader      (an overlay's base, size and cluster size)

Formats are never guessed from a file's contents: a guest can write anything into a raw image,
and an overlay header names a host file to read from.
"""

from __future__ import annotations

from slimvisor.model.spec import DISK_FORMATS
from slimvisor.storage.disk import Disk, RawDisk
from slimvisor.storage.overlay import (
    DEFAULT_CLUSTER_SIZE,
    OverlayDisk,
    OverlayError,
    OverlayHeader,
    create_overlay,
    is_overlay,
    read_header,
)

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "Disk",
    "OverlayDisk",
    "OverlayError",
    "OverlayHeader",
    "RawDisk",
    "create_overlay",
    "is_overlay",
    "open_disk",
    "read_header",
]


def open_disk(path: str, fmt: str = "raw", readonly: bool = False) -> Disk:
    """Open the image at `path` in format `fmt` ("raw" or "overlay"). Raises OSError, or
    OverlayError (a ValueError naming the file) for a bad overlay."""
    if fmt == "raw":
        return RawDisk(path, readonly)
    if fmt == "overlay":
        return OverlayDisk(path, readonly)
    raise ValueError(f"{path}: unknown disk format {fmt!r} (known: {', '.join(DISK_FORMATS)})")
