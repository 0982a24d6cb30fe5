"""Chaos: a domain's supervisor SIGKILLed at random moments during heavy writes. Every write the
guest saw flushed (its fsync returned, and only then did it print the record's number) must be in
the image afterwards: in slimvisor's overlay (whose allocation bitmap lives in the backend's
memory until a flush writes it) and in a raw disk."""

from __future__ import annotations

import random
import re
import signal
from pathlib import Path

import psutil
import pytest

from slimvisor.storage.overlay import OverlayDisk, create_overlay
from slimvisor.testing.expect import ConsoleSession
from tests.toolstack import Toolstack

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 240
RECORD = 4096  # one record a block: REC<8 digits> at offset number * RECORD
ROUNDS = 3
DISK_SIZE = 8 << 20
# Each record goes to both disks, each write followed by fsync (a virtio-blk FLUSH); the line
# "F n" comes out only once both returned.
WRITER = (
    "i=$START; while [ $i -lt 2000 ]; do r=$(printf 'REC%08d' $i);"
    " for d in /dev/vdb /dev/vdc; do echo -n $r | dd of=$d bs=$RECORD seek=$i conv=notrunc,fsync 2>/dev/null"
    " || exit 1; done; echo F $i; i=$((i+1)); done"
)


def _missing(image: bytes, upto: int) -> list[int]:
    """Numbers in 1..upto whose record is not in `image`."""
    return [n for n in range(1, upto + 1) if image[n * RECORD : n * RECORD + 11] != b"REC%08d" % n]


def _overlay_bytes(path: Path) -> bytes:
    """What the guest sees of the overlay, read through slimvisor's own overlay code."""
    disk = OverlayDisk(str(path), readonly=True)
    try:
        buf = bytearray(disk.size)
        disk.readv([memoryview(buf)], 0)
        return bytes(buf)
    finally:
        disk.close()


def test_flushed_writes_survive_a_sigkilled_supervisor(toolstack: Toolstack, rootfs: Path, domname: str,
                                                        tmp_path: Path) -> None:  # fmt: skip
    base, overlay, raw = tmp_path / "base.raw", tmp_path / "data.overlay", tmp_path / "data.raw"
    base.write_bytes(bytes(DISK_SIZE))
    raw.write_bytes(bytes(DISK_SIZE))
    create_overlay(str(overlay), str(base))
    rng = random.Random()
    start, flushed_total = 1, 0
    for round_ in range(ROUNDS):
        name = f"{domname}r{round_}"
        cfg = tmp_path / f"{name}.cfg"
        disks = f"'{rootfs},raw,xvda,rw', '{overlay},overlay,xvdb,rw', '{raw},raw,xvdc,rw'"
        cfg.write_text(f'name = "{name}"\nmemory = 64\ndisk = [{disks}]\n')
        toolstack.sv("create", str(cfg))
        console: ConsoleSession = toolstack.console(name)
        try:
            console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
            supervisor = psutil.Process(int(toolstack.domain_info(name)["supervisor"]))
            mark = len(console.out)
            console.send(f"START={start} RECORD={RECORD}; " + WRITER)
            kill_after = rng.randrange(5, 60)  # records flushed before the kill: a random moment
            console.expect(rf"\nF {start + kill_after}\r?\n", timeout=120, start=mark)
            supervisor.send_signal(signal.SIGKILL)
            console.wait(60)
        finally:
            console.kill()
        flushed = [int(n) for n in re.findall(r"^F (\d+)\r?$", console.text[mark:], re.M)]
        assert flushed and flushed == list(range(start, flushed[-1] + 1)), flushed
        last = flushed[-1]
        toolstack.wait_state(name, ("gone",), timeout=60)
        assert _missing(_overlay_bytes(overlay), last) == [], f"round {round_}: flushed records lost (overlay)"
        assert _missing(raw.read_bytes(), last) == [], f"round {round_}: flushed records lost (raw)"
        flushed_total += len(flushed)
        start = last + 1
    assert flushed_total >= ROUNDS * 5
    assert toolstack.leftovers([f"{domname}r{i}" for i in range(ROUNDS)]) == []
