"""virtio-blk (5.2) on a temporary image, driven through a real split ring by the test driver."""

from __future__ import annotations

import os
import random
import re
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimvisor.devices.blk import (
    BLK_SIZE,
    IOV_MAX,
    MAX_DISCARD_SEG,
    SECTOR_SIZE,
    SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlockDevice,
)
from slimvisor.virtio.device import COMMON_FEATURES
from slimvisor.virtio.queue import VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK, VIRTQ_DESC_F_INDIRECT, bit
from tests.vring import Driver, GuardedMemory, align, indirect_entries, write_table

R0, R1, R2 = 0x0, 0x10000, 0x40000
SPECS = [(R0, 0x10000), (R1, 0x10000), (R2, 0x1000)]
DATA = 0x1000
SECTORS = 64
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")


def contents(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(contents(SECTORS * SECTOR_SIZE))
    return str(path)


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass
class Result:
    status: int
    used_len: int
    data: bytes  # what the device wrote into the data-in buffers


class Rig:
    """A guest with one block queue: builds requests the way Linux's virtio_blk does."""

    def __init__(self, path: str, size: int = 64, **dev_kw):
        self.g = GuardedMemory(SPECS)
        self.drv = Driver(self.g.mem, size, R0)
        self.q = self.drv.queue(indirect=True)
        self.dev = BlockDevice(path, **dev_kw)

    def close(self):
        self.dev.close()

    def request(
        self,
        rtype: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        *,
        header_split: tuple[int, ...] = (16,),
        header_at: int | None = None,
        data_split: int | None = None,
        data_at: int | None = None,
        status_with_data: bool = False,
        indirect: bool = False,
    ) -> Result:
        bufs = []
        header = HEADER.pack(rtype, 0, sector)
        addr = header_at if header_at is not None else DATA
        self.g.write(addr, header)
        for n in header_split:
            bufs.append((addr, n, False))
            addr += n
        cursor = data_at if data_at is not None else DATA + 0x100

        def pieces(total: int):
            nonlocal cursor
            step = data_split or max(total, 1)
            out_ = []
            for off in range(0, total, step):
                n = min(step, total - off)
                out_.append((cursor, n))
                cursor += n
            return out_

        if out:
            for a, n in pieces(len(out)):
                self.g.write(a, out[:n])
                out = out[n:]
                bufs.append((a, n, False))
        in_bufs = pieces(in_len)
        for a, n in in_bufs:
            self.g.write(a, b"\xee" * n)  # poison: must be overwritten on success
            bufs.append((a, n, True))
        if status_with_data and bufs[-1][2]:
            a, n, _ = bufs[-1]
            bufs[-1] = (a, n + 1, True)
            status_addr = a + n
        else:
            status_addr = cursor
            bufs.append((status_addr, 1, True))
        self.g.write(status_addr, b"\xff")
        head = self.drv.add_indirect(R2, bufs) if indirect else self.drv.add(bufs)
        self.dev.drain(0, self.q)
        used = self.drv.used()
        assert [h for h, _ in used] == [head]
        assert self.g.guards_intact()
        data = b"".join(self.g.read(a, n) for a, n in in_bufs)
        return Result(self.g.read(status_addr, 1)[0], used[0][1], data)


@pytest.fixture
def rig(image):
    r = Rig(image)
    yield r
    r.close()


# -- identity -----------------------------------------------------------------------------------
def test_config_layout(image):
    dev = BlockDevice(image, num_queues=3)
    try:
        cfg = dev.config()
        assert len(cfg) == 60  # struct virtio_blk_config through write_zeroes_may_unmap + padding
        assert struct.unpack_from("<Q", cfg, 0)[0] == SECTORS  # capacity
        assert struct.unpack_from("<I", cfg, 12)[0] == SEG_MAX  # seg_max
        assert struct.unpack_from("<I", cfg, 20)[0] == BLK_SIZE  # blk_size
        assert struct.unpack_from("<H", cfg, 34)[0] == 3  # num_queues
        assert struct.unpack_from("<I", cfg, 40)[0] == MAX_DISCARD_SEG  # max_discard_seg
        assert cfg[56] == 1  # write_zeroes_may_unmap
        assert dev.device_id == VIRTIO_ID_BLOCK and dev.max_queues == 3
        assert dev.features() & bit(VIRTIO_BLK_F_MQ)
    finally:
        dev.close()


def test_features(image):
    rw = BlockDevice(image)  # one at a time: a writer excludes readers (image locks)
    try:
        for f in (
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ):
            assert rw.features() & bit(f)
        assert rw.features() & COMMON_FEATURES == COMMON_FEATURES
        assert not rw.features() & (bit(VIRTIO_BLK_F_RO) | bit(VIRTIO_BLK_F_MQ))
    finally:
        rw.close()
    ro = BlockDevice(image, readonly=True)
    try:
        assert ro.features() & bit(VIRTIO_BLK_F_RO)
    finally:
        ro.close()


def test_capacity_rounds_down_and_tiny_images_refused(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(3 * SECTOR_SIZE + 100))
    dev = BlockDevice(str(p))
    assert dev.capacity == 3
    dev.close()
    dev.close()  # idempotent
    p.write_bytes(bytes(SECTOR_SIZE - 1))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="a disk image must hold at least one 512-byte sector"):
        BlockDevice(str(p))
    assert set(os.listdir("/proc/self/fd")) == before  # the fd was closed


