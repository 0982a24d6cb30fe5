"""The split virtqueue (virtio 1.2 section 2.7), device side, sans-IO.

`SplitQueue` reads what the driver made available and writes what the device used, through
`GuestMemory` only. Everything it reads from the guest is hostile: every index, address, length
and flag is checked, and anything malformed raises `VirtqueueError`, which the device turns into
its error state. Notifications (eventfds) are the caller's business: `should_notify` only says
whether the driver asked for one.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

from slimvisor.memory import DirtyLog, GuestMemory, GuestMemoryError, slice_views
from slimvisor.runtime.errors import SlimvisorError
from slimvisor.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_ELEM_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from slimvisor.virtio.state import StateError, fields, flag, integer

_DESC = struct.Struct("<QIHH")
# Ring fields are read and written through typed views (memoryview.cast), in host byte order.
if sys.byteorder != "little":  # pragma: no cover - virtio 1.x rings are little-endian (2.7)
    raise ImportError("slimvisor's virtqueue needs a little-endian host")
# A chain's bytes must fit the used ring's le32 len (2.7.8).
MAX_CHAIN_BYTES = 0xFFFFFFFF


_FENCE = threading.Lock()


def full_barrier() -> None:
    """virtio_mb() on the device side: our ring stores are visible before our next ring load.

    x86 lets a load pass an earlier store, and the driver runs on another CPU: without this,
    publishing avail_event (or the used index) and then reading the avail index (or used_event)
    can both see the driver's old values while the driver sees ours, and nobody kicks nor
    interrupts again (a transmit ring that stalls for good). Taking and releasing a lock
    synchronizes memory (POSIX 4.12): glibc does it with locked instructions, a full fence.
    """
    with _FENCE:
        pass


class VirtqueueError(SlimvisorError):
    """The driver broke the virtqueue rules; the device must stop using this queue."""


@dataclass(slots=True)
class Chain:
    """One descriptor chain: device-readable buffers, then device-writable ones (2.7.4.2).

    The byte counts are taken when the chain is walked (SplitQueue builds every Chain).
    `reach`: how far into the writable part `write` wrote, which a device may report short of
    (virtio-blk's status byte after a failed read): the dirty log marks up to it too.
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    readable_len: int
    writable_len: int
    reach: int = 0

    def read(self, start: int, length: int) -> bytes:
        """Copy out up to `length` device-readable bytes starting at `start` (headers, small data)."""
        views = self.readable
        if views and start + length <= len(views[0]):  # the common case: one buffer holds it all
            return bytes(views[0][start : start + length])
        return b"".join(slice_views(views, start, length))

    def write(self, start: int, data: bytes | memoryview) -> int:
        """Copy `data` into the device-writable buffers at `start`; returns how many bytes fit."""
        src = data if isinstance(data, memoryview) else memoryview(data)  # slices without copies
        views = self.writable
        if len(views) == 1:
            v = views[0]
            n = max(0, min(len(v) - start, len(src)))
            v[start : start + n] = src[:n]
            if n:
                self.reach = max(self.reach, start + n)
            return n
        done = 0
        for v in slice_views(self.writable, start, len(src)):
            n = len(v)
            v[:] = src[done : done + n]
            done += n
        if done:
            self.reach = max(self.reach, start + done)
        return done


class SplitQueue:
    """Device-side state of one split virtqueue."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        last_avail_idx: int = 0,
    ) -> None:
        if not 0 < size <= VIRTQ_MAX_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 up to {VIRTQ_MAX_SIZE}")
        # 2.7 table "Virtqueue Part Alignment": descriptors 16, available ring 2, used ring 4.
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise VirtqueueError("misaligned virtqueue part")
        try:
            self._desc = mem.view(desc_addr, VIRTQ_DESC_SIZE * size)
            avail = mem.view(avail_addr, 6 + 2 * size)
            used = mem.view(used_addr, 6 + VIRTQ_USED_ELEM_SIZE * size)
        except GuestMemoryError as e:
            raise VirtqueueError(f"virtqueue outside shared memory: {e}") from e
        # Every field the driver reads while we write it is stored with one typed store.
        # struct.pack_into would not do: CPython zeroes the bytes first and then writes the value,
        # and a driver on another CPU that reads the used index in that instant sees 0 and takes
        # stale ring entries as used ("id N is not a head!"); a zero avail_event loses kicks.
        self._avail = avail.cast("H")  # flags [0], idx [1], ring [2:2+size], used_event [2+size]
        self._used = used.cast("H")  # flags [0], idx [1], ..., avail_event [2+4*size]
        self._used_elems = used[4 : 4 + VIRTQ_USED_ELEM_SIZE * size].cast("I")  # id, len, id, len...
        self.mem = mem
        self.addrs = (desc_addr, avail_addr, used_addr)
        # (first, end, bytes) of each region, for `_in_one_region`
        self._spans = [(r.guest_addr, r.guest_addr + r.size, r.data) for r in mem.regions]
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx: int = self._used[1]
        self._signalled_used: int | None = None
        self._used_event = 2 + size  # in _avail
        self._avail_event = 2 + 4 * size  # in _used
        self.dirty_log: DirtyLog | None = None
        self._used_log: int | None = None
        # head -> the writable (addr, len)s of a chain taken while logging, and the chain
        self._writable_at: dict[int, tuple[list[tuple[int, int]], Chain | None]] = {}

    # -- dirty logging (migration) --------------------------------------------------------------
    def log_writes(self, log: DirtyLog | None, used_log_addr: int | None = None) -> None:
        """Mark in `log` every byte this queue hands back written (while `log` is not None): the
        first `len` bytes of each used chain's device-writable buffers (or up to where
        `Chain.write` reached, if further), and, when `used_log_addr` is given, the used ring's
        flags, index, elements and avail_event at that guest-physical address (vhost-user's
        log_guest_addr). Every device writes guest memory only into chains it pushes, so this is
        the one place that marks for all of them.

        Chains popped before logging started are not known: call this between requests (the
        transport does, from its own messages), not while a device holds chains."""
        self.dirty_log = log
        self._used_log = used_log_addr if log is not None else None
        if log is None:
            self._writable_at = {}

    def _mark_used(self, used: list[tuple[int, int]], first_idx: int) -> None:
        """After the used elements and index are stored: mark the buffers and the ring."""
        log, writable_at = self.dirty_log, self._writable_at
        assert log is not None
        try:
            for head, written in used:
                ranges, chain = writable_at.pop(head, ((), None))
                if chain is not None:
                    written = max(written, chain.reach)
                for addr, length in ranges:
                    if written <= 0:
                        break
                    n = min(length, written)
                    log.mark(addr, n)
                    written -= n
            base = self._used_log
            if base is not None:
                slot, n = first_idx % self.size, len(used)
                ahead = min(n, self.size - slot)
                log.mark(base + 4 + VIRTQ_USED_ELEM_SIZE * slot, VIRTQ_USED_ELEM_SIZE * ahead)
                if n > ahead:  # the elements wrapped to the start of the ring
                    log.mark(base + 4, VIRTQ_USED_ELEM_SIZE * (n - ahead))
                log.mark(base, 4)  # flags and idx
        except GuestMemoryError as e:
            raise VirtqueueError(f"dirty log: {e}") from e

    def _mark_ring(self, offset: int, length: int) -> None:
        """A used ring field we stored outside a push (flags, avail_event)."""
        if self._used_log is not None and self.dirty_log is not None:
            try:
                self.dirty_log.mark(self._used_log + offset, length)
            except GuestMemoryError as e:
                raise VirtqueueError(f"dirty log: {e}") from e

    # -- saved state (migration) ----------------------------------------------------------------
    STATE_FIELDS = ("size", "desc_addr", "avail_addr", "used_addr", "last_avail_idx", "used_idx", "event_idx",
                    "indirect")  # fmt: skip

    def save(self) -> dict[str, Any]:
        """Where the rings are and how far the device got: plain data, for `restore`."""
        desc, avail, used = self.addrs
        return {"size": self.size, "desc_addr": desc, "avail_addr": avail, "used_addr": used,
                "last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx,
                "event_idx": self.event_idx, "indirect": self.indirect}  # fmt: skip

    @classmethod
    def restore(cls, mem: GuestMemory, state: object) -> SplitQueue:
        """A queue over `mem` from `save()`'s data, which is untrusted: every field is checked
        (types, ranges) and the rings must lie in `mem`, as the constructor demands of a driver."""
        what = "virtqueue"
        st = fields(state, what, cls.STATE_FIELDS)
        addr_max = (1 << 64) - 1
        size, last, used = (integer(st, "size", what, 1, VIRTQ_MAX_SIZE),
                            integer(st, "last_avail_idx", what, 0, 0xFFFF), integer(st, "used_idx", what, 0, 0xFFFF))
        if (last - used) & 0xFFFF > size:  # at most a ring's worth of chains taken and not yet returned
            raise StateError(f"{what}: used_idx {used} is more than {size} behind last_avail_idx {last}")
        try:
            q = cls(
                mem, size, integer(st, "desc_addr", what, 0, addr_max), integer(st, "avail_addr", what, 0, addr_max),
                integer(st, "used_addr", what, 0, addr_max),
                event_idx=flag(st, "event_idx", what), indirect=flag(st, "indirect", what), last_avail_idx=last,
            )  # fmt: skip
        except VirtqueueError as e:
            raise StateError(f"{what}: {e}") from None
        q.used_idx = used
        return q

    # -- available ring -------------------------------------------------------------------------
    def _avail_idx(self) -> int:
        idx: int = self._avail[1]
        if (idx - self.last_avail_idx) & 0xFFFF > self.size:
            raise VirtqueueError(f"available index jumped from {self.last_avail_idx} to {idx}")
        return idx

    def has_available(self) -> bool:
        return self._avail_idx() != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has made nothing more available."""
        if self._avail_idx() == self.last_avail_idx:
            return None
        head: int = self._avail[2 + self.last_avail_idx % self.size]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head < self.size:  # one direct descriptor in one region (receive buffers): no walk
            addr, length, flags, _ = _DESC.unpack_from(self._desc, head * VIRTQ_DESC_SIZE)
            if not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
                v = self._in_one_region(addr, length)
                if v is not None:
                    if flags & VIRTQ_DESC_F_WRITE:
                        chain = Chain(head, [], [v], 0, length)
                        if self.dirty_log is not None:
                            self._writable_at[head] = ([(addr, length)], chain)
                        return chain
                    return Chain(head, [v], [], length, 0)
        return self._walk(head)  # and the walk splits a buffer across regions, or refuses it

    def take_writable(self, need: int, *, min_len: int = 0) -> list[tuple[int, memoryview]] | None:
        """Receive buffers, one direct device-writable descriptor of at least `min_len` bytes each,
        until they hold `need` bytes: (head, view) pairs, taken off the ring. None, with nothing
        taken, when the ring has too few or one is of any other shape (`pop` them one by one).

        For a receiver that spreads a packet over many buffers (virtio-net's MRG_RXBUF): no
        `Chain` per buffer, one look at the available index.
        """
        avail = self._avail_idx()
        idx, size, ring, desc = self.last_avail_idx, self.size, self._avail, self._desc
        taken: list[tuple[int, memoryview]] = []
        logging, addrs = self.dirty_log is not None, []  # addrs: each buffer's, for the dirty log
        room = 0
        while room < need:
            if idx == avail:
                return None
            head: int = ring[2 + idx % size]
            if head >= size:
                return None
            addr, length, flags, _ = _DESC.unpack_from(desc, head * VIRTQ_DESC_SIZE)
            if flags != VIRTQ_DESC_F_WRITE or length < min_len:
                return None
            view = self._in_one_region(addr, length)
            if view is None:
                return None
            if logging:
                addrs.append(addr)
            taken.append((head, view))
            room += length
            idx = (idx + 1) & 0xFFFF
        self.last_avail_idx = idx
        if logging:
            for (head, view), addr in zip(taken, addrs, strict=True):
                self._writable_at[head] = ([(addr, len(view))], None)  # written exactly as pushed
        return taken

    def _in_one_region(self, addr: int, length: int) -> memoryview | None:
        """[addr, addr+length) when one shared region holds it all: the common case, without the
        bisect and the exception of `GuestMemory.view`. None sends the caller the long way."""
        for first, end, data in self._spans:
            if first <= addr and addr + length <= end:
                return data[addr - first : addr - first + length]
        return None

    def unpop(self) -> None:
        """Give back the chain `pop` just returned (not yet pushed): it will be popped again.

        For devices that must wait (a rate limit, no room on the host side) before serving it.
        """
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        writable_at: list[tuple[int, int]] = []
        table, table_size, idx = self._desc, self.size, head
        in_indirect = seen_writable = False
        count = total = rlen = 0
        while True:
            if idx >= table_size:
                raise VirtqueueError(f"descriptor index {idx} beyond table of {table_size}")
            count += 1
            if count > table_size:
                raise VirtqueueError(f"descriptor chain from head {head} loops or is too long")
            addr, length, flags, nxt = _DESC.unpack_from(table, idx * VIRTQ_DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3.1: no nested tables, no NEXT beside INDIRECT, whole descriptors only.
                if not self.indirect or in_indirect or flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"invalid indirect descriptor in chain {head}")
                if length == 0 or length % VIRTQ_DESC_SIZE or length // VIRTQ_DESC_SIZE > VIRTQ_MAX_SIZE:
                    raise VirtqueueError(f"indirect table length {length} is invalid")
                try:
                    table = self.mem.view(addr, length)
                except GuestMemoryError as e:
                    raise VirtqueueError(str(e)) from e
                table_size, idx, count, in_indirect = length // VIRTQ_DESC_SIZE, 0, 0, True
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"chain {head} is longer than {MAX_CHAIN_BYTES} bytes")
            view = self._in_one_region(addr, length)
            if view is not None:
                views = [view]
            else:
                try:
                    views = self.mem.views(addr, length)
                except GuestMemoryError as e:
                    raise VirtqueueError(f"chain {head}: {e}") from e
            if flags & VIRTQ_DESC_F_WRITE:
                writable.extend(views)
                writable_at.append((addr, length))
                seen_writable = True
            elif seen_writable:
                raise VirtqueueError(f"chain {head} has a device-readable buffer after a writable one")
            else:
                readable.extend(views)
                rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                chain = Chain(head, readable, writable, rlen, total - rlen)
                if self.dirty_log is not None:
                    self._writable_at[head] = (writable_at, chain)
                return chain
            idx = nxt

    # -- used ring ------------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes written into it."""
        self.push_many([(head, written)])

    def push_many(self, used: list[tuple[int, int]]) -> None:
        """Return several chains at once: the driver sees all of them or none (5.1.6.4: the
        buffers of one merged receive packet must be complete when the driver looks)."""
        elems, size, idx = self._used_elems, self.size, self.used_idx
        first = idx
        for head, written in used:
            slot = 2 * (idx % size)
            elems[slot] = head
            elems[slot + 1] = written
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self._used[1] = idx  # after the elements: x86 keeps store order
        if self.dirty_log is not None:
            self._mark_used(used, first)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last notification."""
        old, new = self._signalled_used, self.used_idx
        if old == new:
            return False
        self._signalled_used = new
        full_barrier()  # the used index we pushed, before the driver's wishes we read (vhost_notify)
        if self.event_idx:
            if old is None:
                return True
            used_event: int = self._avail[self._used_event]
            # 2.7.10 / vring_need_event(): did new_idx step past used_event?
            return bool((new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF)
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_kicks(self) -> None:
        """Tell the driver it need not kick while we are already draining the ring."""
        if not self.event_idx:
            self._used[0] = VIRTQ_USED_F_NO_NOTIFY
            self._mark_ring(0, 2)

    def enable_kicks(self) -> bool:
        """Ask for a kick on the next buffer; True if buffers arrived meanwhile (drain again)."""
        if self.event_idx:
            self._used[self._avail_event] = self.last_avail_idx
            self._mark_ring(2 * self._avail_event, 2)
        else:
            self._used[0] = 0
            self._mark_ring(0, 2)
        full_barrier()  # our wish for a kick, before the avail index we check (vhost_enable_notify)
        return self.has_available()
