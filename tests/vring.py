"""The *driver* side of a split virtqueue, for tests: what a guest kernel does, in a few lines.

`GuardedMemory` cuts guest memory regions out of one larger bytearray (or anonymous mmap) and
fills everything around them with guard bytes, so a test can prove that nothing outside the
shared regions was ever touched. `Driver` lays out a descriptor table, available ring and used
ring (virtio 1.2 section 2.7) in a `GuestMemory`, adds chains (direct or indirect), publishes them
and reads back used elements. `SplitQueue` is the device side under test; the helper never uses
it, except `Driver.queue()` which builds one over the same rings for convenience. `FakeTransport`
is what a device attached to those queues sees of its transport, recorded.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from slimvisor.memory import GuestMemory, Region
from slimvisor.virtio.queue import SplitQueue
from slimvisor.virtio.spec import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_ELEM_SIZE,
)

DESC = struct.Struct("<QIHH")  # le64 addr, le32 len, le16 flags, le16 next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
GUARD_BYTE = 0xA5


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def address_of(view: memoryview) -> int:
    """Host address of the first byte of a non-empty writable memoryview."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


# -- memory -------------------------------------------------------------------------------------
class GuardedMemory:
    """Guest regions carved out of one host buffer, with guard bytes before, between and after.

    specs: (guest_addr, size) per region; the host buffer holds them in that order, each
    surrounded by `guard` bytes of GUARD_BYTE. User (front-end) addresses are guest + user_offset.
    """

    def __init__(
        self,
        specs: Sequence[tuple[int, int]],
        *,
        guard: int = 64,
        backing: str = "bytearray",
        user_offset: int = 0x7F00_0000_0000,
    ) -> None:
        total = guard + sum(size + guard for _, size in specs)
        if backing == "bytearray":
            self.buf: bytearray | mmap.mmap = bytearray([GUARD_BYTE]) * total
        elif backing == "mmap":
            self.buf = mmap.mmap(-1, total)
            self.buf[:] = bytes([GUARD_BYTE]) * total
        else:
            raise ValueError(backing)
        self._whole = memoryview(self.buf)
        self.base = address_of(self._whole)
        self.spans: list[tuple[int, int]] = []  # host offsets [start, end) of each region
        regions = []
        off = guard
        for guest_addr, size in specs:
            self._whole[off : off + size] = bytes(size)
            regions.append(Region(guest_addr, guest_addr + user_offset, self._whole[off : off + size]))
            self.spans.append((off, off + size))
            off += size + guard
        self.mem = GuestMemory(regions)
        self.user_offset = user_offset
        self._guard_snapshot = self._guards()

    def _guards(self) -> bytes:
        out, prev = [], 0
        for start, end in self.spans:
            out.append(bytes(self._whole[prev:start]))
            prev = end
        out.append(bytes(self._whole[prev:]))
        return b"".join(out)

    def guards_intact(self) -> bool:
        """True while every byte outside the shared regions still holds its guard value."""
        return self._guards() == self._guard_snapshot

    def inside(self, view: memoryview) -> bool:
        """Whether a memoryview (as handed out by GuestMemory/Chain) lies inside one region."""
        if len(view) == 0:
            return True
        start = address_of(view) - self.base
        return any(s <= start and start + len(view) <= e for s, e in self.spans)

    def write(self, addr: int, data: bytes) -> None:
        for v in self.mem.views(addr, len(data)):
            n = len(v)
            v[:] = data[:n]
            data = data[n:]

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.mem.views(addr, length))

    def release(self) -> None:
        """Drop every view so an mmap backing can be closed."""
        self.mem = GuestMemory()
        self._whole.release()
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()


# -- rings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    size: int
    desc: int
    avail: int
    used: int
    end: int


def layout(base: int, size: int) -> Layout:
    """Where a split ring of `size` entries goes from guest address `base` (2.7 alignment table)."""
    desc = align(base, 16)
    avail = desc + VIRTQ_DESC_SIZE * size
    used = align(avail + 6 + 2 * size, 4)  # flags, idx, ring[size], used_event
    end = used + 6 + VIRTQ_USED_ELEM_SIZE * size  # flags, idx, ring[size], avail_event
    return Layout(size, desc, avail, used, end)


Buf = tuple[int, int, bool]  # guest address, length, device-writable