# -- reads and writes ---------------------------------------------------------------------------
def test_read(rig, image):
    r = rig.request(VIRTIO_BLK_T_IN, sector=3, in_len=2 * SECTOR_SIZE)
    assert r.status == VIRTIO_BLK_S_OK
    assert r.used_len == 2 * SECTOR_SIZE + 1
    assert r.data == file_bytes(image)[3 * SECTOR_SIZE : 5 * SECTOR_SIZE]


def test_write_then_read_back(rig, image):
    payload = contents(3 * SECTOR_SIZE, seed=7)
    r = rig.request(VIRTIO_BLK_T_OUT, sector=10, out=payload)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 1)
    disk = file_bytes(image)
    assert disk[10 * SECTOR_SIZE : 13 * SECTOR_SIZE] == payload
    assert disk[: 10 * SECTOR_SIZE] == contents(SECTORS * SECTOR_SIZE)[: 10 * SECTOR_SIZE]
    assert rig.request(VIRTIO_BLK_T_IN, sector=10, in_len=len(payload)).data == payload


def test_header_and_data_split_across_descriptors_and_regions(rig, image):
    payload = contents(4 * SECTOR_SIZE, seed=9)
    # header in three pieces, the middle one straddling regions 0 and 1; data in 100-byte pieces
    r = rig.request(
        VIRTIO_BLK_T_OUT,
        sector=1,
        out=payload,
        header_split=(5, 7, 4),
        header_at=R1 - 8,
        data_split=100,
        data_at=R1 + 0x40,
    )
    assert r.status == VIRTIO_BLK_S_OK
    assert file_bytes(image)[SECTOR_SIZE : 5 * SECTOR_SIZE] == payload
    # data in 77-byte pieces, one of them straddling regions 0 and 1
    r = rig.request(
        VIRTIO_BLK_T_IN, sector=1, in_len=len(payload), header_split=(1, 15), data_split=77, data_at=R1 - 1000
    )
    assert r.status == VIRTIO_BLK_S_OK and r.data == payload
    assert r.used_len == len(payload) + 1


def test_status_byte_in_the_data_buffer(rig, image):
    r = rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=SECTOR_SIZE, status_with_data=True)
    assert r.status == VIRTIO_BLK_S_OK and r.used_len == SECTOR_SIZE + 1
    assert r.data == file_bytes(image)[:SECTOR_SIZE]


def test_indirect_request(rig, image):
    r = rig.request(VIRTIO_BLK_T_IN, sector=60, in_len=4 * SECTOR_SIZE, indirect=True, data_split=512)
    assert r.status == VIRTIO_BLK_S_OK
    assert r.data == file_bytes(image)[60 * SECTOR_SIZE :]


