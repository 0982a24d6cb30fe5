"""Copy-on-write overlay disks (slimvisor.storage.overlay): format, I/O, durability, bad images,
the block device over them, and two real UML domains booting from overlays of one base."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimvisor.devices.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
)
from slimvisor.domain.check import check_disk
from slimvisor.model.spec import DISK_FORMATS, DiskSpec, SpecError
from slimvisor.storage import OverlayDisk, OverlayError, create_overlay, open_disk, read_header
from slimvisor.storage import overlay as ov
from slimvisor.toolstack.xlcfg import parse_disk
from slimvisor.virtio.spec import bit

CS = ov.MIN_CLUSTER_SIZE  # small clusters: many cluster boundaries in small tests


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_base(path: Path, size: int, seed: int = 1) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def read(disk: OverlayDisk, offset: int, length: int, pieces: int = 1) -> bytes:
    buf = bytearray(length)
    mv = memoryview(buf)
    step = max(1, -(-length // pieces))
    disk.readv([mv[i : i + step] for i in range(0, length, step)], offset)
    return bytes(buf)


def write(disk: OverlayDisk, offset: int, data: bytes, pieces: int = 1) -> None:
    mv = memoryview(data)
    step = max(1, -(-len(data) // pieces))
    disk.writev([mv[i : i + step] for i in range(0, len(data), step)], offset)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_base(tmp_path / "base.raw", 5 * CS + 1536)  # a partial last cluster


@pytest.fixture
def overlay(tmp_path: Path, base: Path) -> Path:
    path = tmp_path / "ov.img"
    create_overlay(str(path), str(base), CS)
    return path


# -- format -------------------------------------------------------------------------------------
def test_create_layout(tmp_path: Path, base: Path) -> None:
    path = tmp_path / "sub" / ".." / "ov.img"
    (tmp_path / "sub").mkdir()
    h = create_overlay(str(path), os.path.relpath(base))
    assert h == read_header(str(path))
    assert h.base == str(base) and os.path.isabs(h.base)
    assert (h.cluster_size, h.virtual_size, h.bitmap_offset) == (ov.DEFAULT_CLUSTER_SIZE, base.stat().st_size, 4096)
    assert h.bitmap_length == 4096 and h.data_offset == ov.DEFAULT_CLUSTER_SIZE
    st = os.stat(path)
    assert st.st_size == h.data_offset + h.virtual_size
    assert st.st_blocks * 512 <= 64 << 10  # sparse: the header, nothing else
    raw = Path(path).read_bytes()
    assert raw[:8] == ov.MAGIC and raw[64 : 64 + len(str(base))] == str(base).encode()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert "raw" in DISK_FORMATS and "overlay" in DISK_FORMATS


def test_create_refuses(tmp_path: Path, base: Path, overlay: Path) -> None:
    before = sha(overlay)
    with pytest.raises(FileExistsError, match="already exists"):
        create_overlay(str(overlay), str(base))
    assert sha(overlay) == before
    with pytest.raises(OverlayError, match="itself an overlay"):
        create_overlay(str(tmp_path / "chain.img"), str(overlay))
    with pytest.raises(OverlayError, match="cannot read base image"):
        create_overlay(str(tmp_path / "x.img"), str(tmp_path / "nothing.raw"))
    with pytest.raises(OverlayError, match="power of two"):
        create_overlay(str(tmp_path / "y.img"), str(base), 3 * 4096)
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(OverlayError, match="0 bytes"):
        create_overlay(str(tmp_path / "z.img"), str(tmp_path / "empty.raw"))
    assert sorted(os.listdir(tmp_path)) == ["base.raw", "empty.raw", "ov.img"]


def test_reads_come_from_base_until_written(overlay: Path, base: Path) -> None:
    d = OverlayDisk(str(overlay))
    try:
        b = base.read_bytes()
        assert read(d, 0, len(b), pieces=7) == b
        assert read(d, CS - 10, 20) == b[CS - 10 : CS + 10]
    finally:
        d.close()


def test_partial_write_copies_the_rest_of_the_cluster(overlay: Path, base: Path) -> None:
    b = bytearray(base.read_bytes())
    before = sha(base)
    d = OverlayDisk(str(overlay))
    try:
        write(d, CS + 100, b"x" * 50)  # inside cluster 1
        b[CS + 100 : CS + 150] = b"x" * 50
        assert [d.allocated(c) for c in range(6)] == [False, True, False, False, False, False]
        # the whole cluster is in the overlay now: base bytes around the write were copied
        assert os.pread(d.fd, CS, d.data_offset + CS) == bytes(b[CS : 2 * CS])
        write(d, 3 * CS - 8, b"y" * (2 * CS + 16), pieces=5)  # end of 2, all of 3 and 4, start of 5
        b[3 * CS - 8 : 5 * CS + 8] = b"y" * (2 * CS + 16)
        assert [d.allocated(c) for c in range(6)] == [False, True, True, True, True, True]
        write(d, len(b) - 512, b"z" * 512)  # the partial last cluster
        b[-512:] = b"z" * 512
        assert read(d, 0, len(b), pieces=3) == bytes(b)
    finally:
        d.close()
    assert sha(base) == before
    d = OverlayDisk(str(overlay))
    try:
        assert read(d, 0, len(b)) == bytes(b)  # close flushed
    finally:
        d.close()


def test_write_zeroes_read_back_as_zeroes_not_base(overlay: Path, base: Path) -> None:
    b = bytearray(base.read_bytes())
    d = OverlayDisk(str(overlay))
    try:
        for unmap, (off, n) in [(False, (100, 3 * CS)), (True, (4 * CS, len(b) - 4 * CS)), (True, (10, 10))]:
            d.write_zeroes(off, n, unmap)
            b[off : off + n] = bytes(n)
            assert read(d, 0, len(b)) == bytes(b)
        d.discard(0, len(b))  # discard: each cluster zero or as it was
        got = read(d, 0, len(b))
        for c in range(0, len(b), CS):
            assert got[c : c + CS] in (bytes(b[c : c + CS]), bytes(len(got[c : c + CS])))
    finally:
        d.close()


def test_flush_orders_data_before_bitmap(overlay: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = OverlayDisk(str(overlay))
    events: list[tuple[str, int]] = []
    real_transfer, real_sync = ov.transfer, os.fdatasync

    def transfer(write_: bool, fd: int, bufs: list[memoryview], offset: int) -> None:
        if fd == d.fd and write_:
            events.append(("bitmap" if offset < d.data_offset else "data", offset))
        real_transfer(write_, fd, bufs, offset)

    def fdatasync(fd: int) -> None:
        events.append(("sync", fd))
        real_sync(fd)

    monkeypatch.setattr(ov, "transfer", transfer)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        write(d, 10, b"a" * 10)
        assert [e[0] for e in events] == ["data"]  # copy-on-write and the write in one pwritev
        events.clear()
        d.flush()
        assert [e[0] for e in events] == ["sync", "bitmap", "sync"]
        events.clear()
        d.flush()  # nothing new: the bitmap is not rewritten
        assert [e[0] for e in events] == ["sync"]
    finally:
        d.close()


def crash(d: OverlayDisk) -> None:
    """The backend dies: file data survives (page cache), the unflushed bitmap does not."""
    d._close_fds()


def test_flushed_data_survives_a_crash(overlay: Path, base: Path) -> None:
    b = base.read_bytes()
    d = OverlayDisk(str(overlay))
    write(d, 0, b"F" * 100)
    d.flush()
    write(d, 2 * CS, b"U" * 100)  # not flushed
    crash(d)
    d = OverlayDisk(str(overlay))
    try:
        assert read(d, 0, 100) == b"F" * 100
        assert read(d, 100, CS - 100) == b[100:CS]
        assert read(d, 2 * CS, CS) == b[2 * CS : 3 * CS]  # the unflushed cluster reads the base
        write(d, 2 * CS + 200, b"V" * 10)  # stale bytes left in the data area are never seen
        assert read(d, 2 * CS, CS) == b[2 * CS : 2 * CS + 200] + b"V" * 10 + b[2 * CS + 210 : 3 * CS]
    finally:
        d.close()


def test_readonly_overlay(overlay: Path) -> None:
    d = OverlayDisk(str(overlay))
    write(d, 0, b"W" * 512)
    d.close()
    before = sha(overlay)
    ro1, ro2 = OverlayDisk(str(overlay), readonly=True), OverlayDisk(str(overlay), readonly=True)
    try:
        assert read(ro1, 0, 512) == read(ro2, 0, 512) == b"W" * 512
        with pytest.raises(OSError, match="read-only"):
            write(ro1, 0, b"x")
        with pytest.raises(OverlayError, match="in use"):
            OverlayDisk(str(overlay))
    finally:
        ro1.close()
        ro2.close()
    assert sha(overlay) == before


def test_one_writer_at_a_time(overlay: Path) -> None:
    d = OverlayDisk(str(overlay))
    try:
        with pytest.raises(OverlayError, match=f"{overlay}: in use"):
            OverlayDisk(str(overlay))
    finally:
        d.close()
    OverlayDisk(str(overlay)).close()



@pytest.mark.parametrize("fmt", ["overlay", "raw"])
def test_check_disk_probes_the_lock_and_leaves_the_image(overlay: Path, fmt: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The check at create refuses an image someone holds, but takes no lock itself and keeps
    nothing open (the backend opens it once, to serve it), and reads no overlay bitmap."""
    held = open_disk(str(overlay), fmt)
    try:
        with pytest.raises(SpecError, match=f"disk {overlay}: in use by pid {os.getpid()} \\("):
            check_disk(DiskSpec(str(overlay), format=fmt))
        with pytest.raises(SpecError, match=f"disk {overlay}: in use by pid {os.getpid()} .*this open is readonly"):
            check_disk(DiskSpec(str(overlay), format=fmt, readonly=True))  # a reader against a writer
    finally:
        held.close()
    bitmap_reads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: bitmap_reads.append(off) or real_pread(fd, n, off))
    fds = set(os.listdir("/proc/self/fd"))
    check_disk(DiskSpec(str(overlay), format=fmt))
    assert set(os.listdir("/proc/self/fd")) == fds
    assert ov.HEADER_SIZE not in bitmap_reads  # the bitmap starts right after the header
    open_disk(str(overlay), fmt).close()  # the check left no lock behind: a writer opens it


