from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from slimvisor.host import procs
from slimvisor.images.cache import busybox_assets
from slimvisor.runtime.paths import log_dir, runtime_base
from slimvisor.testing.expect import ConsoleSession
from tests import leaks
from tests.toolstack import Toolstack

_names = itertools.count()
DOMAIN_PREFIX = f"t{os.getpid()}x"  # every `domname` of this run, and so its run dirs, logs and switches


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """After the whole suite, no process it started may still run, or the run fails (and CI with it).

    What it started: the processes of the run trees the harnesses made (tests/leaks.py), of the
    domains and switches named after `domname`, the pids the harnesses were given, and the suite's
    own children. Other people's guests and daemons on the same host are none of these.
    """
    run, logs = runtime_base(), log_dir()
    leaks.record_paths(f"{run}/{DOMAIN_PREFIX}", f"{run}/switch/sw{DOMAIN_PREFIX}", f"{logs}/{DOMAIN_PREFIX}",
                       f"{logs}/switch-sw{DOMAIN_PREFIX}")  # fmt: skip
    yield
    children = {ident for c in psutil.Process().children() if (ident := procs.process_id(c.pid)) is not None}
    started = leaks.STARTED
    left = leaks.survivors(started.paths, started.processes | children, started.cgroups)
    if left:
        described = leaks.describe(left)
        procs.kill(left)
        pytest.fail("the test suite left these processes running (now killed):\n" + "\n".join(described),
                    pytrace=False)  # fmt: skip


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
    return f"{DOMAIN_PREFIX}{next(_names)}"


def make_disk(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return path


@pytest.fixture
def consoles() -> Iterator[list[ConsoleSession]]:
    """Console sessions a test opens; killed at the end whatever happened."""
    sessions: list[ConsoleSession] = []
    yield sessions
    for c in sessions:
        c.kill()


@pytest.fixture
def toolstack() -> Iterator[Toolstack]:
    """A slimvisord of this test's own (started on demand by the first command), torn down after."""
    ts = Toolstack()
    try:
        yield ts
    finally:
        ts.close()


MARK_PHY = b"phy-loop-marker!"  # the first bytes of `loop_device`


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device (a real block device, xl's phy:) over an 8 MiB file that starts with MARK_PHY."""
    import subprocess

    backing = make_disk(tmp_path / "phy.raw", 8 << 20, MARK_PHY)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
