"""The disk interface the block backend serves, and the plain-file (raw) disk.

A Disk is a byte-addressed store of `size` bytes. Transfers go between the disk and lists of
memoryviews (views of guest memory, for the block backend) with no copy in Python where the
format allows it. Every method raises OSError on failure, including a short transfer (EIO):
the caller turns that into an I/O error for the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import Protocol

from slimvisor.memory import slice_views
from slimvisor.runtime.errors import SlimvisorError

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


class ImageLockedError(SlimvisorError, OSError):
    """Another open of the image holds a conflicting lock: a second writer, or a writer against readers."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message names the image and the holder; no "[Errno 11]"


_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid (Linux, 64-bit)


def lock_image(fd: int, path: str, readonly: bool, probe: bool = False) -> None:
    """Lock the whole image as QEMU does: an OFD write lock for a read-write open, a read lock for a
    readonly one, so two domains (or a domain and QEMU) never write one image, nor one write what
    others read. The lock belongs to this open file and goes with its last descriptor. With `probe`,
    only ask whether it could be taken now (F_OFD_GETLK), for a check before anything starts.
    Raises ImageLockedError naming the image and, when /proc shows it, the holder."""
    lock_type = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    want_lock = _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0)
    try:
        if not probe:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, want_lock)
        elif _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, want_lock))[0] != fcntl.F_UNLCK:
            raise OSError(errno.EAGAIN, "a conflicting lock")
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        st = os.fstat(fd)
        holders = ", ".join(f"pid {pid} ({name})" for pid, name in _lock_holders(st.st_dev, st.st_ino, os.getpid()))
        want = "readonly" if readonly else "read-write"
        raise ImageLockedError(
            errno.EAGAIN,
            f"{path}: in use by {holders or 'another process'}: locked, as an image has one writer or any "
            f"number of readers, and this open is {want}",
        ) from None


def _lock_holders(dev: int, ino: int, me: int) -> list[tuple[int, str]]:
    """Processes with a lock on the file (their /proc/PID/fdinfo shows it): who to name in the error.
    OFD locks show pid -1 in /proc/locks, so look at every process's open files instead."""
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (st.st_dev, st.st_ino) != (dev, ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if "lock:" not in f.read():
                        continue
                with open(f"/proc/{pid}/comm") as f:
                    found.append((pid, f.read().strip()))
                break
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return [h for h in found if h[0] != me] or found


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


BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t), linux/fs.h: a block device's size in bytes


def device_size(fd: int) -> int:
    """The size of an open file or block device (a block device's st_size is 0)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    return int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0])


def probe_raw(path: str, readonly: bool = False, locked_ok: bool = False) -> int:
    """Check what opening the image at `path` would (no conflicting lock, unless `locked_ok`)
    without taking the lock, and return its size. Raises ImageLockedError or OSError."""
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        if not locked_ok:
            lock_image(fd, path, readonly, probe=True)
        return device_size(fd)
    finally:
        os.close(fd)


class RawDisk:
    """A plain image file or a block device (xl's phy:): disk byte N is its byte N, straight into guest
    memory. A block device is also opened with O_DIRECT (no second copy in dom0's page cache) when it
    allows it; a transfer the device refuses as unaligned (EINVAL) goes through the buffered descriptor."""

    can_discard = True
    can_write_zeroes = True

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.direct = -1
        mode = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, mode)
        try:
            lock_image(self.fd, path, readonly)
            self.size = device_size(self.fd)
            if stat.S_ISBLK(os.fstat(self.fd).st_mode):
                with contextlib.suppress(OSError):  # a device (or file system) without O_DIRECT
                    self.direct = os.open(path, mode | os.O_DIRECT)
        except BaseException:
            self.close()
            raise

    def _transfer(self, write: bool, bufs: list[memoryview], offset: int) -> None:
        if self.direct >= 0:
            try:
                transfer(write, self.direct, bufs, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: buffers or offset not aligned as the device needs
                    raise
        transfer(write, self.fd, bufs, offset)

    def readv(self, bufs: list[memoryview], offset: int) -> None:
        self._transfer(False, bufs, offset)

    def writev(self, bufs: list[memoryview], offset: int) -> None:
        self._transfer(True, bufs, offset)

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        write_zeroes_fd(self.fd, offset, length, unmap)

    def close(self) -> None:
        if self.direct >= 0:
            os.close(self.direct)
            self.direct = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PendingDisk:
    """A disk whose image another holder still writes: a migration's source, until it stops and
    closes it. The target's device needs its size and features from the start (QEMU reads its config
    when it starts), but nothing is read, written or cached (an overlay's bitmap) before `open`,
    which the target calls once the source let go: then the image has its last bytes."""

    can_discard = True  # as RawDisk and OverlayDisk: the device offers the same features on both sides
    can_write_zeroes = True

    def __init__(self, path: str, size: int, readonly: bool, opener: Callable[[], Disk]) -> None:
        self.path, self.size, self.readonly, self.opener = path, size, readonly, opener

    def open(self) -> Disk:
        disk = self.opener()
        if disk.size != self.size:
            disk.close()
            raise OSError(errno.EIO, f"{self.path}: {disk.size} bytes now, {self.size} when the migration began")
        return disk

    def _not_yet(self, *_: object) -> None:
        """Every transfer before `open` (the guest is not running yet: none comes)."""
        raise OSError(errno.EIO, f"{self.path}: not yet handed over by the migration's source")

    readv = writev = discard = write_zeroes = _not_yet

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