def test_out_of_range_refused(overlay: Path) -> None:
    d = OverlayDisk(str(overlay))
    try:
        with pytest.raises(OSError, match="are outside the disk"):
            read(d, d.size - 10, 20)
        with pytest.raises(OSError, match="are outside the disk"):
            write(d, d.size, b"x")
        with pytest.raises(OSError, match="are outside the disk"):
            d.write_zeroes(d.size - 1, 2, False)
    finally:
        d.close()


# -- bad images ---------------------------------------------------------------------------------
def rewrite(path: Path, **fields: int | bytes) -> None:
    """Change header fields and fix the CRC, so only the named problem is left."""
    raw = bytearray(path.read_bytes()[: ov.HEADER_SIZE])
    names = ["magic", "version", "header_size", "cluster_size", "flags", "virtual_size", "bitmap_offset",
             "bitmap_length", "data_offset", "base_path_length", "crc"]  # fmt: skip
    values = dict(zip(names, ov._FIXED.unpack_from(raw), strict=True))
    values.update(fields)
    ov._FIXED.pack_into(raw, 0, *values.values())
    if "crc" not in fields:
        struct.pack_into("<I", raw, ov._CRC_AT, ov._crc(bytes(raw)))
    with open(path, "r+b") as f:
        f.write(raw)


