"""virtio-rng (5.4) and virtio-balloon (5.5), driven through real split rings by the test driver."""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimvisor.devices.balloon import (
    DEFLATEQ,
    INFLATEQ,
    STATSQ,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_S_AVAIL,
    VIRTIO_BALLOON_S_HTLB_PGFAIL,
    VIRTIO_BALLOON_S_MEMFREE,
    VIRTIO_BALLOON_S_SWAP_IN,
    BalloonDevice,
)
from slimvisor.devices.rng import MAX_REQUEST, RngDevice
from slimvisor.memory import GuestMemory, map_fd_region
from slimvisor.runtime.ratelimit import RateLimiter, TokenBucket
from slimvisor.virtio.device import COMMON_FEATURES
from slimvisor.virtio.queue import VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_BALLOON, VIRTIO_ID_RNG, bit
from tests.vring import Driver, FakeTransport, GuardedMemory

R0, R1, R2 = 0x0, 0x10000, 0x40000
SPECS = [(R0, 0x10000), (R1, 0x10000), (R2, 0x1000)]
DATA = 0x2000  # past three rings of 16 entries at 0x0, 0x400, 0x800
PAGE = 4096
STAT = struct.Struct("<HQ")


def rig(dev, nqueues: int, mem: GuestMemory | None = None, **qkw):
    """Drivers for `nqueues` rings at 0x0, 0x400, ... and the device attached to a fake transport."""
    g = None
    if mem is None:
        g = GuardedMemory(SPECS)
        mem = g.mem
    drivers = [Driver(mem, 16, R0 + 0x400 * i) for i in range(nqueues)]
    t = FakeTransport({i: d.queue(**qkw) for i, d in enumerate(drivers)}, mem)
    dev.attach(t)
    dev.ack_features(dev.features())
    return g, drivers, t


# -- virtio-rng ---------------------------------------------------------------------------------
def test_rng_identity():
    dev = RngDevice()
    assert dev.device_id == VIRTIO_ID_RNG == 4 and dev.max_queues == 1
    assert dev.features() == COMMON_FEATURES and dev.config() == b""


def test_rng_bytes_arrive_and_differ():
    dev = RngDevice()
    g, (drv,), t = rig(dev, 1)
    a = drv.add([(DATA, 64, True)])
    b = drv.add([(DATA + 0x100, 64, True)])
    dev.drain(0, t.queues[0])
    assert drv.used() == [(a, 64), (b, 64)]
    first, second = g.read(DATA, 64), g.read(DATA + 0x100, 64)
    assert first != second and first != bytes(64) and second != bytes(64)
    c = drv.add([(DATA, 64, True)])
    dev.drain(0, t.queues[0])
    assert drv.used() == [(c, 64)] and g.read(DATA, 64) != first
    assert dev.bytes_served == 192 and g.guards_intact()


def test_rng_buffers_split_across_descriptors_regions_and_indirect():
    dev = RngDevice()
    g, (drv,), t = rig(dev, 1, indirect=True)
    straddle = (R1 - 8, 16, True)  # the end of region 0 and the start of region 1
    a = drv.add([(DATA, 3, True), straddle])
    b = drv.add_indirect(R2, [(DATA + 0x100, 5, True), (DATA + 0x200, 7, True)])
    g.write(R1 - 8, bytes(16))
    dev.drain(0, t.queues[0])
    assert drv.used() == [(a, 19), (b, 12)]
    assert g.read(R1 - 8, 16) != bytes(16) and g.guards_intact()


def test_rng_fills_at_most_max_request():
    dev = RngDevice()
    g, (drv,), t = rig(dev, 1)
    head = drv.add([(0x8000, 0x8000, True), (R1, 0x10000, True)])
    dev.drain(0, t.queues[0])
    assert drv.used() == [(head, MAX_REQUEST)]
    assert g.read(R1 + MAX_REQUEST - 0x8000, 0x8000) == bytes(0x8000)  # the tail left alone


@pytest.mark.parametrize(
    "bufs",
    [
        [(DATA, 16, False)],  # nothing to write into
        [(DATA, 16, False), (DATA + 0x100, 16, True)],  # 5.4.6.1: no driver-readable buffers
        [(DATA, 0, True)],  # writable, but not one byte of it
    ],
)
def test_rng_chain_without_room_is_a_virtqueue_error(bufs):
    dev = RngDevice()
    g, (drv,), t = rig(dev, 1)
    drv.add(bufs)
    with pytest.raises(VirtqueueError, match="is not one or more device-writable bytes"):
        dev.drain(0, t.queues[0])
    assert drv.used() == [] and g.guards_intact()


