from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimvisor.images.cache import busybox_assets
from tests.toolstack import Toolstack

_names = itertools.count()


@pytest.fixture(scope="session")
def busybox() -> tuple[Path, Path]:
    """(initrd, rootfs) of the small busybox guest, built once and cached."""
    return busybox_assets()


@pytest.fixture
def rootfs(busybox: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the busybox root disk for one test."""
    dest = tmp_path / "rootfs.ext4"
    dest.write_bytes(busybox[1].read_bytes())
    return dest


@pytest.fixture
def domname() -> str:
    """A domain name unique to this test run."""
    return f"t{os.getpid()}x{next(_names)}"


def make_disk(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return path


@pytest.fixture
def toolstack() -> Iterator[Toolstack]:
    """A slimvisord of this test's own (started on demand by the first command), torn down after."""
    ts = Toolstack()
    try:
        yield ts
    finally:
        ts.close()