BAD = [
    ("wrong magic", lambda p, b: rewrite(p, magic=b"QFI\xfb\0\0\0\3"), "bad magic"),
    ("tiny file", lambda p, b: os.truncate(p, 30), "truncated header"),
    ("short header", lambda p, b: os.truncate(p, 1000), "truncated header"),
    ("crc", lambda p, b: rewrite(p, crc=12345), "checksum"),
    ("version", lambda p, b: rewrite(p, version=2), "version 2"),
    ("flags", lambda p, b: rewrite(p, flags=4), "feature flags"),
    ("cluster 3*4K", lambda p, b: rewrite(p, cluster_size=3 * 4096), "cluster size 12288"),
    ("cluster 512", lambda p, b: rewrite(p, cluster_size=512), "cluster size 512"),
    ("cluster 0", lambda p, b: rewrite(p, cluster_size=0), "cluster size 0"),
    ("bitmap beyond file", lambda p, b: os.truncate(p, ov.HEADER_SIZE + 100), "bitmap .* beyond the end"),
    ("data truncated", lambda p, b: os.truncate(p, os.path.getsize(p) - 1), "data area .* beyond the end"),
    ("bitmap length", lambda p, b: rewrite(p, bitmap_length=1 << 40), "bitmap length"),
    ("data offset", lambda p, b: rewrite(p, data_offset=4096), "data offset"),
    ("virtual size 0", lambda p, b: rewrite(p, virtual_size=0), "virtual size 0"),
    ("path length", lambda p, b: rewrite(p, base_path_length=5000), "base path length"),
    ("base missing", lambda p, b: b.unlink(), "base image .*base.raw is missing"),
    ("base grew", lambda p, b: os.truncate(b, b.stat().st_size + 512), "base image .* bytes, but"),
    ("base shrank", lambda p, b: os.truncate(b, 4096), "base image .* bytes, but"),
]