def test_rng_rate_limit_defers_and_resumes():
    now = [time.monotonic()]
    dev = RngDevice(RateLimiter(bandwidth=TokenBucket(64, refill_time=1.0)), clock=lambda: now[0])
    g, (drv,), t = rig(dev, 1)
    q = t.queues[0]
    heads = [drv.add([(DATA + 0x100 * i, 64, True)]) for i in range(3)]
    dev.drain(0, q)
    assert drv.used() == [(heads[0], 64)]
    assert q.last_avail_idx == 1 and q.has_available()  # the second request stays on the ring
    assert len(t.timers) == 1 and t.timers[0][0] == pytest.approx(1.0, abs=0.01)
    dev.drain(0, q)  # a kick meanwhile: still refused, and no second timer
    assert drv.used() == [] and len(t.timers) == 1 and dev.waiting
    now[0] += 1.0
    t.run_timers()
    assert drv.used() == [(heads[1], 64)] and t.interrupts == [0]
    assert len(t.timers) == 1  # the third waits its turn
    now[0] += 1.0
    t.run_timers()
    assert drv.used() == [(heads[2], 64)] and t.timers == [] and not dev.waiting
    assert g.guards_intact()


def test_rng_resume_after_the_guest_broke_the_ring_fails_the_device():
    now = [time.monotonic()]
    dev = RngDevice(RateLimiter(bandwidth=TokenBucket(8, refill_time=1.0)), clock=lambda: now[0])
    _, (drv,), t = rig(dev, 1)
    drv.add([(DATA, 8, True)])
    drv.add([(DATA + 0x100, 8, True)])
    dev.drain(0, t.queues[0])
    drv.set_desc(1, DATA + 0x100, 8, 0)  # now device-readable: a malformed request
    now[0] += 1.0
    t.run_timers()
    assert t.failed is not None and "queue 0" in t.failed


def test_rng_timer_after_detach_does_nothing():
    dev = RngDevice(RateLimiter(bandwidth=TokenBucket(8, refill_time=1.0)))
    _, (drv,), t = rig(dev, 1)
    drv.add([(DATA, 8, True)])
    drv.add([(DATA + 0x100, 8, True)])
    dev.drain(0, t.queues[0])
    dev.detach()
    t.run_timers()
    assert drv.used() == [(0, 8)] and t.failed is None


valid_rng_buf = st.tuples(st.integers(DATA, R1 + 0xF000), st.integers(1, 0x1000), st.just(True))
any_rng_buf = st.tuples(
    st.one_of(st.integers(DATA, R1 + 0x10000), st.integers(R1 - 0x40, R1), st.integers(0, 0x50000)),
    st.sampled_from([0, 1, 64, 4096]) | st.integers(0, 0x20000),
    st.booleans(),
)
rng_chain = st.lists(valid_rng_buf, min_size=1, max_size=4) | st.lists(any_rng_buf, min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(rng_chain, min_size=1, max_size=6), limit=st.booleans())
def test_rng_random_chains_only_raise_virtqueue_error(chains, limit):
    limiter = RateLimiter(bandwidth=TokenBucket(4096, refill_time=1.0)) if limit else None
    dev = RngDevice(limiter)
    g, (drv,), t = rig(dev, 1, event_idx=True)
    room = {}
    for bufs in chains:
        if len(bufs) <= len(drv.free):
            room[drv.add(bufs)] = sum(n for _, n, w in bufs if w)
    try:
        dev.drain(0, t.queues[0])
        event(f"drained, waiting={dev.waiting}")
    except VirtqueueError:
        event("VirtqueueError")
    assert g.guards_intact()
    if any(w and a < 0x2000 for bufs in chains for a, _, w in bufs):
        return  # it wrote over its own rings: only the guest is hurt
    for head, n in drv.used():
        assert 1 <= n <= min(room[head], MAX_REQUEST)


# -- virtio-balloon -----------------------------------------------------------------------------
def test_balloon_identity_and_features():
    dev = BalloonDevice()
    assert dev.device_id == VIRTIO_ID_BALLOON == 5 and dev.max_queues == 3
    assert dev.device_features() == bit(VIRTIO_BALLOON_F_STATS_VQ)
    assert BalloonDevice(deflate_on_oom=True).device_features() & bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    assert dev.config() == struct.pack("<II", 0, 0)


def test_balloon_set_target_changes_config_and_notifies():
    dev = BalloonDevice()
    _, _, t = rig(dev, 3)
    dev.set_target(1234)
    assert t.config_changes == 1 and dev.target_pages == 1234
    assert dev.config()[:4] == struct.pack("<I", 1234)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match="is not a le32 page count"):
            dev.set_target(bad)
    assert t.config_changes == 1


