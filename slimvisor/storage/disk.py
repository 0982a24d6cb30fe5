"""The disk interface the block backend serves, and the plain-file (raw) disk.

A Disk is a byte-addressed store of `size` bytes. Transfers go between the disk and lists of
memoryviews (views of guest memory, for the block backend) with no copy in Python where the
format allows it. Every method raises OSError on failure, including a short transfer (EIO):
the caller turns that into an I/O error for the guest.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Protocol

from slimvisor.memory import slice_views

IOV_MAX = 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def transfer(write: bool, fd: int, bufs: list[memoryview], offset: int) -> None:
    """preadv/pwritev all of `bufs` at `offset` of `fd`, in IOV_MAX batches; short is EIO."""
    call = os.pwritev if write else os.preadv
    while bufs:
        batch, bufs = bufs[:IOV_MAX], bufs[IOV_MAX:]
        want = sum(len(b) for b in batch)
        n = call(fd, batch, offset)
        if n != want:  # short transfer: finish the rest one buffer at a time
            done = n
            for b in slice_views(batch, n, want - n):
                if call(fd, [b], offset + done) != len(b):
                    raise OSError(errno.EIO, f"short {'write' if write else 'read'} at offset {offset + done}")
                done += len(b)
        offset += want


def write_zeroes_fd(fd: int, offset: int, length: int, unmap: bool) -> None:
    """Make [offset, offset+length) of `fd` read as zeroes: punch or zero the range, else write zeroes."""
    mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE)
    try:
        fallocate(fd, mode, offset, length)
        return
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    zero = bytes(min(length, 1 << 20))
    while length:
        n = os.pwrite(fd, zero[:length], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset}")
        offset += n
        length -= n


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give [offset, offset+length) back to the file system (a hint: unsupported is fine)."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise


class Disk(Protocol):
    """What the block backend needs of a disk image, whatever its format."""

    path: str
    size: int  # bytes the guest sees
    readonly: bool
    can_discard: bool  # offer VIRTIO_BLK_F_DISCARD
    can_write_zeroes: bool  # offer VIRTIO_BLK_F_WRITE_ZEROES

    def readv(self, bufs: list[memoryview], offset: int) -> None:
        """Fill `bufs` from the disk at `offset` (the caller checked the range)."""

    def writev(self, bufs: list[memoryview], offset: int) -> None:
        """Write `bufs` to the disk at `offset` (the caller checked the range and readonly)."""

    def flush(self) -> None:
        """Make everything written so far durable."""

    def discard(self, offset: int, length: int) -> None:
        """A hint: the range may afterwards read as zeroes or as it was."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """The range reads as zeroes afterwards; `unmap` allows freeing its space."""

    def close(self) -> None:
        """Idempotent."""


class RawDisk:
    """A plain image file: disk byte N is file byte N, straight into guest memory."""

    can_discard = True
    can_write_zeroes = True

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self.fd).st_size
        except BaseException:
            self.close()
            raise

    def readv(self, bufs: list[memoryview], offset: int) -> None:
        transfer(False, self.fd, bufs, offset)

    def writev(self, bufs: list[memoryview], offset: int) -> None:
        transfer(True, self.fd, bufs, offset)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        write_zeroes_fd(self.fd, offset, length, unmap)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