@pytest.mark.parametrize("name, damage, message", BAD, ids=[b[0] for b in BAD])
def test_bad_images_are_refused_naming_the_file(overlay: Path, base: Path, name, damage, message) -> None:
    damage(overlay, base)
    before = overlay.read_bytes()
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OverlayError, match=message) as e:
        OverlayDisk(str(overlay))
    assert str(e.value).startswith(f"{overlay}: ")
    assert set(os.listdir("/proc/self/fd")) == fds  # nothing left open
    assert overlay.read_bytes() == before  # nothing written
    with pytest.raises(SpecError, match=f"disk {overlay}: "):
        check_disk(DiskSpec(str(overlay), format="overlay"))


def test_relative_base_path_refused(tmp_path: Path, base: Path, overlay: Path) -> None:
    raw = bytearray(overlay.read_bytes()[: ov.HEADER_SIZE])
    rel = b"base.raw"
    raw[64 : 64 + len(str(base))] = bytes(len(str(base)))
    raw[64 : 64 + len(rel)] = rel
    overlay.write_bytes(bytes(raw) + overlay.read_bytes()[ov.HEADER_SIZE :])
    rewrite(overlay, base_path_length=len(rel))
    with pytest.raises(OverlayError, match="not an absolute path"):
        OverlayDisk(str(overlay))


def test_raw_images_are_never_probed(tmp_path: Path, base: Path, overlay: Path) -> None:
    """A raw disk that happens to hold an overlay header is served as raw bytes."""
    d = open_disk(str(overlay), "raw")
    try:
        assert d.size == overlay.stat().st_size
    finally:
        d.close()
    with pytest.raises(ValueError, match="unknown disk format 'qcow2'"):
        open_disk(str(overlay), "qcow2")


# -- property: overlay against a bytearray -------------------------------------------------------
SIZE = 5 * CS + 1536
offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.sampled_from([0, CS - 1, CS, 2 * CS, 3 * CS + 1, 5 * CS, SIZE - 512, SIZE - 1]),
)


@st.composite
def op(draw):
    kind = draw(st.sampled_from(["write", "write", "write", "read", "flush", "discard", "zeroes", "reopen", "crash"]))
    off = draw(offsets)
    n = draw(st.one_of(st.integers(1, 300), st.integers(1, 3 * CS), st.just(SIZE - off)))
    n = max(1, min(n, SIZE - off))
    return kind, off, n, draw(st.integers(1, 4)), draw(st.integers(0, 255)), draw(st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op(), max_size=25))