class Driver:
    """The driver's half of one split virtqueue in guest memory."""

    def __init__(self, mem: GuestMemory, size: int, base: int, *, start_idx: int = 0) -> None:
        self.mem = mem
        self.size = size
        self.layout = layout(base, size)
        self.free = list(range(size))
        self.avail_idx = start_idx & 0xFFFF
        self.last_used = start_idx & 0xFFFF
        ring = mem.view(self.layout.desc, self.layout.end - self.layout.desc)
        ring[:] = bytes(len(ring))
        self._put16(self.layout.avail + 2, self.avail_idx)
        self._put16(self.layout.used + 2, self.last_used)

    # raw access
    def _view(self, addr: int, length: int) -> memoryview:
        return self.mem.view(addr, length)

    def _put16(self, addr: int, value: int) -> None:
        U16.pack_into(self._view(addr, 2), 0, value & 0xFFFF)

    def _get16(self, addr: int) -> int:
        return int(U16.unpack(self._view(addr, 2))[0])

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self._view(self.layout.desc + VIRTQ_DESC_SIZE * i, VIRTQ_DESC_SIZE), 0, addr, length, flags, nxt)

    def put_avail(self, head: int) -> None:
        """Place `head` in the next available slot and publish it (bump avail idx)."""
        self._put16(self.layout.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._put16(self.layout.avail + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self._put16(self.layout.avail + 2, self.avail_idx)

    @property
    def avail_flags(self) -> int:
        return self._get16(self.layout.avail)

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self._put16(self.layout.avail, value)

    @property
    def used_event(self) -> int:
        return self._get16(self.layout.avail + 4 + 2 * self.size)

    @used_event.setter
    def used_event(self, value: int) -> None:
        self._put16(self.layout.avail + 4 + 2 * self.size, value)

    @property
    def used_flags(self) -> int:
        return self._get16(self.layout.used)

    @property
    def used_idx(self) -> int:
        return self._get16(self.layout.used + 2)

    @property
    def avail_event(self) -> int:
        return self._get16(self.layout.used + 4 + VIRTQ_USED_ELEM_SIZE * self.size)

    # chains
    def add(self, bufs: Sequence[Buf], *, publish: bool = True) -> int:
        """Chain `bufs` through free descriptors; returns the head (published unless told not)."""
        if not bufs or len(bufs) > len(self.free):
            raise ValueError("no room for this chain")
        ids = [self.free.pop(0) for _ in bufs]
        for k, (i, (addr, length, writable)) in enumerate(zip(ids, bufs, strict=True)):
            last = k == len(ids) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.set_desc(i, addr, length, flags, 0 if last else ids[k + 1])
        if publish:
            self.put_avail(ids[0])
        return ids[0]

    def add_indirect(self, table_addr: int, bufs: Sequence[Buf], *, publish: bool = True) -> int:
        """Write `bufs` as an indirect table at `table_addr`; one ring descriptor points at it."""
        write_table(self.mem, table_addr, indirect_entries(bufs))
        head = self.free.pop(0)
        self.set_desc(head, table_addr, VIRTQ_DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT)
        if publish:
            self.put_avail(head)
        return head

    def used(self, *, rearm: bool = True) -> list[tuple[int, int]]:
        """Used elements (id, len) the device returned since the last call; frees their chains.

        Like Linux's virtqueue_get_buf, it then sets used_event to the next entry it expects
        (which only matters with EVENT_IDX), unless `rearm` is false.
        """
        out = []
        end = self.used_idx
        while self.last_used != end:
            slot = self.layout.used + 4 + VIRTQ_USED_ELEM_SIZE * (self.last_used % self.size)
            elem = USED_ELEM.unpack(self._view(slot, VIRTQ_USED_ELEM_SIZE))
            out.append((int(elem[0]), int(elem[1])))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._free_chain(elem[0])
        if rearm:
            self.used_event = self.last_used
        return out

    def _free_chain(self, head: int) -> None:
        i, seen = head, 0
        while 0 <= i < self.size and i not in self.free and seen < self.size:
            self.free.append(i)
            seen += 1
            _, _, flags, nxt = DESC.unpack(self._view(self.layout.desc + 16 * i, 16))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            i = nxt

    def queue(self, **kwargs: object) -> SplitQueue:
        """The device side over these rings (kwargs go to SplitQueue)."""
        lay = self.layout
        return SplitQueue(self.mem, self.size, lay.desc, lay.avail, lay.used, **kwargs)  # type: ignore[arg-type]


def indirect_entries(bufs: Sequence[Buf]) -> list[tuple[int, int, int, int]]:
    """Descriptor tuples (addr, len, flags, next) chaining `bufs` in table order."""
    out = []
    for k, (addr, length, writable) in enumerate(bufs):
        last = k == len(bufs) - 1
        flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
        out.append((addr, length, flags, 0 if last else k + 1))
    return out


def write_table(mem: GuestMemory, addr: int, descs: Iterable[tuple[int, int, int, int]]) -> None:
    """Write raw descriptors (addr, len, flags, next) contiguously at guest address `addr`."""
    raw = b"".join(DESC.pack(*d) for d in descs)
    mem.view(addr, len(raw))[:] = raw


# -- transport ----------------------------------------------------------------------------------
class FakeTransport:
    """The Transport protocol, recorded: queues by index, interrupts, the first failure, config
    notices, drain budget resumes, timers (run by `run_timers`), discards and host fd watches.

    Without `mem` a device that gives memory back fails the test; with `host_fds=False` so does
    one that watches a host fd.
    """

    def __init__(self, queues: dict[int, SplitQueue], mem: GuestMemory | None = None, *, host_fds: bool = True) -> None:
        self.queues = queues
        self.mem = mem
        self.host_fds = host_fds
        self.interrupts: list[int] = []
        self.failed: str | None = None
        self.config_changes = 0
        self.resumed: list[int] = []  # queues a device stopped at its drain budget
        self.discards: list[tuple[int, int]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}

    def queue(self, index: int) -> SplitQueue | None:
        return None if self.failed else self.queues.get(index)

    def interrupt(self, index: int) -> None:
        self.interrupts.append(index)

    def fail(self, why: str) -> None:
        self.failed = self.failed or why  # as VhostUserBackend: the first reason stays

    def config_changed(self) -> None:
        self.config_changes += 1

    def resume(self, index: int) -> None:
        self.resumed.append(index)

    def discard_memory(self, addr: int, length: int) -> None:
        assert self.mem is not None, "this device has no memory to give back"
        self.mem.discard(addr, length)
        self.discards.append((addr, length))

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))

    def run_timers(self) -> None:
        """Run the timers due so far (those they schedule wait for the next call)."""
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        assert self.host_fds, "this device has no host fds"
        assert fd not in self.readers
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        assert self.host_fds, "this device has no host fds"
        self.readers.pop(fd, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        assert self.host_fds, "this device has no host fds"
        assert fd not in self.writers
        self.writers[fd] = callback

    def remove_writer(self, fd: int) -> None:
        assert self.host_fds, "this device has no host fds"
        self.writers.pop(fd, None)
