"""The split virtqueue's driver side, written by a hostile guest, against each device: descriptor
tables, available rings and buffers from the fuzzer. A device may only answer with a
VirtqueueError (its error state); it never touches a byte outside guest memory (guard bytes
around it stay intact) and never raises anything else."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable

from fuzz.bytes import Input
from slimvisor.devices.balloon import BalloonDevice
from slimvisor.devices.blk import BlockDevice
from slimvisor.devices.console import ConsoleDevice, PortSpec
from slimvisor.devices.net import NetDevice
from slimvisor.devices.rng import RngDevice
from slimvisor.devices.vsock_unix import unix_vsock
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import VirtqueueError
from slimvisor.virtio.spec import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    bit,
)
from tests.vring import Driver, FakeTransport, GuardedMemory

QSIZE = 16
RING_SPAN = 0x400  # one queue's rings (16 entries) fit in this
DATA = 0x4000  # buffers from here to the end of guest memory
MEM = 0x10000
DESC = struct.Struct("<QIHH")
_scratch = tempfile.mkdtemp(prefix="slimvisor-fuzz-")  # a disk image and a vsock path, for this process
atexit.register(shutil.rmtree, _scratch, True)
_disk = os.path.join(_scratch, "disk.raw")
with open(_disk, "wb") as f:
    f.truncate(64 * 1024)

DEVICES: list[Callable[[], VirtioDevice]] = [
    lambda: BlockDevice(_disk, serial="fuzz"),
    lambda: BlockDevice(_disk, readonly=True),
    lambda: NetDevice(bytes.fromhex("52540000000a")),
    lambda: ConsoleDevice([PortSpec(console=True), PortSpec("data")]),
    lambda: RngDevice(),
    lambda: BalloonDevice(deflate_on_oom=True),
    lambda: unix_vsock(3, os.path.join(_scratch, "v.sock")),
]


def _rings(inp: Input, g: GuardedMemory, base: int) -> None:
    """One queue's descriptor table and available ring, as the guest wrote them."""
    for i in range(QSIZE):
        if inp.num() & 0xF0 == 0xF0:  # raw bytes: any address, length, flags and next
            raw = inp.take(DESC.size)
        else:  # mostly sane: inside the data area, short, a plausible next
            addr = DATA + inp.num(2) % (MEM - DATA)
            b = inp.num()  # NEXT a quarter of the time, WRITE half, INDIRECT (16-byte entries) rarely
            flags = (VIRTQ_DESC_F_NEXT if b & 3 == 3 else 0) | (VIRTQ_DESC_F_WRITE if b & 4 else 0)
            length = inp.num(2) % 0x2000
            if b & 0xF0 == 0xF0:
                flags, length = VIRTQ_DESC_F_INDIRECT, 16 * (1 + length % 8)
            raw = DESC.pack(addr, length, flags, inp.num() % QSIZE)
        g.write(base + DESC.size * i, raw)
    avail = base + DESC.size * QSIZE
    count = inp.num() % (QSIZE + 1) if inp.num() & 0xF else QSIZE + 1 + inp.num() % 4
    heads = [inp.num() % QSIZE if inp.num() & 0x7F else inp.num(2) for _ in range(count)]
    g.write(avail, struct.pack(f"<HH{QSIZE}H", inp.num() & 1, count, *heads, *[0] * (QSIZE - count))[: 4 + 2 * QSIZE]
            if count <= QSIZE else struct.pack("<HH", 0, count))  # fmt: skip


def target(data: bytes) -> None:
    inp = Input(data)
    device = inp.pick(DEVICES)()
    g = GuardedMemory([(0, MEM)])
    try:
        n = device.max_queues
        drivers = [Driver(g.mem, QSIZE, RING_SPAN * i) for i in range(n)]
        for i in range(n):
            _rings(inp, g, RING_SPAN * i)
        filler = inp.rest(4096) or b"\0"
        g.write(DATA, (filler * (MEM // len(filler) + 1))[: MEM - DATA])
        event_idx, indirect = bool(inp.num() & 1), bool(inp.num() & 1)
        transport = FakeTransport({i: d.queue(event_idx=event_idx, indirect=indirect) for i, d in enumerate(drivers)},
                                  g.mem)  # fmt: skip
        device.attach(transport)
        features = device.features()
        if not event_idx:
            features &= ~bit(VIRTIO_F_EVENT_IDX)
        if not indirect:
            features &= ~bit(VIRTIO_F_INDIRECT_DESC)
        device.ack_features(features)
        for _ in range(1 + inp.num() % 4):  # kicks, timers and budget resumes, in the guest's order
            index = inp.num() % n
            q = transport.queues[index]
            with contextlib.suppress(VirtqueueError):  # the documented rejection: the device's error state
                device.drain(index, q)
            for index in transport.resumed:
                with contextlib.suppress(VirtqueueError):
                    device.drain(index, transport.queues[index])
            transport.resumed.clear()
            transport.run_timers()
        assert g.guards_intact(), "a device wrote outside guest memory"
    finally:
        device.detach()
        device.close()
        g.release()