def test_more_buffers_than_iov_max(tmp_path):
    """A request of more than IOV_MAX segments goes to the kernel in batches."""
    n = IOV_MAX + 77
    path = tmp_path / "big.img"
    path.write_bytes(contents(n * SECTOR_SIZE, seed=3))
    table, data = 0x100000, 0x200000
    g = GuardedMemory([(R0, 0x1000), (table, 16 * (n + 2)), (data, n * SECTOR_SIZE + 0x100)])
    drv = Driver(g.mem, 4, R0)
    q = drv.queue(indirect=True)
    dev = BlockDevice(str(path))
    try:
        g.write(data, HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
        bufs = [(data, 16, False)]
        bufs += [(data + 0x100 + i * SECTOR_SIZE, SECTOR_SIZE, True) for i in range(n)]
        bufs.append((data + 0x20, 1, True))
        write_table(g.mem, table, indirect_entries(bufs))
        drv.set_desc(0, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        drv.put_avail(0)
        dev.drain(0, q)
        assert drv.used() == [(0, n * SECTOR_SIZE + 1)]
        assert g.read(data + 0x20, 1)[0] == VIRTIO_BLK_S_OK
        assert g.read(data + 0x100, n * SECTOR_SIZE) == path.read_bytes()
        assert g.guards_intact()
    finally:
        dev.close()


@pytest.mark.parametrize(
    "sector, sectors",
    [(SECTORS, 1), (SECTORS - 1, 2), (2**64 - 1, 1), (2**63, 1), (2**55, 1), (SECTORS + 1, 0)],
)
@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_out_of_range(rig, image, rtype, sector, sectors):
    before = file_bytes(image)
    if rtype == VIRTIO_BLK_T_IN:
        r = rig.request(rtype, sector=sector, in_len=sectors * SECTOR_SIZE)
    else:
        r = rig.request(rtype, sector=sector, out=b"\x55" * (sectors * SECTOR_SIZE))
    assert r.status == VIRTIO_BLK_S_IOERR
    assert r.used_len == 1  # only the status byte counts as written
    assert file_bytes(image) == before
    assert os.path.getsize(image) == SECTORS * SECTOR_SIZE


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_partial_sector_refused(rig, image, rtype):
    before = file_bytes(image)
    if rtype == VIRTIO_BLK_T_IN:
        r = rig.request(rtype, sector=0, in_len=100)
    else:
        r = rig.request(rtype, sector=0, out=b"x" * 100)
    assert r.status == VIRTIO_BLK_S_IOERR
    assert file_bytes(image) == before


def test_image_shrunk_under_the_device(rig, image):
    """The file shrinking after open makes reads come back short: IOERR, not garbage."""
    os.truncate(image, (SECTORS - 2) * SECTOR_SIZE)
    r = rig.request(VIRTIO_BLK_T_IN, sector=SECTORS - 1, in_len=SECTOR_SIZE)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_IOERR, 1)


# -- other requests -----------------------------------------------------------------------------
def test_flush(rig):
    r = rig.request(VIRTIO_BLK_T_FLUSH)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 1)


def test_get_id(image):
    rig = Rig(image, serial="serial-number-that-is-far-too-long")
    try:
        r = rig.request(VIRTIO_BLK_T_GET_ID, in_len=VIRTIO_BLK_ID_BYTES)
        assert r.status == VIRTIO_BLK_S_OK
        assert r.data == b"serial-number-that-i"
        assert r.used_len == VIRTIO_BLK_ID_BYTES + 1
        r = rig.request(VIRTIO_BLK_T_GET_ID, in_len=6)  # a short buffer gets what fits
        assert (r.status, r.data, r.used_len) == (VIRTIO_BLK_S_OK, b"serial", 7)
    finally:
        rig.close()


def test_get_id_defaults_to_file_name(rig):
    r = rig.request(VIRTIO_BLK_T_GET_ID, in_len=VIRTIO_BLK_ID_BYTES)
    assert r.data == b"disk.img".ljust(VIRTIO_BLK_ID_BYTES, b"\0")


@pytest.mark.parametrize("rtype", [2, 3, 5, 7, 9, 12, 99, 0xFFFFFFFF])
def test_unknown_type(rig, image, rtype):
    before = file_bytes(image)
    r = rig.request(rtype, sector=0, out=b"z" * SECTOR_SIZE)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert file_bytes(image) == before


def segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(SEGMENT.pack(*s) for s in segs)


def test_write_zeroes(rig, image):
    orig = file_bytes(image)
    r = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segments((2, 3, 0), (40, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 1)
    disk = file_bytes(image)
    assert len(disk) == len(orig)
    assert disk[2 * SECTOR_SIZE : 5 * SECTOR_SIZE] == bytes(3 * SECTOR_SIZE)
    assert disk[40 * SECTOR_SIZE : 48 * SECTOR_SIZE] == bytes(8 * SECTOR_SIZE)
    assert disk[: 2 * SECTOR_SIZE] == orig[: 2 * SECTOR_SIZE]
    assert disk[5 * SECTOR_SIZE : 40 * SECTOR_SIZE] == orig[5 * SECTOR_SIZE : 40 * SECTOR_SIZE]
    assert disk[48 * SECTOR_SIZE :] == orig[48 * SECTOR_SIZE :]


def test_discard(rig, image):
    orig = file_bytes(image)
    r = rig.request(VIRTIO_BLK_T_DISCARD, out=segments((8, 8, 0)))
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 1)
    disk = file_bytes(image)
    assert len(disk) == len(orig)  # discard never changes the disk size
    # a discard is a hint: the range is either zeroed (hole punched) or left as it was
    assert disk[8 * SECTOR_SIZE : 16 * SECTOR_SIZE] in (
        bytes(8 * SECTOR_SIZE),
        orig[8 * SECTOR_SIZE : 16 * SECTOR_SIZE],
    )
    assert disk[: 8 * SECTOR_SIZE] == orig[: 8 * SECTOR_SIZE]
    assert disk[16 * SECTOR_SIZE :] == orig[16 * SECTOR_SIZE :]


