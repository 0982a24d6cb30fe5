"""Guest memory: the regions a front-end shared with us, and bounds-checked access to them.

This is slimvisor's grant table. A backend sees guest memory only through `GuestMemory`, which
hands out memoryviews strictly inside shared regions; any address or length that leaves them
raises `GuestMemoryError`. Devices never hold raw pointers, so a hostile guest address cannot
reach anything the guest did not share.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from slimvisor.runtime.errors import SlimvisorError

# vhost-user "Migration": the dirty log has one bit per page of this size, of guest-physical memory.
VHOST_LOG_PAGE = 0x1000


class GuestMemoryError(SlimvisorError):
    """A guest address or length outside the memory the guest shared."""


class DirtyLog(Protocol):
    """Where a device's writes into guest memory are told, page by page, while the guest migrates
    (vhost-user's log, KVM's dirty bitmap): the front-end copies the pages marked since it last
    looked. Whoever writes guest memory calls `mark` after the bytes are written, never before:
    a page marked first could be copied, and its mark cleared, before the write lands."""

    def mark(self, addr: int, length: int) -> None:
        """[addr, addr+length) of guest-physical memory was written; raises GuestMemoryError
        for a page the log does not cover."""


def dirty_words(addr: int, length: int) -> list[tuple[int, int]]:
    """The log's 64-bit words and the bits in each that mark [addr, addr+length): page p is bit
    p % 64 of little-endian word p // 64, i.e. bit p % 8 of byte p // 8 (vhost-user "Migration").

    One word covers 64 pages (256 KiB), so marking a 1 MiB write is 4 or 5 atomic ORs."""
    if length <= 0:
        return []
    first, last = addr // VHOST_LOG_PAGE, (addr + length - 1) // VHOST_LOG_PAGE
    out = []
    for word in range(first >> 6, (last >> 6) + 1):
        lo = max(first, word << 6) & 63
        hi = min(last, (word << 6) | 63) & 63
        out.append((word, ((1 << (hi - lo + 1)) - 1) << lo))
    return out


def log_bytes_for(end: int) -> int:
    """Bytes of dirty log that cover guest-physical addresses [0, end), in whole 64-bit words."""
    pages = -(-end // VHOST_LOG_PAGE)
    return -(-pages // 64) * 8


@dataclass(frozen=True)
class Region:
    """One contiguous piece of guest memory.

    guest_addr: where the guest (its descriptors) sees it; user_addr: where the front-end process
    has it mapped (vhost-user ring addresses use these); data: our own view of the bytes.
    """

    guest_addr: int
    user_addr: int
    data: memoryview
    mapping: mmap.mmap | None = None  # when `data` is a shared mapping: lets us give pages back
    mapping_offset: int = 0  # where `data` starts inside `mapping`

    @property
    def size(self) -> int:
        return len(self.data)


class GuestMemory:
    """A set of non-overlapping regions, looked up by guest or front-end address."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._regions = sorted(regions, key=lambda r: r.guest_addr)
        self._starts = [r.guest_addr for r in self._regions]
        for a, b in zip(self._regions, self._regions[1:], strict=False):
            if a.guest_addr + a.size > b.guest_addr:
                raise GuestMemoryError(f"overlapping regions at {b.guest_addr:#x}")

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def view(self, addr: int, length: int) -> memoryview:
        """One contiguous view of [addr, addr+length): the common case, and what rings need."""
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"bad guest range {addr:#x}+{length}")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            off = addr - r.guest_addr
            if off + length <= r.size:
                return r.data[off : off + length]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not in shared memory")

    def views(self, addr: int, length: int) -> list[memoryview]:
        """Views covering [addr, addr+length), split where it crosses adjacent regions."""
        try:
            return [self.view(addr, length)]
        except GuestMemoryError:
            pass
        out: list[memoryview] = []
        while length > 0:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0:
                raise GuestMemoryError(f"guest address {addr:#x} is not in shared memory")
            r = self._regions[i]
            off = addr - r.guest_addr
            if off >= r.size:
                raise GuestMemoryError(f"guest address {addr:#x} is not in shared memory")
            n = min(length, r.size - off)
            out.append(r.data[off : off + n])
            addr += n
            length -= n
        return out

    def discard(self, addr: int, length: int) -> None:
        """Give the host memory behind [addr, addr+length) back (balloon inflate): it reads as zeros.

        Shared file mappings punch a hole in the file (MADV_REMOVE), which frees the front-end's
        pages too; anything else is zeroed.
        """
        view = self.view(addr, length)
        r = self._regions[bisect.bisect_right(self._starts, addr) - 1]
        if r.mapping is not None and addr % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0:
            start = r.mapping_offset + addr - r.guest_addr
            if start % mmap.PAGESIZE == 0:
                r.mapping.madvise(mmap.MADV_REMOVE, start, length)
                return
        view[:] = bytes(length)

    def user_to_guest(self, user_addr: int) -> int:
        """Translate a front-end virtual address (vhost-user vring addresses) to a guest address."""
        for r in self._regions:
            if r.user_addr <= user_addr < r.user_addr + r.size:
                return r.guest_addr + (user_addr - r.user_addr)
        raise GuestMemoryError(f"front-end address {user_addr:#x} is not in shared memory")


def map_fd_region(fd: int, guest_addr: int, user_addr: int, size: int, mmap_offset: int) -> Region:
    """mmap `size` bytes of a shared memory fd starting at `mmap_offset` (vhost-user SET_MEM_TABLE).

    The mapping starts on an allocation-granularity boundary below mmap_offset; the region's view
    begins exactly at mmap_offset so that nothing before it is reachable.
    """
    if size <= 0 or mmap_offset < 0 or guest_addr < 0 or user_addr < 0:
        raise GuestMemoryError(f"bad memory region size={size:#x} offset={mmap_offset:#x}")
    end = os.fstat(fd).st_size
    if mmap_offset + size > end:
        raise GuestMemoryError(
            f"memory region {mmap_offset:#x}+{size:#x} is beyond the end of its file ({end:#x})"
        )
    base = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
    lead = mmap_offset - base
    m = mmap.mmap(fd, lead + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    return Region(guest_addr, user_addr, memoryview(m)[lead : lead + size], m, lead)


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes [start, start+length) of the concatenation of `views`."""
    out: list[memoryview] = []
    for v in views:
        n = len(v)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        if take <= 0:
            break
        out.append(v[start : start + take])
        length -= take
        start = 0
    return out