def test_overlay_matches_a_bytearray(tmp_path_factory, ops) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    base = make_base(tmp / "base.raw", SIZE, seed=len(ops))
    base_hash = sha(base)
    path = tmp / "ov.img"
    create_overlay(str(path), str(base), CS)
    model = bytearray(base.read_bytes())
    d = OverlayDisk(str(path))
    flushed: set[int] = set()  # clusters whose bit is on disk
    try:
        for kind, off, n, pieces, fill, unmap in ops:
            if kind == "write":
                write(d, off, bytes([fill]) * n, pieces)
                model[off : off + n] = bytes([fill]) * n
            elif kind == "read":
                assert read(d, off, n, pieces) == model[off : off + n]
            elif kind == "flush":
                d.flush()
                flushed = {c for c in range(d.clusters) if d.allocated(c)}
            elif kind == "zeroes":
                d.write_zeroes(off, n, unmap)
                model[off : off + n] = bytes(n)
            elif kind == "discard":
                d.discard(off, n)
                got = read(d, off, n)
                for i in range(n):  # per cluster: zeroes or as it was
                    c0 = (off + i) // CS * CS
                    lo, hi = max(c0, off) - off, min(c0 + CS, off + n) - off
                    assert got[lo:hi] in (bytes(hi - lo), bytes(model[off + lo : off + hi]))
                model[off : off + n] = got
            elif kind == "reopen":
                d.close()
                d = OverlayDisk(str(path))
                flushed = {c for c in range(d.clusters) if d.allocated(c)}
            else:  # crash: only what was allocated at the last flush is still the overlay's
                crash(d)
                d = OverlayDisk(str(path))
                b = base.read_bytes()
                for c in range(d.clusters):
                    assert d.allocated(c) == (c in flushed)
                    if c not in flushed:
                        model[c * CS : (c + 1) * CS] = b[c * CS : (c + 1) * CS]
            assert sha(base) == base_hash
        assert read(d, 0, SIZE, 3) == model
        d.flush()
        d.close()
        d = OverlayDisk(str(path))
        assert read(d, 0, SIZE) == model
    finally:
        d.close()
    assert sha(base) == base_hash
    assert os.path.getsize(path) == d.data_offset + SIZE
    shutil.rmtree(tmp)