@pytest.mark.parametrize(
    "rtype, payload, status",
    [
        (VIRTIO_BLK_T_DISCARD, segments((0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, segments((0, 1, 2)), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_DISCARD, segments((0, 1, 0x80000000)), VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, segments((SECTORS - 1, 2, 0)), VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_DISCARD, segments((2**64 - 1, 1, 0)), VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_WRITE_ZEROES, segments((0, 1, 0), (SECTORS, 1, 0)), VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_WRITE_ZEROES, b"", VIRTIO_BLK_S_IOERR),  # no segment at all
        (VIRTIO_BLK_T_WRITE_ZEROES, segments((0, 1, 0))[:15], VIRTIO_BLK_S_IOERR),  # torn segment
        (VIRTIO_BLK_T_DISCARD, segments(*[(0, 1, 0)] * (MAX_DISCARD_SEG + 1)), VIRTIO_BLK_S_IOERR),
    ],
)
def test_bad_discard_and_write_zeroes(rig, image, rtype, payload, status):
    before = file_bytes(image)
    r = rig.request(rtype, out=payload)
    assert (r.status, r.used_len) == (status, 1)
    assert file_bytes(image) == before  # validated before anything is done


# -- read-only ----------------------------------------------------------------------------------
@pytest.fixture
def ro_rig(image):
    r = Rig(image, readonly=True)
    yield r
    r.close()


def test_readonly_refuses_writes(ro_rig, image):
    before = file_bytes(image)
    r = ro_rig.request(VIRTIO_BLK_T_OUT, sector=0, out=b"w" * SECTOR_SIZE)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_IOERR, 1)
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        r = ro_rig.request(rtype, out=segments((0, 8, 0)))
        assert r.status == VIRTIO_BLK_S_IOERR
    assert file_bytes(image) == before
    r = ro_rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=SECTOR_SIZE)
    assert r.status == VIRTIO_BLK_S_OK and r.data == before[:SECTOR_SIZE]
    assert ro_rig.request(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK


# -- not block requests at all ------------------------------------------------------------------
@pytest.mark.parametrize(
    "bufs",
    [
        [(DATA, 16, False)],  # no status byte
        [(DATA, 16, False), (DATA + 0x100, 512, False)],  # no status byte, data out
        [(DATA, 15, False), (DATA + 0x100, 1, True)],  # header too short
        [(DATA + 0x100, 17, True)],  # no header at all
        [(DATA, 8, False), (DATA + 8, 7, False), (DATA + 0x100, 1, True)],  # split and short
    ],
)
def test_malformed_request_is_a_virtqueue_error(rig, bufs):
    rig.g.write(DATA, HEADER.pack(VIRTIO_BLK_T_IN, 0, 0))
    rig.drv.add(bufs)
    with pytest.raises(VirtqueueError, match="has no header or no status byte"):
        rig.dev.drain(0, rig.q)
    assert rig.drv.used() == []
    assert rig.g.guards_intact()


# -- property: random requests never touch memory outside the shared regions -------------------
HEADER_SLOTS = [R2 + 0x100 * i for i in range(4)]
TYPES = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
    2,
    0xFFFFFFFF,
]
sectors = st.one_of(st.integers(0, SECTORS + 1), st.sampled_from([2**32, 2**63, 2**64 - 1]))
header_slot = st.tuples(
    st.sampled_from(TYPES),
    sectors,
    st.lists(
        st.tuples(sectors, st.integers(0, 16) | st.integers(0, 2**32 - 1), st.sampled_from([0, 0, 1, 2])),
        max_size=3,
    ),
)
data_buf = st.tuples(
    st.one_of(st.integers(DATA, R1 + 0x10000 - 0x1000), st.integers(R1 - 0x300, R1), st.integers(0, 0x50000)),
    st.sampled_from([0, 1, 16, 511, 512, 513, 1024, 2048]) | st.integers(0, 0x1000),
    st.booleans(),
)


