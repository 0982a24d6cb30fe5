"""Copy-on-write overlay disks: a sparse file of the clusters a guest changed over a raw base image.

Many domains can boot from one base image, each with its own small overlay; the base is only
ever opened read-only.

File layout (all integers little-endian)
----------------------------------------

    0                 header, HEADER_SIZE (4 KiB) bytes
    bitmap_offset     allocation bitmap, bitmap_length bytes
    data_offset       data area: virtual byte V of the disk is file byte data_offset + V

Header (the fixed part is _FIXED, 64 bytes; the base path follows it; the rest is zero):

    offset size  field
    0      8     magic             MAGIC, b"SVOVRLY\\n"
    8      4     version           VERSION (1)
    12     4     header_size       HEADER_SIZE: bytes of header the CRC covers
    16     4     cluster_size      power of two, MIN_CLUSTER_SIZE..MAX_CLUSTER_SIZE (default 64 KiB)
    20     4     flags             0 (any other bit: a feature this version does not know)
    24     8     virtual_size      bytes the guest sees; must equal the base image's size
    32     8     bitmap_offset     HEADER_SIZE
    40     8     bitmap_length     ceil(clusters / 8) rounded up to BITMAP_ALIGN
    48     8     data_offset       end of the bitmap rounded up to a cluster (so clusters are aligned)
    56     4     base_path_length  bytes of base path
    60     4     header_crc        zlib.crc32 of header_size bytes with this field zero
    64     n     base_path         absolute path of the raw base image, UTF-8, no NUL

Bitmap: bit (c % 8) of byte (c // 8) is set when cluster c (virtual bytes [c * cluster_size,
(c + 1) * cluster_size), the last one cut at virtual_size) lives in the data area; clear, it is
read from the base. The file is created at its full length (data_offset + virtual_size) and is
sparse, so the data area needs no mapping table: an overlay costs what the guest wrote.

I/O
---
Reads of allocated clusters come from the overlay and the rest from the base, coalesced into one
preadv per run of clusters, straight into the caller's buffers. A write goes to the data area in
one pwritev; when it only partly covers an unallocated cluster, the rest of that cluster is read
from the base and written in the same pwritev (copy-on-write). Then the clusters' bits are set,
in memory.

Durability: the bitmap on disk only changes at flush(): fdatasync the file (the data, copies and
holes), then write the dirty bitmap pages, then fdatasync again. So a bit on disk never points at
data that is not durable, and everything written before a flush is durable when it returns. Bits
only ever go from 0 to 1, so a torn bitmap write at a crash loses nothing that was flushed. An
unflushed write to an unallocated cluster may leave stale bytes in the data area with its bit
clear; they are never read, and a later write to that cluster copies (or overwrites) all of it.

Discard punches holes in whole allocated clusters (they read as zeroes; bits stay set); write
zeroes zeroes or punches the data area of whole clusters and sets their bits, and writes zeroes
(with copy-on-write) to partial ones, so zeroes always read back as zeroes, never as base data.

Backing chains are not supported: the base is a raw image. An overlay is locked while open as a
raw image is (`slimvisor.storage.disk.lock_image`: an OFD write lock, shared read locks readonly).
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from dataclasses import dataclass

from slimvisor.memory import slice_views
from slimvisor.runtime.errors import SlimvisorError
from slimvisor.storage.disk import ImageLockedError, lock_image, punch_hole, transfer, write_zeroes_fd

MAGIC = b"SVOVRLY\n"
VERSION = 1
HEADER_SIZE = 4096
BITMAP_ALIGN = 4096  # the bitmap is written back in pages of this size
MIN_CLUSTER_SIZE = 4096
MAX_CLUSTER_SIZE = 2 << 20
DEFAULT_CLUSTER_SIZE = 64 << 10
MAX_VIRTUAL_SIZE = 1 << 50
_FIXED = struct.Struct("<8sIIIIQQQQII")  # the fields above up to header_crc
_CRC_AT = 60
MAX_BASE_PATH = HEADER_SIZE - _FIXED.size


class OverlayError(SlimvisorError, ValueError):
    """A bad or unusable overlay image; the message names the file."""


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _bitmap_length(virtual_size: int, cluster_size: int) -> int:
    clusters = -(-virtual_size // cluster_size)
    return _round_up(-(-clusters // 8), BITMAP_ALIGN)


def _crc(header: bytes) -> int:
    return zlib.crc32(header[:_CRC_AT] + b"\0\0\0\0" + header[_CRC_AT + 4 :])


@dataclass(frozen=True)
class OverlayHeader:
    cluster_size: int
    virtual_size: int
    bitmap_offset: int
    bitmap_length: int
    data_offset: int
    base: str

    @property
    def clusters(self) -> int:
        return -(-self.virtual_size // self.cluster_size)

    def pack(self) -> bytes:
        path = self.base.encode()
        fixed = _FIXED.pack(MAGIC, VERSION, HEADER_SIZE, self.cluster_size, 0, self.virtual_size,
                            self.bitmap_offset, self.bitmap_length, self.data_offset, len(path), 0)  # fmt: skip
        header = (fixed + path).ljust(HEADER_SIZE, b"\0")
        return header[:_CRC_AT] + struct.pack("<I", _crc(header)) + header[_CRC_AT + 4 :]

    @classmethod
    def parse(cls, path: str, header: bytes, file_size: int) -> OverlayHeader:
        """Check everything the header says against itself and the file's size."""

        def bad(why: str) -> OverlayError:
            return OverlayError(f"{path}: {why}")

        if len(header) < _FIXED.size:
            raise bad(f"truncated header ({len(header)} bytes; an overlay header is {HEADER_SIZE})")
        magic, version, hsize, csize, flags, vsize, boff, blen, doff, plen, crc = _FIXED.unpack_from(header)
        if magic != MAGIC:
            raise bad("not a slimvisor overlay image (bad magic)")
        if version != VERSION:
            raise bad(f"overlay version {version} is not supported (this is version {VERSION})")
        if hsize != HEADER_SIZE:
            raise bad(f"header size {hsize}: expected {HEADER_SIZE}")
        if len(header) < HEADER_SIZE:
            raise bad(f"truncated header ({len(header)} of {HEADER_SIZE} bytes)")
        if crc != _crc(header[:HEADER_SIZE]):
            raise bad("header checksum mismatch (corrupt header)")
        if flags:
            raise bad(f"unknown feature flags {flags:#x}")
        if csize & (csize - 1) or not MIN_CLUSTER_SIZE <= csize <= MAX_CLUSTER_SIZE:
            raise bad(f"cluster size {csize}: expected a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}")
        if not 0 < vsize <= MAX_VIRTUAL_SIZE:
            raise bad(f"virtual size {vsize}: expected 1 to {MAX_VIRTUAL_SIZE} bytes")
        if boff != HEADER_SIZE:
            raise bad(f"bitmap offset {boff}: expected {HEADER_SIZE}")
        if blen != _bitmap_length(vsize, csize):
            raise bad(f"bitmap length {blen}: expected {_bitmap_length(vsize, csize)} for {vsize} bytes")
        if doff != _round_up(boff + blen, csize):
            raise bad(f"data offset {doff}: expected {_round_up(boff + blen, csize)}")
        if boff + blen > file_size:
            raise bad(f"bitmap (bytes {boff} to {boff + blen}) is beyond the end of the file ({file_size} bytes)")
        if doff + vsize > file_size:
            raise bad(f"data area (to byte {doff + vsize}) is beyond the end of the file ({file_size} bytes)")
        if not 0 < plen <= MAX_BASE_PATH:
            raise bad(f"base path length {plen}: expected 1 to {MAX_BASE_PATH}")
        try:
            base = header[_FIXED.size : _FIXED.size + plen].decode()
        except UnicodeDecodeError:
            raise bad("base path is not UTF-8") from None
        if "\0" in base or not os.path.isabs(base):
            raise bad(f"base path {base!r} is not an absolute path")
        return cls(csize, vsize, boff, blen, doff, base)