def test_balloon_guest_writes_actual_only():
    dev = BalloonDevice()
    dev.set_target(10)  # not attached: nobody to tell, nothing breaks
    dev.write_config(4, struct.pack("<I", 7))
    assert dev.actual_pages == 7
    dev.write_config(6, b"\x01\x00")  # a partial write of the high half
    assert dev.actual_pages == 0x10007
    dev.write_config(0, struct.pack("<II", 99, 99))  # num_pages is the host's
    dev.write_config(8, b"\x01")
    assert dev.config() == struct.pack("<II", 10, 0x10007) and dev.bad_config_writes == 2


@pytest.fixture
def memfd_guest():
    """1 MiB of guest memory in a memfd, as a front-end shares it; yields (fd, GuestMemory)."""
    fd = os.memfd_create("balloon-guest")
    os.ftruncate(fd, 1 << 20)
    mem = GuestMemory([map_fd_region(fd, 0, 0x7F00_0000_0000, 1 << 20, 0)])
    yield fd, mem
    os.close(fd)


def put_pfns(mem: GuestMemory, addr: int, pfns: list[int]) -> tuple[int, int, bool]:
    raw = struct.pack(f"<{len(pfns)}I", *pfns)
    mem.view(addr, len(raw))[:] = raw
    return (addr, len(raw), False)


@pytest.mark.skipif(mmap.PAGESIZE != PAGE, reason="holes are punched per 4 KiB host page")
def test_balloon_inflate_frees_memfd_pages(memfd_guest):
    fd, mem = memfd_guest
    dev = BalloonDevice()
    _, drivers, t = rig(dev, 3, mem)
    mem.view(0x40000, 0x40000)[:] = b"\x5a" * 0x40000  # the guest touched 64 pages
    pfns = list(range(0x40, 0x80))
    bufs = [put_pfns(mem, DATA, pfns[:32]), put_pfns(mem, DATA + 0x200, pfns[32:])]
    before = os.fstat(fd).st_blocks
    head = drivers[INFLATEQ].add(bufs)
    dev.drain(INFLATEQ, t.queues[INFLATEQ])
    assert drivers[INFLATEQ].used() == [(head, 0)]
    assert t.discards == [(0x40000, 0x40000)]  # one run of 64 contiguous frames, one call
    assert before - os.fstat(fd).st_blocks == 64 * PAGE // 512
    assert bytes(mem.view(0x40000, 0x40000)) == bytes(0x40000)
    assert dev.inflated == 64 and dev.bad_pfns == 0


def test_balloon_coalesces_runs_and_counts_frames_outside_memory(memfd_guest):
    _, mem = memfd_guest
    dev = BalloonDevice()
    _, drivers, t = rig(dev, 3, mem)
    pfns = [0x50, 0x51, 0x60, 0x52, 0xFF, 0x100, 0x101, 0xFFFFFFFF, 0x61]  # memory ends at frame 0x100
    drivers[INFLATEQ].add([put_pfns(mem, DATA, pfns)])
    dev.drain(INFLATEQ, t.queues[INFLATEQ])
    pages = [(a >> 12, n >> 12) for a, n in t.discards]
    assert pages == [(0x50, 2), (0x60, 1), (0x52, 1), (0xFF, 1), (0x61, 1)]
    assert dev.bad_pfns == 3 and dev.inflated == 6 and t.failed is None


def test_balloon_deflate_only_accounts():
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    head = drivers[DEFLATEQ].add([put_pfns(g.mem, DATA, [1, 2, 3, 0xFFFFFFFF])])
    dev.drain(DEFLATEQ, t.queues[DEFLATEQ])
    assert drivers[DEFLATEQ].used() == [(head, 0)] and dev.deflated == 4 and t.discards == []


@pytest.mark.parametrize("queue", [INFLATEQ, DEFLATEQ])
@pytest.mark.parametrize(
    "bufs",
    [[(DATA, 6, False)], [(DATA, 4, False), (DATA + 0x100, 4, True)], [(DATA, 3, False), (DATA + 4, 3, False)]],
)
def test_balloon_malformed_frame_buffers(queue, bufs):
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    drivers[queue].add(bufs)
    with pytest.raises(VirtqueueError, match="is not an array of le32 frame numbers"):
        dev.drain(queue, t.queues[queue])
    assert t.discards == [] and g.guards_intact()


def stats_buffer(g: GuardedMemory, values: dict[int, int]) -> tuple[int, int, bool]:
    raw = b"".join(STAT.pack(tag, v) for tag, v in values.items())
    g.write(DATA + 0x800, raw)
    return (DATA + 0x800, len(raw), False)