@st.composite
def block_ring(draw):
    headers = [draw(header_slot) for _ in HEADER_SLOTS]
    chains = []
    for _ in range(draw(st.integers(1, 4))):
        slot = draw(st.integers(0, len(HEADER_SLOTS) - 1))
        n_segs = len(headers[slot][2])
        hdr_len = draw(st.sampled_from([16, 16 + 16 * n_segs, 16 + 16 * n_segs, 15, 17, 0x100]))
        body = sorted(draw(st.lists(data_buf, max_size=4)), key=lambda b: b[2])
        status = (draw(st.integers(DATA, R1 + 0x10000 - 4)), draw(st.sampled_from([1, 1, 1, 2, 0])), True)
        bufs = [(HEADER_SLOTS[slot], hdr_len, False), *body, status]
        if draw(st.integers(0, 9)) == 0:
            bufs = draw(st.permutations(bufs))
        chains.append((bufs, draw(st.booleans())))
    return headers, chains, draw(st.binary(min_size=32, max_size=32))


@pytest.fixture(scope="module")
def shared_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("blk") / "prop.img"
    path.write_bytes(contents(SECTORS * SECTOR_SIZE, seed=5))
    return str(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=block_ring(), readonly=st.booleans(), event_idx=st.booleans())
def test_random_requests_stay_inside_shared_memory(shared_image, ring, readonly, event_idx):
    headers, chains, noise = ring
    g = GuardedMemory(SPECS)
    drv = Driver(g.mem, 16, R0)
    q = drv.queue(indirect=True, event_idx=event_idx)
    for addr, (rtype, sector, segs) in zip(HEADER_SLOTS, headers, strict=True):
        g.write(addr, HEADER.pack(rtype, 0, sector) + b"".join(SEGMENT.pack(*s) for s in segs))
    g.write(DATA, noise)
    writable_len = {}
    table = R2 + 0x800
    for bufs, indirect in chains:
        if indirect and drv.free and table + 16 * len(bufs) <= R2 + 0x1000:
            head = drv.add_indirect(table, bufs)
            table = align(table + 16 * len(bufs), 16)
        elif len(bufs) <= len(drv.free):
            head = drv.add(bufs)
        else:
            continue
        writable_len[head] = sum(n for _, n, w in bufs if w)
    dev = BlockDevice(shared_image, readonly=readonly)
    try:
        dev.drain(0, q)
        event("drained")
    except VirtqueueError:
        event("VirtqueueError")
    finally:
        dev.close()
    assert g.guards_intact(), "bytes outside the shared regions changed"
    assert os.path.getsize(shared_image) == SECTORS * SECTOR_SIZE
    # A request may well point its data-in buffers at the rings or at descriptor tables: the
    # guest only hurts itself. Check the used ring only when none did.
    lay = drv.layout
    control = [(lay.desc, lay.end), (R2, R2 + 0x1000)]
    if any(w and a < hi and lo < a + n for bufs, _ in chains for a, n, w in bufs for lo, hi in control):
        event("device wrote over rings or tables")
        return
    used = drv.used()
    event(f"requests served: {len(used)}")
    for head, n in used:
        assert 1 <= n <= writable_len[head]  # never claims more than the chain could hold


# -- image locks -------------------------------------------------------------------------------------


def test_an_image_has_one_writer_or_any_number_of_readers(image: str, tmp_path) -> None:
    """OFD locks as QEMU takes them: a second writer, or a writer beside readers, is refused with
    an error naming the image and who holds it; the last close releases the lock."""
    from slimvisor.storage import OverlayDisk, create_overlay
    from slimvisor.storage.disk import ImageLockedError, RawDisk

    held_by = rf"{re.escape(image)}: in use by pid {os.getpid()} \("
    writer = RawDisk(image)
    try:
        for readonly in (False, True):
            with pytest.raises(ImageLockedError, match=held_by):
                RawDisk(image, readonly)
    finally:
        writer.close()
    readers = [RawDisk(image, readonly=True) for _ in range(2)]
    try:
        with pytest.raises(ImageLockedError, match=held_by):
            RawDisk(image)
    finally:
        for reader in readers:
            reader.close()
    RawDisk(image).close()
    overlay = str(tmp_path / "over.ov")
    create_overlay(overlay, image)
    open_overlay = OverlayDisk(overlay)
    try:
        with pytest.raises(ImageLockedError, match=re.escape(overlay)):
            RawDisk(overlay, readonly=True)  # the same lock whatever the format
    finally:
        open_overlay.close()