def read_header(path: str) -> OverlayHeader:
    """The checked header of the overlay at `path` (for tools: which base, how big)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return OverlayHeader.parse(path, f.read(HEADER_SIZE), size)


def is_overlay(path: str) -> bool:
    """Whether `path` starts with the overlay magic (a raw image a guest wrote could, too)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def create_overlay(path: str, base: str, cluster_size: int = DEFAULT_CLUSTER_SIZE) -> OverlayHeader:
    """Create a new, empty overlay at `path` over the raw image `base` (stored as an absolute path).

    `path` must not exist (FileExistsError). The file appears complete or not at all."""
    base = os.path.abspath(base)
    path = os.path.abspath(path)
    if cluster_size & (cluster_size - 1) or not MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE:
        raise OverlayError(f"{path}: cluster size {cluster_size}: expected a power of two "
                           f"from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}")  # fmt: skip
    if len(base.encode()) > MAX_BASE_PATH:
        raise OverlayError(f"{path}: base path {base!r} is longer than {MAX_BASE_PATH} bytes")
    try:
        with open(base, "rb") as f:
            vsize = os.fstat(f.fileno()).st_size
            if f.read(len(MAGIC)) == MAGIC:
                raise OverlayError(f"{path}: base {base} is itself an overlay; backing chains are not supported")
    except OSError as e:
        raise OverlayError(f"{path}: cannot read base image {base}: {e.strerror}") from None
    if not 0 < vsize <= MAX_VIRTUAL_SIZE:
        raise OverlayError(f"{path}: base image {base} is {vsize} bytes; expected 1 to {MAX_VIRTUAL_SIZE}")
    blen = _bitmap_length(vsize, cluster_size)
    header = OverlayHeader(cluster_size, vsize, HEADER_SIZE, blen, _round_up(HEADER_SIZE + blen, cluster_size), base)
    if os.path.exists(path):
        raise FileExistsError(errno.EEXIST, f"{path}: already exists")
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, header.pack(), 0)
        os.ftruncate(fd, header.data_offset + vsize)  # bitmap all clear, data area one hole
        os.fsync(fd)
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never replace a disk
    finally:
        os.close(fd)
        os.unlink(tmp)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return header


