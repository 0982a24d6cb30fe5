"""virtio-blk (virtio 1.2 section 5.2) over a disk image (slimvisor.storage: raw or overlay).

Reads and writes go straight between the image and guest memory with preadv/pwritev on views of
the shared mapping: no copy in Python. Requests outside the disk get VIRTIO_BLK_S_IOERR; a chain
that is not a block request at all (no header, no status byte) raises VirtqueueError.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from slimvisor.memory import slice_views
from slimvisor.model.spec import DiskSpec
from slimvisor.storage import Disk, RawDisk
from slimvisor.storage.disk import IOV_MAX as IOV_MAX
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import Chain, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK, bit
from slimvisor.virtio.state import same

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

_REQ_HEADER = struct.Struct("<IIQ")  # le32 type, le32 reserved, le64 sector
_DISCARD_SEG = struct.Struct("<QII")  # le64 sector, le32 num_sectors, le32 flags
# 5.2.4 struct virtio_blk_config up to write_zeroes_may_unmap and its padding
_CONFIG = struct.Struct("<QII4sI8sBBHIIIIIB3x")


class BlockDevice(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK

    def __init__(self, disk: str | Disk, *, readonly: bool = False, serial: str = "", num_queues: int = 1) -> None:
        """Serve `disk`: an open Disk (the device owns it from now on), or the path of a raw image."""
        super().__init__()
        self.disk: Disk = RawDisk(disk, readonly) if isinstance(disk, str) else disk
        try:
            if self.disk.size < SECTOR_SIZE:
                raise ValueError(f"{self.disk.path}: a disk image must hold at least one {SECTOR_SIZE}-byte sector")
        except BaseException:
            self.disk.close()
            raise
        self.path = self.disk.path
        self.readonly = readonly or self.disk.readonly
        self.capacity = self.disk.size // SECTOR_SIZE
        self.serial = (serial or os.path.basename(self.path)).encode()[:VIRTIO_BLK_ID_BYTES]
        self.max_queues = num_queues

    @classmethod
    def from_spec(cls, disk: DiskSpec, num_queues: int = 1) -> BlockDevice:
        """`disk`'s device, its image opened in the format the spec names."""
        from slimvisor.storage import open_disk

        image = open_disk(disk.path, disk.format, disk.readonly)
        return cls(image, readonly=disk.readonly, serial=disk.serial, num_queues=num_queues)

    @classmethod
    def pending(cls, disk: DiskSpec) -> BlockDevice:
        """`disk`'s device on a migration's target: sized now, its image opened by `activate`."""
        from slimvisor.storage import pending_disk

        return cls(pending_disk(disk.path, disk.format, disk.readonly), readonly=disk.readonly, serial=disk.serial)

    def activate(self) -> None:
        """Open the image a `pending` device stands for (the source closed it); no-op otherwise."""
        from slimvisor.storage import PendingDisk

        if isinstance(self.disk, PendingDisk):
            self.disk = self.disk.open()

    @property
    def fd(self) -> int:
        """The image's file descriptor, for a raw disk (-1 otherwise or once closed)."""
        return self.disk.fd if isinstance(self.disk, RawDisk) else -1

    def device_features(self) -> int:
        f = bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
        if self.disk.can_discard:
            f |= bit(VIRTIO_BLK_F_DISCARD)
        if self.disk.can_write_zeroes:
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES)
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
        self.disk.close()

    # -- saved state: a disk keeps no state of its own; the restored one must be the same disk ----
    state_fields = ("capacity", "readonly", "num_queues")

    def save_device(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "readonly": self.readonly, "num_queues": self.max_queues}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        what = f"blk {self.path}"
        same(state, "capacity", what, self.capacity)
        same(state, "readonly", what, self.readonly)
        same(state, "num_queues", what, self.max_queues)
        return lambda: None

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
                    self.disk.flush()
                status = VIRTIO_BLK_S_OK
            elif rtype == VIRTIO_BLK_T_GET_ID:
                written = chain.write(0, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[: wlen - 1])
                status = VIRTIO_BLK_S_OK
            elif rtype == VIRTIO_BLK_T_DISCARD and self.disk.can_discard:
                status = self._discard(chain, True)
            elif rtype == VIRTIO_BLK_T_WRITE_ZEROES and self.disk.can_write_zeroes:
                status = self._discard(chain, False)
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
        if write:
            self.disk.writev(bufs, sector * SECTOR_SIZE)
        else:
            self.disk.readv(bufs, sector * SECTOR_SIZE)
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
            if discard:
                self.disk.discard(off, length)  # a hint: the range reads as zeroes or as it was
            else:
                self.disk.write_zeroes(off, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_OK


def blk_factory(disk: DiskSpec, queues: int = 1) -> Callable[[], BlockDevice]:
    """Builds `disk`'s device when called: in the backend process, which alone opens the image."""
    return lambda: BlockDevice.from_spec(disk, queues)