# -- the block device over an overlay -----------------------------------------------------------
def test_block_device_serves_an_overlay(overlay: Path, base: Path) -> None:
    from tests.test_blk_device import Rig, segments

    before = sha(base)
    b = bytearray(base.read_bytes())
    rig = Rig(OverlayDisk(str(overlay)))  # type: ignore[arg-type]
    try:
        assert rig.dev.capacity == len(b) // SECTOR_SIZE
        assert rig.dev.features() & bit(VIRTIO_BLK_F_DISCARD) and rig.dev.features() & bit(VIRTIO_BLK_F_WRITE_ZEROES)
        assert rig.request(VIRTIO_BLK_T_IN, sector=7, in_len=4 * SECTOR_SIZE, data_split=300).data == b[3584:5632]
        payload = random.Random(3).randbytes(3 * SECTOR_SIZE)
        r = rig.request(VIRTIO_BLK_T_OUT, sector=7, out=payload, data_split=100)
        assert r.status == VIRTIO_BLK_S_OK
        b[3584 : 3584 + len(payload)] = payload
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        assert rig.request(VIRTIO_BLK_T_WRITE_ZEROES, out=segments((10, 20, 0), (36, 4, flags))).status == 0
        b[10 * 512 : 30 * 512] = bytes(20 * 512)
        b[36 * 512 : 40 * 512] = bytes(4 * 512)
        assert rig.request(VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
        got = rig.request(VIRTIO_BLK_T_IN, sector=0, in_len=len(b) // 512 * 512).data
        assert got == b[: len(got)]
        assert rig.request(VIRTIO_BLK_T_DISCARD, out=segments((0, 8, 0))).status == VIRTIO_BLK_S_OK
        assert rig.dev.fd == -1  # not a raw file
    finally:
        rig.close()
    assert sha(base) == before


def test_disk_spec_format() -> None:
    assert DiskSpec.parse("/a.img") == DiskSpec("/a.img", format="raw")
    assert DiskSpec.parse("/a.img,format=overlay,ro") == DiskSpec("/a.img", True, "", "overlay")
    assert DiskSpec.parse("/a.img,format=qcow2").backend == "qsd"  # qemu-storage-daemon's (domain/qsd.py)
    with pytest.raises(SpecError, match="unknown format 'qed'"):
        DiskSpec.parse("/a.img,format=qed")
    assert parse_disk("/img/a.ovl,format=overlay,xvda,rw")[2] == DiskSpec("/img/a.ovl", format="overlay")
    assert parse_disk("/img/a.ovl,overlay,xvdb,ro")[2] == DiskSpec("/img/a.ovl", True, format="overlay")
    assert parse_disk("/img/a.raw,raw,xvda")[2].format == "raw"


def test_blk_factory_opens_the_format(overlay: Path, base: Path) -> None:
    from slimvisor.devices.blk import blk_factory

    spec = DiskSpec(str(overlay), format="overlay")
    check_disk(spec)
    dev = blk_factory(spec)()
    try:
        assert isinstance(dev.disk, OverlayDisk)  # type: ignore[attr-defined]
        assert dev.config()[:8] == struct.pack("<Q", base.stat().st_size // 512)
    finally:
        dev.close()


# -- real guests --------------------------------------------------------------------------------
def guest_file(overlay: Path, tmp: Path, name: str) -> bytes | None:
    """`name` in the ext4 file system on the overlay, read on the host: overlay -> raw -> debugfs."""
    d = OverlayDisk(str(overlay), readonly=True)
    flat = tmp / f"{overlay.name}.flat"
    try:
        with open(flat, "wb") as f:
            for off in range(0, d.size, 1 << 20):
                f.write(read(d, off, min(1 << 20, d.size - off)))
    finally:
        d.close()
    out = subprocess.run(["debugfs", "-R", f"cat {name}", str(flat)], capture_output=True, check=True)
    flat.unlink()
    return out.stdout if out.stdout else None


@pytest.mark.guest
@pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs debugfs (e2fsprogs)")
def test_two_domains_boot_from_overlays_of_one_base(busybox, tmp_path: Path, domname: str) -> None:
    from tests.guest import Console

    base = tmp_path / "base.ext4"
    shutil.copyfile(busybox[1], base)
    before = sha(base)
    overlays = [tmp_path / "a.ovl", tmp_path / "b.ovl"]
    for o in overlays:
        create_overlay(str(o), str(base))
    cons = [
        Console("--disk", f"{o},format=overlay", "--memory", "128M", name=f"{domname}{c}")
        for o, c in zip(overlays, "ab", strict=True)
    ]
    try:
        for con, tag in zip(cons, "ab", strict=True):
            con.expect(r"slimvisor: \S+ is up")
            assert "/dev/vda / ext4 rw" in con.run("cat /proc/mounts")
            con.run(f"echo domain-{tag} > /root/who; head -c 3000000 /dev/urandom > /root/blob-{tag}; sync")
            assert con.last_status == 0
            assert con.run("cat /root/who").strip() == f"domain-{tag}"
        sums = [con.run(f"md5sum /root/blob-{t}").split()[0] for con, t in zip(cons, "ab", strict=True)]
        for con in cons:
            con.send("poweroff")
        for con in cons:
            assert con.wait(120) == 0, con.err.decode()[-2000:]
    finally:
        for con in cons:
            con.kill()
    assert sha(base) == before  # the base was never written
    for o, tag, other, md5 in zip(overlays, "ab", "ba", sums, strict=True):
        assert guest_file(o, tmp_path, "/root/who") == f"domain-{tag}\n".encode()
        assert hashlib.md5(guest_file(o, tmp_path, f"/root/blob-{tag}") or b"").hexdigest() == md5
        assert guest_file(o, tmp_path, f"/root/blob-{other}") is None  # each sees only its own
        assert os.stat(o).st_blocks * 512 < 32 << 20  # sparse: what the guest changed, not the base
