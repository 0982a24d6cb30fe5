"""The front-end's dirty log (vhost-user "Migration", SET_LOG_BASE), mapped and marked atomically.

The log is shared: the front-end (QEMU) reads and clears it word by word with atomic exchanges
while every backend of the guest (this process, the switch for net devices, a
qemu-storage-daemon) sets bits in it. A Python read-modify-write of a byte would lose a bit
another writer set in between, so each word is ORed by one locked instruction: libatomic's
`__atomic_fetch_or_8` through ctypes. Which words and bits is `memory.dirty_words`' business.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

from slimvisor.memory import VHOST_LOG_PAGE, GuestMemoryError, dirty_words

_ATOMIC_SEQ_CST = 5  # GCC's __ATOMIC_SEQ_CST: on x86 a locked OR, a full barrier either way
_LIBATOMIC = "libatomic.so.1"


def _fetch_or() -> Callable[[int, int, int], int]:
    """uint64_t __atomic_fetch_or_8(volatile void *ptr, uint64_t bits, int memorder)."""
    f = ctypes.CDLL(_LIBATOMIC).__atomic_fetch_or_8
    f.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
    f.restype = ctypes.c_uint64
    return f


_FETCH_OR = _fetch_or()


class SharedDirtyLog:
    """`size` bytes of log at `offset` of `fd` (a file the caller checked cannot shrink), mapped
    shared; `mark` sets the bits of the pages written. The fd is not kept."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if size <= 0 or size % 8 or offset < 0 or offset % 8:
            raise GuestMemoryError(f"bad dirty log size={size:#x} offset={offset:#x} (whole 64-bit words)")
        end = os.fstat(fd).st_size
        if offset + size > end:
            raise GuestMemoryError(f"dirty log {offset:#x}+{size:#x} is beyond the end of its file ({end:#x})")
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._map = mmap.mmap(fd, offset - base + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        self._start = offset - base
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._map)  # a buffer export: see close
        self._addr = ctypes.addressof(self._anchor) + self._start
        self.size = size
        self.words = size // 8
        self.covers = size * 8 * VHOST_LOG_PAGE  # guest-physical addresses [0, covers)

    def mark(self, addr: int, length: int) -> None:
        if length <= 0:
            return
        if addr < 0 or addr + length > self.covers:
            raise GuestMemoryError(
                f"guest range {addr:#x}+{length:#x} is beyond the dirty log (it covers {self.covers:#x})"
            )
        base, fetch_or = self._addr, _FETCH_OR
        first = addr // VHOST_LOG_PAGE
        if first >> 6 == (addr + length - 1) // VHOST_LOG_PAGE >> 6:  # one word: most writes
            last = (addr + length - 1) // VHOST_LOG_PAGE
            fetch_or(base + (first >> 6) * 8, ((1 << (last - first + 1)) - 1) << (first & 63), _ATOMIC_SEQ_CST)
            return
        for word, bits in dirty_words(addr, length):
            fetch_or(base + word * 8, bits, _ATOMIC_SEQ_CST)

    def read(self) -> bytes:
        """The log's bytes as they are now (tests, and a front-end's view)."""
        return bytes(self._map[self._start : self._start + self.size])

    def close(self) -> None:
        """Unmap; the ctypes view of the map must go first (an exported buffer cannot be closed)."""
        if self._anchor is not None:
            self.covers = 0  # `mark` refuses everything from now on: no write through a stale address
            self._anchor = None
            self._map.close()