def _checked_header(fd: int, path: str, readonly: bool, probe: bool = False, locked_ok: bool = False) -> OverlayHeader:
    """The lock (taken, or with `probe` only asked for, or with `locked_ok` not even that) and the
    checked header of the overlay open at `fd`."""
    try:
        if not locked_ok:
            lock_image(fd, path, readonly, probe)
    except ImageLockedError as e:
        raise OverlayError(e.strerror) from None
    return OverlayHeader.parse(path, os.pread(fd, HEADER_SIZE, 0), os.fstat(fd).st_size)


def _open_base(fd: int, path: str, h: OverlayHeader) -> int:
    """Open the base the header names, read-only, checked against the overlay open at `fd`."""
    try:
        base_fd = os.open(h.base, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OverlayError(f"{path}: base image {h.base} is missing") from None
    except OSError as e:
        raise OverlayError(f"{path}: cannot open base image {h.base}: {e.strerror}") from None
    try:
        st, own = os.fstat(base_fd), os.fstat(fd)
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            raise OverlayError(f"{path}: the overlay is its own base")
        if st.st_size != h.virtual_size:
            raise OverlayError(f"{path}: base image {h.base} is {st.st_size} bytes, but the overlay was made "
                               f"over {h.virtual_size} bytes (base changed?)")  # fmt: skip
    except BaseException:
        os.close(base_fd)
        raise
    return base_fd


def probe_overlay(path: str, readonly: bool = False, locked_ok: bool = False) -> int:
    """Check what opening the overlay at `path` would (no conflicting lock, its header, its base)
    without taking the lock or reading the bitmap, and return its virtual size: the check before a
    domain starts leaves the image to the backend that serves it. Raises OverlayError or OSError."""
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        # parse() already placed the bitmap in the file
        h = _checked_header(fd, path, readonly, probe=True, locked_ok=locked_ok)
        os.close(_open_base(fd, path, h))
        return h.virtual_size
    finally:
        os.close(fd)


class OverlayDisk:
    """An open overlay: the Disk interface (slimvisor.storage.disk.Disk) over overlay + base."""

    can_discard = True
    can_write_zeroes = True

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.fd = self.base_fd = -1
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self._open()
        except BaseException:
            self._close_fds()
            raise

    def _open(self) -> None:
        path = self.path
        h = _checked_header(self.fd, path, self.readonly)
        self.header = h
        self.size = h.virtual_size
        self.cluster_size = h.cluster_size
        self.clusters = h.clusters
        self.data_offset = h.data_offset
        bitmap = os.pread(self.fd, h.bitmap_length, h.bitmap_offset)
        if len(bitmap) != h.bitmap_length:
            raise OverlayError(f"{path}: bitmap is beyond the end of the file")
        self.bitmap = bytearray(bitmap)
        self.dirty: set[int] = set()  # bitmap pages (BITMAP_ALIGN bytes) changed since the last flush
        self.base_fd = _open_base(self.fd, path, h)

    # -- bitmap ---------------------------------------------------------------------------------
    def allocated(self, cluster: int) -> bool:
        return bool(self.bitmap[cluster >> 3] >> (cluster & 7) & 1)

    def _mark(self, first: int, last: int) -> None:
        """Set the bits of clusters first..last (inclusive), in memory; flush() writes them."""
        for c in range(first, last + 1):
            byte = c >> 3
            if not self.bitmap[byte] >> (c & 7) & 1:
                self.bitmap[byte] |= 1 << (c & 7)
                self.dirty.add(byte // BITMAP_ALIGN)

    def _runs(self, offset: int, end: int) -> list[tuple[bool, int, int]]:
        """[offset, end) split into runs of clusters alike: (allocated, start, end)."""
        cs, bm = self.cluster_size, self.bitmap
        out: list[tuple[bool, int, int]] = []
        pos = offset
        c = offset // cs
        while pos < end:
            state = bm[c >> 3] >> (c & 7) & 1
            c += 1
            while c * cs < end and (bm[c >> 3] >> (c & 7) & 1) == state:
                c += 1
            stop = min(c * cs, end)
            out.append((bool(state), pos, stop))
            pos = stop
        return out

    def _check(self, offset: int, length: int, write: bool) -> None:
        if write and self.readonly:
            raise OSError(errno.EROFS, f"{self.path}: read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{self.path}: bytes {offset}+{length} are outside the disk")

    # -- Disk -----------------------------------------------------------------------------------
    def readv(self, bufs: list[memoryview], offset: int) -> None:
        length = sum(len(b) for b in bufs)
        self._check(offset, length, False)
        for allocated, start, stop in self._runs(offset, offset + length):
            views = bufs if stop - start == length else slice_views(bufs, start - offset, stop - start)
            if allocated:
                transfer(False, self.fd, views, self.data_offset + start)
            else:
                transfer(False, self.base_fd, views, start)

    def writev(self, bufs: list[memoryview], offset: int) -> None:
        length = sum(len(b) for b in bufs)
        self._check(offset, length, True)
        if not length:
            return
        end = offset + length
        cs = self.cluster_size
        first, last = offset // cs, (end - 1) // cs
        # copy-on-write: the rest of a new cluster the write only partly covers comes from the
        # base, in the same pwritev as the guest's data
        head = tail = b""
        if not self.allocated(first) and first * cs < offset:
            head = self._read_base(first * cs, offset)
        if not self.allocated(last) and end < min((last + 1) * cs, self.size):
            tail = self._read_base(end, min((last + 1) * cs, self.size))
        if head or tail:
            bufs = [memoryview(head), *bufs, memoryview(tail)]
        transfer(True, self.fd, bufs, self.data_offset + offset - len(head))
        self._mark(first, last)

    def _read_base(self, start: int, stop: int) -> bytes:
        data = os.pread(self.base_fd, stop - start, start)
        if len(data) != stop - start:
            raise OSError(errno.EIO, f"short read of base image {self.header.base} at {start}")
        return data

    def flush(self) -> None:
        if self.readonly:
            return
        os.fdatasync(self.fd)  # data first: no bit on disk may point at data that is not durable
        if self.dirty:
            mv = memoryview(self.bitmap)
            for page in sorted(self.dirty):
                at = page * BITMAP_ALIGN
                transfer(True, self.fd, [mv[at : at + BITMAP_ALIGN]], self.header.bitmap_offset + at)
            os.fdatasync(self.fd)
            self.dirty.clear()

    def _whole_clusters(self, offset: int, end: int) -> tuple[int, int]:
        """The span [lo, hi) of the clusters [offset, end) covers entirely (lo >= hi: none)."""
        cs = self.cluster_size
        lo = _round_up(offset, cs)
        hi = end if end == self.size else end // cs * cs
        return lo, hi

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        lo, hi = self._whole_clusters(offset, offset + length)
        if lo >= hi:
            return
        for allocated, start, stop in self._runs(lo, hi):
            if allocated:  # an unallocated cluster keeps reading the base: "as it was"
                punch_hole(self.fd, self.data_offset + start, stop - start)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check(offset, length, True)
        end = offset + length
        lo, hi = self._whole_clusters(offset, end)
        if lo >= hi:
            self._write_zero_bytes(offset, end)
            return
        self._write_zero_bytes(offset, lo)
        write_zeroes_fd(self.fd, self.data_offset + lo, hi - lo, unmap)
        self._mark(lo // self.cluster_size, (hi - 1) // self.cluster_size)
        self._write_zero_bytes(hi, end)

    def _write_zero_bytes(self, start: int, stop: int) -> None:
        if stop > start:
            self.writev([memoryview(bytes(stop - start))], start)

    def close(self) -> None:
        """Flush (a clean stop keeps everything), then close; idempotent."""
        if self.fd >= 0 and not self.readonly:
            with contextlib.suppress(OSError):
                self.flush()
        self._close_fds()

    def _close_fds(self) -> None:
        for name in ("fd", "base_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
