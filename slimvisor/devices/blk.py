"""virtio-blk (virtio 1.2 section 5.2) over a raw image file.

Reads and writes go straight between the image and guest memory with preadv/pwritev on views of
the shared mapping: no copy in Python. Requests outside the disk get VIRTIO_BLK_S_IOERR; a chain
that is not a block request at all (no header, no status byte) raises VirtqueueError.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import Chain, VirtqueueError, slice_views
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK, bit

# 5.2.3 Feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# 5.2.6 Device Operation: request types and status values
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512  # 5.2.6: sector numbers are in 512-byte units whatever blk_size says
BLK_SIZE = 512  # logical block size the guest sees, as QEMU's default
DISCARD_ALIGNMENT = 4096
SEG_MAX = 254  # queue size 256 minus header and status descriptors
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32
IOV_MAX = 1024

_REQ_HEADER = struct.Struct("<IIQ")  # le32 type, le32 reserved, le64 sector
_DISCARD_SEG = struct.Struct("<QII")  # le64 sector, le32 num_sectors, le32 flags
# 5.2.4 struct virtio_blk_config up to write_zeroes_may_unmap and its padding
_CONFIG = struct.Struct("<QII4sI8sBBHIIIIIB3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class BlockDevice(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK

    def __init__(self, path: str, *, readonly: bool = False, serial: str = "", num_queues: int = 1) -> None:
        super().__init__()
        self.path = path
        self.readonly = readonly
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.fstat(self.fd).st_size
            if size < SECTOR_SIZE:
                raise ValueError(f"{path}: a disk image must hold at least one {SECTOR_SIZE}-byte sector")
        except BaseException:
            os.close(self.fd)
            raise
        self.capacity = size // SECTOR_SIZE
        self.serial = (serial or os.path.basename(path)).encode()[:VIRTIO_BLK_ID_BYTES]
        self.max_queues = num_queues

    def device_features(self) -> int:
        f = bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        if self.readonly:
            f |= bit(VIRTIO_BLK_F_RO)
        if self.max_queues > 1:
            f |= bit(VIRTIO_BLK_F_MQ)
        return f

    def config(self) -> bytes:
        return _CONFIG.pack(
            self.capacity, 0, SEG_MAX, b"\0" * 4, BLK_SIZE, b"\0" * 8, 0, 0, self.max_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT // SECTOR_SIZE,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
        )  # fmt: skip

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests -------------------------------------------------------------------------------
    def handle(self, queue_index: int, chain: Chain) -> int:
        rlen, wlen = chain.readable_len, chain.writable_len
        if rlen < _REQ_HEADER.size or wlen < 1:
            raise VirtqueueError(f"block request {chain.head} has no header or no status byte")
        rtype, _, sector = _REQ_HEADER.unpack(chain.read(0, _REQ_HEADER.size))
        written = 0
        try:
            if rtype == VIRTIO_BLK_T_IN:
                data = slice_views(chain.writable, 0, wlen - 1)
                status = self._io(False, data, sector, wlen - 1)
                written = wlen - 1 if status == VIRTIO_BLK_S_OK else 0
            elif rtype == VIRTIO_BLK_T_OUT:
                data = slice_views(chain.readable, _REQ_HEADER.size, rlen - _REQ_HEADER.size)
                status = (
                    VIRTIO_BLK_S_IOERR
                    if self.readonly
                    else self._io(True, data, sector, rlen - _REQ_HEADER.size)
                )
            elif rtype == VIRTIO_BLK_T_FLUSH:
                if not self.readonly:
                    os.fdatasync(self.fd)
                status = VIRTIO_BLK_S_OK
            elif rtype == VIRTIO_BLK_T_GET_ID:
                written = chain.write(0, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[: wlen - 1])
                status = VIRTIO_BLK_S_OK
            elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                status = self._discard(chain, rtype == VIRTIO_BLK_T_DISCARD)
            else:
                status = VIRTIO_BLK_S_UNSUPP
        except OSError:
            status, written = VIRTIO_BLK_S_IOERR, 0
        chain.write(wlen - 1, bytes([status]))
        return written + 1

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR_SIZE == 0 and sector + nbytes // SECTOR_SIZE <= self.capacity

    def _io(self, write: bool, bufs: list[memoryview], sector: int, nbytes: int) -> int:
        if not self._in_range(sector, nbytes):
            return VIRTIO_BLK_S_IOERR
        offset = sector * SECTOR_SIZE
        call = os.pwritev if write else os.preadv
        while bufs:
            batch, bufs = bufs[:IOV_MAX], bufs[IOV_MAX:]
            want = sum(len(b) for b in batch)
            n = call(self.fd, batch, offset)
            if n != want:  # short transfer: finish the rest one buffer at a time
                done = n
                for b in slice_views(batch, n, want - n):
                    if call(self.fd, [b], offset + done) != len(b):
                        return VIRTIO_BLK_S_IOERR
                    done += len(b)
            offset += want
        return VIRTIO_BLK_S_OK

    def _discard(self, chain: Chain, discard: bool) -> int:
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        payload = chain.readable_len - _REQ_HEADER.size
        if payload <= 0 or payload % _DISCARD_SEG.size or payload // _DISCARD_SEG.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR
        raw = chain.read(_REQ_HEADER.size, payload)
        segments = [_DISCARD_SEG.unpack_from(raw, i) for i in range(0, payload, _DISCARD_SEG.size)]
        for sector, count, flags in segments:
            if count > MAX_DISCARD_SECTORS or not self._in_range(sector, count * SECTOR_SIZE):
                return VIRTIO_BLK_S_IOERR
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP
        for sector, count, flags in segments:
            if count == 0:
                continue
            off, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if discard or flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            else:
                mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            try:
                _fallocate(self.fd, mode, off, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if discard:
                    continue  # discard is a hint; write zeroes must zero
                self._write_zeroes(off, length)
        return VIRTIO_BLK_S_OK

    def _write_zeroes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(self.fd, zero[:length], offset)
            offset += n
            length -= n
