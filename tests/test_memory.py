"""GuestMemory and map_fd_region: every view stays inside what the guest shared."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimvisor.memory import GuestMemory, GuestMemoryError, Region, map_fd_region
from tests.vring import GuardedMemory

PAGE = mmap.PAGESIZE


def three_regions() -> GuardedMemory:
    # 0x1000 and 0x2000 are adjacent in guest space (but not in the host buffer); 0x8000 is apart.
    return GuardedMemory([(0x1000, 0x1000), (0x2000, 0x800), (0x8000, 0x100)])


def test_view_inside_a_region():
    g = three_regions()
    g.write(0x1010, b"hello")
    v = g.mem.view(0x1010, 5)
    assert bytes(v) == b"hello"
    assert g.inside(v)
    v[:] = b"HELLO"
    assert g.read(0x1010, 5) == b"HELLO"
    assert g.guards_intact()


@pytest.mark.parametrize(
    "addr, length",
    [
        (0x1000, 0x1001),  # runs off the end of the first region (view never spans regions)
        (0x0FFF, 1),  # just before the first region
        (0x0, 0x10),  # below all regions
        (0x2800, 1),  # just past the second region
        (0x8100, 0),  # zero bytes, but one past the end of the last region... see below
        (0x80FF, 2),
        (0x1_0000_0000_0000, 1),
        (0xFFFF_FFFF_FFFF_FFFF, 1),
        (-1, 1),
        (0x1000, -1),
    ],
)
def test_view_outside_raises(addr, length):
    g = three_regions()
    if (addr, length) == (0x8100, 0):
        # An empty view at the very end of a region touches nothing: allowed and empty.
        assert len(g.mem.view(addr, length)) == 0
        return
    with pytest.raises(GuestMemoryError, match=r"is not in shared memory|bad guest range"):
        g.mem.view(addr, length)


def test_views_cross_adjacent_regions():
    g = three_regions()
    g.write(0x1FFE, b"abcd")  # GuardedMemory.write goes through views()
    views = g.mem.views(0x1FFE, 4)
    assert [bytes(v) for v in views] == [b"ab", b"cd"]
    assert all(g.inside(v) for v in views)
    assert g.guards_intact()


def test_views_do_not_cross_a_gap():
    g = three_regions()
    with pytest.raises(GuestMemoryError, match="guest address 0x2800 is not in shared memory"):
        g.mem.views(0x27FF, 2)  # 0x2800..0x8000 is not shared
    with pytest.raises(GuestMemoryError, match="guest address 0x2800 is not in shared memory"):
        g.mem.views(0x1000, 0x1000 + 0x800 + 1)


def test_views_of_nothing():
    g = three_regions()
    assert sum(len(v) for v in g.mem.views(0x1000, 0)) == 0


def test_empty_memory():
    mem = GuestMemory()
    with pytest.raises(GuestMemoryError, match=r"guest range 0x0\+0x1 is not in shared memory"):
        mem.view(0, 1)
    with pytest.raises(GuestMemoryError, match="guest address 0x0 is not in shared memory"):
        mem.views(0, 1)
    with pytest.raises(GuestMemoryError, match="front-end address 0x0 is not in shared memory"):
        mem.user_to_guest(0)


def test_overlapping_regions_refused():
    buf = bytearray(0x200)
    with pytest.raises(GuestMemoryError, match="overlapping regions at 0x10ff"):
        GuestMemory([Region(0x1000, 0, memoryview(buf)[:0x100]), Region(0x10FF, 0x1000, memoryview(buf)[:0x100])])
    # touching is fine
    GuestMemory([Region(0x1000, 0, memoryview(buf)[:0x100]), Region(0x1100, 0x1000, memoryview(buf)[:0x100])])


def test_user_to_guest():
    g = three_regions()
    uo = g.user_offset
    assert g.mem.user_to_guest(uo + 0x1000) == 0x1000
    assert g.mem.user_to_guest(uo + 0x27FF) == 0x27FF
    assert g.mem.user_to_guest(uo + 0x80FF) == 0x80FF
    for bad in (uo + 0x0FFF, uo + 0x2800, uo + 0x8100, 0, 0x1000):
        with pytest.raises(GuestMemoryError, match=r"front-end address 0x[0-9a-f]+ is not in shared memory"):
            g.mem.user_to_guest(bad)


def test_regions_sorted_and_sizes():
    g = three_regions()
    assert [(r.guest_addr, r.size) for r in g.mem.regions] == [
        (0x1000, 0x1000),
        (0x2000, 0x800),
        (0x8000, 0x100),
    ]


def test_mmap_backing():
    g = GuardedMemory([(0, 0x1000), (0x1000, 0x1000)], backing="mmap")
    try:
        g.write(0xFF0, b"x" * 0x20)
        assert g.read(0xFF0, 0x20) == b"x" * 0x20
        assert g.guards_intact()
    finally:
        g.release()


# -- map_fd_region ------------------------------------------------------------------------------
@pytest.fixture
def memfd():
    fd = os.memfd_create("slimvisor-test-mem")
    os.ftruncate(fd, 4 * PAGE)
    os.pwrite(fd, bytes(range(256)) * (4 * PAGE // 256), 0)
    yield fd
    os.close(fd)


def test_map_fd_region_page_aligned(memfd):
    r = map_fd_region(memfd, 0x4000_0000, 0x7F00_0000_0000, 2 * PAGE, PAGE)
    assert (r.guest_addr, r.user_addr, r.size) == (0x4000_0000, 0x7F00_0000_0000, 2 * PAGE)
    assert bytes(r.data[:4]) == os.pread(memfd, 4, PAGE)
    r.data[0:3] = b"abc"  # MAP_SHARED: the front-end (the fd) sees our writes
    assert os.pread(memfd, 3, PAGE) == b"abc"
    r.data.release()


def test_map_fd_region_unaligned_offset(memfd):
    # The mapping starts on a page boundary below the offset; the view must start exactly at it.
    r = map_fd_region(memfd, 0, 0, 100, PAGE + 17)
    assert r.size == 100
    assert bytes(r.data) == os.pread(memfd, 100, PAGE + 17)
    r.data.release()


@pytest.mark.parametrize(
    "size, offset",
    [(5 * PAGE, 0), (PAGE, 3 * PAGE + 1), (1, 4 * PAGE), (0, 0), (-PAGE, 0), (PAGE, -PAGE)],
)
def test_map_fd_region_refuses_bad_ranges(memfd, size, offset):
    with pytest.raises(GuestMemoryError, match=r"bad memory region|is beyond the end of its file"):
        map_fd_region(memfd, 0, 0, size, offset)


def test_map_fd_region_refuses_empty_memfd():
    """A zero-length memfd cannot back a region: touching such a mapping would SIGBUS the backend.

    map_fd_region skips its own end-of-file check when st_size is 0; Python's mmap refuses instead
    (ValueError), which VhostUserBackend turns into a ProtocolError as well.
    """
    fd = os.memfd_create("slimvisor-test-empty")
    try:
        with pytest.raises((GuestMemoryError, ValueError)):
            map_fd_region(fd, 0, 0, PAGE, 0)
    finally:
        os.close(fd)


# -- property: views never leave the regions ----------------------------------------------------
SPECS = [(0x1000, 0x1000), (0x2000, 0x800), (0x8000, 0x100)]
interesting = st.sampled_from(
    [0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x27FF, 0x2800, 0x7FFF, 0x8000, 0x80FF, 0x8100, 2**64 - 1]
)


@settings(max_examples=200, deadline=None)
@given(
    addr=st.one_of(interesting, st.integers(0, 0x9000), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.sampled_from([0, 1, 2, 0x100, 0x800, 0x1000, 0x1800, 2**32 - 1]), st.integers(0, 0x2000)),
)
def test_views_property(addr, length):
    g = GuardedMemory(SPECS)
    try:
        views = g.mem.views(addr, length)
    except GuestMemoryError:
        return
    assert sum(len(v) for v in views) == length
    assert all(g.inside(v) for v in views)
    for v in views:
        v[:] = b"\xee" * len(v)
    assert g.guards_intact()
    try:
        one = g.mem.view(addr, length)
    except GuestMemoryError:
        assert len(views) > 1 or length == 0
    else:
        assert g.inside(one) and len(one) == length