def test_balloon_stats_buffer_is_kept_until_the_host_asks():
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    drv, q = drivers[STATSQ], t.queues[STATSQ]
    assert not dev.request_stats()  # the guest has not given its buffer yet
    head = drv.add([stats_buffer(g, {VIRTIO_BALLOON_S_SWAP_IN: 5, VIRTIO_BALLOON_S_MEMFREE: 1 << 30, 77: 1})])
    dev.drain(STATSQ, q)
    assert drv.used() == []  # kept
    assert dev.stats() == {"swap_in": 5, "free_memory": 1 << 30} and dev.stats_time is not None
    assert dev.request_stats() and drv.used() == [(head, 0)] and t.interrupts == [STATSQ]
    assert not dev.request_stats()  # the request is out
    refill = drv.add([stats_buffer(g, {VIRTIO_BALLOON_S_AVAIL: 3, VIRTIO_BALLOON_S_HTLB_PGFAIL: 2})])
    dev.drain(STATSQ, q)
    assert dev.stats() == {"available_memory": 3, "htlb_pgfail": 2} and drv.used() == []
    drv.add([stats_buffer(g, {VIRTIO_BALLOON_S_SWAP_IN: 9})])  # a second buffer: the held one goes back
    dev.drain(STATSQ, q)
    assert drv.used() == [(refill, 0)] and dev.stats() == {"swap_in": 9}
    dev.reset()
    assert dev.stats() == {} and not dev.request_stats()


def test_balloon_reconnect_does_not_return_the_old_guests_buffer():
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    drivers[STATSQ].add([stats_buffer(g, {VIRTIO_BALLOON_S_SWAP_IN: 1})])
    dev.drain(STATSQ, t.queues[STATSQ])
    dev.write_config(4, struct.pack("<I", 5))
    dev.detach()  # the front-end went away (a UML reboot reconnects with a fresh ring)
    _, drivers, t = rig(dev, 3)
    assert not dev.request_stats() and drivers[STATSQ].used() == [] and dev.actual_pages == 0


def test_balloon_no_stats_queue_without_the_feature():
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    dev.ack_features(COMMON_FEATURES)
    drivers[STATSQ].add([stats_buffer(g, {0: 1})])
    dev.drain(STATSQ, t.queues[STATSQ])
    assert not dev.request_stats()


@pytest.mark.parametrize("bufs", [[(DATA, 9, False)], [(DATA, 10, True)], [(DATA, 10, False), (DATA + 16, 1, True)]])
def test_balloon_malformed_stats_buffer(bufs):
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    drivers[STATSQ].add(bufs)
    with pytest.raises(VirtqueueError, match="is not an array of virtio_balloon_stat"):
        dev.drain(STATSQ, t.queues[STATSQ])
    assert not dev.request_stats() and g.guards_intact()


pfn_values = st.one_of(
    st.integers(0x4, 0x1F),
    st.integers(0x20, 0x9F),
    st.integers(0x100, 0x10F),
    st.integers(0x3F, 0x41),
    st.just(0xFFFFFFFF),
)


@st.composite
def balloon_chain(draw):
    queue = draw(st.sampled_from([INFLATEQ, DEFLATEQ, STATSQ]))
    if draw(st.integers(0, 4)):
        if queue == STATSQ:
            tags = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 2**64 - 1)), max_size=12))
            raw = b"".join(STAT.pack(*s) for s in tags)
        else:
            raw = b"".join(struct.pack("<I", p) for p in draw(st.lists(pfn_values, max_size=40)))
        bufs = [(None, len(raw), False)]
    else:  # anything at all
        bufs = draw(st.lists(st.tuples(st.integers(0, 0x50000), st.integers(0, 0x300), st.booleans()), max_size=3))
        raw = draw(st.binary(max_size=0x40))
    return queue, raw, bufs, draw(st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(balloon_chain(), min_size=1, max_size=8))
def test_balloon_random_chains_only_raise_virtqueue_error(chains):
    dev = BalloonDevice()
    g, drivers, t = rig(dev, 3)
    slot = DATA
    for queue, raw, bufs, ask in chains:
        g.write(slot, raw)
        bufs = [(slot if a is None else a, n, w) for a, n, w in bufs]
        slot += 0x200
        if bufs and len(bufs) <= len(drivers[queue].free):
            drivers[queue].add(bufs)
        try:
            dev.drain(queue, t.queues[queue])
        except VirtqueueError:
            event("VirtqueueError")
            return
        if ask:
            dev.request_stats()
    event(f"discarded: {bool(t.discards)}, bad frames: {bool(dev.bad_pfns)}")
    assert g.guards_intact()
    assert all(isinstance(v, int) for v in dev.stats().values())
