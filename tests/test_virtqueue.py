"""SplitQueue (device side) against a test driver, then against hostile and random rings."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimvisor.memory import slice_views
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import MAX_CHAIN_BYTES, Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from tests.vring import DESC, U16, Driver, GuardedMemory, indirect_entries, layout, write_table

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT

# Region 0 holds the rings and some data, region 1 is adjacent to it in guest space (buffers may
# straddle the two), region 2 stands apart (indirect tables live there).
R0, R1, R2 = 0x0, 0x10000, 0x40000
SPECS = [(R0, 0x10000), (R1, 0x10000), (R2, 0x1000)]
DATA = 0x1000  # first data byte in region 0, past any ring of up to 128 entries


def setup(size: int = 8, *, start_idx: int = 0, backing: str = "bytearray", **kw):
    g = GuardedMemory(SPECS, backing=backing)
    drv = Driver(g.mem, size, R0, start_idx=start_idx)
    return g, drv, drv.queue(last_avail_idx=start_idx, **kw)


# -- ordinary operation -------------------------------------------------------------------------
def test_empty_queue():
    _, drv, q = setup()
    assert not q.has_available()
    assert q.pop() is None
    assert drv.used() == []


@pytest.mark.parametrize("backing", ["bytearray", "mmap"])
def test_pop_push_roundtrip(backing):
    g, drv, q = setup(backing=backing)
    g.write(DATA, b"request!")
    head = drv.add([(DATA, 8, False), (DATA + 0x100, 32, True)])
    assert q.has_available()
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.read(0, 8) == b"request!"
    assert (chain.readable_len, chain.writable_len) == (8, 32)
    assert chain.write(0, b"response") == 8
    q.push(chain.head, 8)
    assert q.pop() is None
    assert drv.used() == [(head, 8)]
    assert drv.used_idx == 1 and q.used_idx == 1
    assert g.read(DATA + 0x100, 8) == b"response"
    assert g.guards_intact()
    del chain, q, drv
    if backing == "mmap":
        g.release()


def test_a_driver_on_another_cpu_never_sees_a_ring_index_step_back():
    """The used index and avail_event are each written with one store. A driver process polling
    them while the device pushes and re-arms kicks sees them only move forward. (With
    struct.pack_into they did not: CPython zeroes the bytes before writing the value, and a UML
    guest that read used.idx as 0 took stale ring entries as used: "id N is not a head!".)
    The driver needs a CPU of its own to catch the device mid-store."""
    g = GuardedMemory(SPECS, backing="mmap")
    drv = Driver(g.mem, 8, R0, start_idx=1000)
    q = drv.queue(last_avail_idx=1000, event_idx=True)
    fields = [drv.layout.used + 2, drv.layout.used + 4 + 8 * 8]  # used idx, avail_event
    done = g.mem.view(R2, 1)
    results = g.mem.view(R2 + 8, 16)  # samples taken, steps back seen
    # A 16-bit index that moves 32768 or more between two reads looks like a step back: the device
    # waits for a fresh read after each burst of 1000, so a driver preempted on a busy host cannot
    # sleep through a wrap and report one that never happened.
    progress = g.mem.view(R2 + 32, 8)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the driver: poll both fields until the device is done
        status = 1
        os.close(ready_r)
        try:
            views = [g.mem.view(a, 2) for a in fields]
            last = [U16.unpack(v)[0] for v in views]
            samples = back = 0
            os.write(ready_w, b"!")
            while not done[0]:
                for k, v in enumerate(views):
                    now = U16.unpack(v)[0]
                    back += (now - last[k]) & 0xFFFF >= 0x8000
                    last[k] = now
                samples += 1
                progress[:8] = samples.to_bytes(8, "little")
            results[:16] = samples.to_bytes(8, "little") + back.to_bytes(8, "little")
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    idx = 1000
    try:
        assert os.read(ready_r, 1) == b"!", "the driver process failed to start"
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen = bytes(progress)
            for _ in range(1000):
                idx = (idx + 1) & 0xFFFF
                drv.set_avail_idx(idx)
                q.last_avail_idx = idx
                assert not q.enable_kicks()
                q.push(0, 0)
            while bytes(progress) == seen and time.monotonic() < deadline + 10:
                pass  # the driver has not read since this burst began
    finally:
        done[0] = 1
        os.close(ready_r)
        status = os.waitpid(pid, 0)[1]
    assert status == 0
    samples, back = int.from_bytes(results[:8], "little"), int.from_bytes(results[8:], "little")
    assert samples > 10_000, "the driver process hardly ran"
    assert back == 0, f"the driver saw a ring index step back {back} times in {samples} reads"
    assert q.used_idx == drv.used_idx == idx
    del done, results, progress, q, drv
    g.release()


def test_chain_splits_readable_then_writable():
    g, drv, q = setup()
    g.write(DATA, b"abc")
    g.write(DATA + 0x10, b"defgh")
    drv.add([(DATA, 3, False), (DATA + 0x10, 5, False), (DATA + 0x20, 2, True), (DATA + 0x30, 4, True)])
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"abc", b"defgh"]
    assert [len(v) for v in chain.writable] == [2, 4]
    assert chain.read(0, 100) == b"abcdefgh"
    assert chain.read(2, 3) == b"cde"
    assert chain.read(8, 1) == b""
    # write across the writable buffers; what does not fit is dropped and reported
    assert chain.write(1, b"XYZWV") == 5
    assert chain.write(0, b"0123456789") == 6
    assert g.read(DATA + 0x20, 2) == b"01" and g.read(DATA + 0x30, 4) == b"2345"
    assert chain.write(6, b"!") == 0
    assert g.guards_intact()


def test_slice_views():
    data = [memoryview(b"abc"), memoryview(b""), memoryview(b"defg"), memoryview(b"h")]
    assert [bytes(v) for v in slice_views(data, 2, 4)] == [b"c", b"def"]
    assert [bytes(v) for v in slice_views(data, 0, 100)] == [b"abc", b"defg", b"h"]
    assert slice_views(data, 8, 1) == []
    assert slice_views(data, 0, 0) == []


def test_buffer_straddling_adjacent_regions():
    g, drv, q = setup()
    g.write(R1 - 4, b"01234567")
    drv.add([(R1 - 4, 8, False), (R1 - 2, 4, True)])
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"0123", b"4567"]
    assert [len(v) for v in chain.writable] == [2, 2]
    assert all(g.inside(v) for v in chain.readable + chain.writable)


def test_several_chains_in_order_and_out_of_order_completion():
    _, drv, q = setup(size=4)
    heads = [drv.add([(DATA + 0x100 * i, 16, True)]) for i in range(4)]
    chains = [q.pop() for _ in range(4)]
    assert [c.head for c in chains] == heads
    assert q.pop() is None
    for c in reversed(chains):
        q.push(c.head, 16)
    assert drv.used() == [(h, 16) for h in reversed(heads)]
    # descriptors are free again: the ring keeps going
    for round_ in range(3):
        hs = [drv.add([(DATA, 1, False), (DATA + 8, 1, True)]) for _ in range(2)]
        got = [q.pop() for _ in range(2)]
        assert [c.head for c in got] == hs, round_
        for c in got:
            q.push(c.head, 1)
        assert len(drv.used()) == 2


def test_indices_wrap_around():
    _, drv, q = setup(size=4, start_idx=0xFFFE)
    assert q.used_idx == 0xFFFE
    for _ in range(6):
        head = drv.add([(DATA, 4, True)])
        chain = q.pop()
        assert chain.head == head
        q.push(head, 4)
        assert drv.used() == [(head, 4)]
    assert q.last_avail_idx == 4 and q.used_idx == 4


def test_zero_length_buffers_are_harmless():
    _, drv, q = setup()
    drv.add([(DATA, 0, False), (DATA, 0, True), (DATA + 1, 1, True)])
    chain = q.pop()
    assert (chain.readable_len, chain.writable_len) == (0, 1)


# -- indirect descriptors -----------------------------------------------------------------------
def test_indirect_chain():
    g, drv, q = setup(indirect=True)
    g.write(DATA, b"hdr")
    bufs = [(DATA, 3, False), (R1 - 2, 4, True), (DATA + 0x40, 1, True)]
    head = drv.add_indirect(R2, bufs)
    chain = q.pop()
    assert chain.head == head
    assert chain.read(0, 3) == b"hdr"
    assert [len(v) for v in chain.writable] == [2, 2, 1]
    q.push(head, 5)
    assert drv.used() == [(head, 5)]


def test_indirect_write_flag_on_the_pointer_is_ignored():
    g, drv, q = setup(indirect=True)
    write_table(g.mem, R2, indirect_entries([(DATA, 4, False), (DATA + 8, 4, True)]))
    drv.set_desc(0, R2, 32, INDIRECT | WRITE)
    drv.put_avail(0)
    chain = q.pop()
    assert (chain.readable_len, chain.writable_len) == (4, 4)


def test_indirect_not_negotiated():
    _, drv, q = setup(indirect=False)
    drv.add_indirect(R2, [(DATA, 16, False)])
    with pytest.raises(VirtqueueError, match="invalid indirect descriptor in chain 0"):
        q.pop()


def _indirect_head(drv: Driver, addr: int, length: int, flags: int = INDIRECT, nxt: int = 0) -> None:
    drv.set_desc(0, addr, length, flags, nxt)
    drv.put_avail(0)


@pytest.mark.parametrize("length", [0, 8, 17, 16 * 3 + 1, 16 * (VIRTQ_MAX_SIZE + 1), 0xFFFFFFF0])
def test_indirect_bad_length(length):
    g, drv, q = setup(indirect=True)
    write_table(g.mem, R2, indirect_entries([(DATA, 1, False)] * 3))
    _indirect_head(drv, R2, length)
    with pytest.raises(VirtqueueError, match=r"indirect table length \d+ is invalid"):
        q.pop()


@pytest.mark.parametrize(
    "addr",
    [R2 + 0x1000 - 16, 0x30000, 0xFFFF_FFFF_FFFF_FFF0, R1 - 16],  # off the end, gap, huge, straddle
)
def test_indirect_table_outside_memory(addr):
    _, drv, q = setup(indirect=True)
    _indirect_head(drv, addr, 32)
    with pytest.raises(VirtqueueError, match="is not in shared memory"):
        q.pop()


def test_indirect_with_next_flag():
    g, drv, q = setup(indirect=True)
    write_table(g.mem, R2, indirect_entries([(DATA, 1, False)]))
    drv.set_desc(1, DATA, 1, WRITE)
    _indirect_head(drv, R2, 16, INDIRECT | NEXT, 1)
    with pytest.raises(VirtqueueError, match="invalid indirect descriptor in chain 0"):
        q.pop()


def test_nested_indirect():
    g, drv, q = setup(indirect=True)
    write_table(g.mem, R2 + 0x100, indirect_entries([(DATA, 1, False)]))
    write_table(g.mem, R2, [(DATA, 1, NEXT, 1), (R2 + 0x100, 16, INDIRECT, 0)])
    _indirect_head(drv, R2, 32)
    with pytest.raises(VirtqueueError, match="invalid indirect descriptor in chain 0"):
        q.pop()


def test_indirect_loop_and_next_beyond_table():
    g, drv, q = setup(indirect=True)
    write_table(g.mem, R2, [(DATA, 1, NEXT, 1), (DATA, 1, NEXT, 0)])
    _indirect_head(drv, R2, 32)
    with pytest.raises(VirtqueueError, match="descriptor chain from head 0 loops or is too long"):
        q.pop()
    write_table(g.mem, R2, [(DATA, 1, NEXT, 1), (DATA, 1, NEXT, 2)])  # next = 2 in a 2-entry table
    drv.put_avail(0)
    with pytest.raises(VirtqueueError, match="descriptor index 2 beyond table of 2"):
        q.pop()


def test_indirect_readable_after_writable():
    _, drv, q = setup(indirect=True)
    drv.add_indirect(R2, [(DATA, 1, True), (DATA + 1, 1, False)])
    with pytest.raises(VirtqueueError, match="has a device-readable buffer after a writable one"):
        q.pop()


def test_chain_length_overflow():
    """2**15 descriptors of 128 KiB + 1 (aliasing one buffer) total more than a le32 can say."""
    per = 0x20001
    assert VIRTQ_MAX_SIZE * per > MAX_CHAIN_BYTES >= (VIRTQ_MAX_SIZE - 1) * per
    table, data = 0x100000, 0x200000
    g = GuardedMemory([(R0, 0x1000), (table, 16 * VIRTQ_MAX_SIZE), (data, per)])
    drv = Driver(g.mem, 4, R0)
    q = drv.queue(indirect=True)
    write_table(g.mem, table, indirect_entries([(data, per, False)] * VIRTQ_MAX_SIZE))
    drv.set_desc(0, table, 16 * VIRTQ_MAX_SIZE, INDIRECT)
    drv.put_avail(0)
    with pytest.raises(VirtqueueError, match="is longer than 4294967295 bytes"):
        q.pop()
    # one descriptor less fits
    write_table(g.mem, table, indirect_entries([(data, per, False)] * (VIRTQ_MAX_SIZE - 1)))
    drv.set_desc(0, table, 16 * (VIRTQ_MAX_SIZE - 1), INDIRECT)
    drv.put_avail(0)
    assert q.pop().readable_len == (VIRTQ_MAX_SIZE - 1) * per


# -- hostile direct chains ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "addr, length",
    [
        (0x20000, 1),  # in the gap between region 1 and region 2
        (R2 + 0x1000, 1),  # one past region 2
        (R2 + 0xFFF, 2),  # runs off region 2
        (R1 + 0x10000 - 1, 2),  # runs off region 1 into the gap
        (0xFFFF_FFFF_FFFF_FFFF, 1),
        (0xFFFF_FFFF_FFFF_F000, 0x2000),  # wraps the 64-bit address space
        (DATA, 0xFFFFFFFF),
    ],
)
@pytest.mark.parametrize("writable", [False, True])
def test_buffer_outside_shared_memory(addr, length, writable):
    g, drv, q = setup()
    drv.add([(DATA, 16, False), (addr, length, writable)])
    with pytest.raises(VirtqueueError, match=r"is not in shared memory|is longer than 4294967295 bytes"):
        q.pop()
    assert g.guards_intact()


def test_descriptor_loop():
    _, drv, q = setup()
    drv.set_desc(0, DATA, 1, NEXT, 1)
    drv.set_desc(1, DATA, 1, NEXT, 2)
    drv.set_desc(2, DATA, 1, NEXT, 0)
    drv.put_avail(0)
    with pytest.raises(VirtqueueError, match="descriptor chain from head 0 loops or is too long"):
        q.pop()


def test_descriptor_self_loop():
    _, drv, q = setup()
    drv.set_desc(3, DATA, 1, NEXT | WRITE, 3)
    drv.put_avail(3)
    with pytest.raises(VirtqueueError, match="descriptor chain from head 3 loops or is too long"):
        q.pop()


def test_over_long_chain():
    """A chain may not have more descriptors than the queue size (it then must repeat one)."""
    _, drv, q = setup(size=8)
    for i in range(8):
        drv.set_desc(i, DATA, 1, NEXT, (i + 1) % 8)
    drv.put_avail(5)
    with pytest.raises(VirtqueueError, match="descriptor chain from head 5 loops or is too long"):
        q.pop()


@pytest.mark.parametrize("nxt", [8, 9, 0xFFFF])
def test_next_beyond_table(nxt):
    _, drv, q = setup(size=8)
    drv.set_desc(0, DATA, 1, NEXT, nxt)
    drv.put_avail(0)
    with pytest.raises(VirtqueueError, match=r"descriptor index \d+ beyond table of 8"):
        q.pop()


@pytest.mark.parametrize("head", [8, 0xFFFF])
def test_head_beyond_table(head):
    _, drv, q = setup(size=8)
    drv.put_avail(head)
    with pytest.raises(VirtqueueError, match=r"descriptor index \d+ beyond table of 8"):
        q.pop()


def test_readable_after_writable():
    _, drv, q = setup()
    drv.add([(DATA, 16, False), (DATA + 16, 1, True), (DATA + 32, 4, False)])
    with pytest.raises(VirtqueueError, match="has a device-readable buffer after a writable one"):
        q.pop()


@pytest.mark.parametrize("jump", [9, 100, 0x8000, 0xFFFF])
def test_avail_index_jumps_too_far(jump):
    _, drv, q = setup(size=8)
    drv.set_avail_idx(jump)
    with pytest.raises(VirtqueueError, match=r"available index jumped from 0 to \d+"):
        q.has_available()
    with pytest.raises(VirtqueueError, match=r"available index jumped from 0 to \d+"):
        q.pop()
    with pytest.raises(VirtqueueError, match=r"available index jumped from 0 to \d+"):
        q.enable_kicks()


def test_avail_index_may_run_a_full_ring_ahead():
    _, drv, q = setup(size=8, start_idx=0xFFFC)
    for i in range(8):
        drv.set_desc(i, DATA, 1, WRITE)
        drv.put_avail(i)
    assert [q.pop().head for _ in range(8)] == list(range(8))
    assert q.pop() is None


@pytest.mark.parametrize("size", [0, 3, 6, 1000, VIRTQ_MAX_SIZE * 2, -4])
def test_bad_queue_size(size):
    g = GuardedMemory([(0, 0x100000)])
    with pytest.raises(VirtqueueError, match=r"queue size -?\d+ is not a power of 2 up to 32768"):
        SplitQueue(g.mem, size, 0, 0x10000, 0x20000)


@pytest.mark.parametrize(
    "desc, avail, used",
    [(8, 0x1000, 0x2000), (0, 0x1001, 0x2000), (0, 0x1000, 0x2002)],  # misaligned
)
def test_misaligned_rings(desc, avail, used):
    g = GuardedMemory([(0, 0x10000)])
    with pytest.raises(VirtqueueError, match="misaligned virtqueue part"):
        SplitQueue(g.mem, 8, desc, avail, used)


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_rings_outside_memory(part):
    g = GuardedMemory([(0, 0x1000)])
    lay = layout(0, 8)
    addrs = {"desc": lay.desc, "avail": lay.avail, "used": lay.used}
    addrs[part] = 0x1000 - 16  # the part runs off the end of the only region
    with pytest.raises(VirtqueueError, match="virtqueue outside shared memory"):
        SplitQueue(g.mem, 8, addrs["desc"], addrs["avail"], addrs["used"])


# -- notifications ------------------------------------------------------------------------------
def test_should_notify_without_event_idx():
    _, drv, q = setup()
    q.push(0, 0)
    assert q.should_notify()
    assert not q.should_notify()  # nothing new
    drv.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT
    q.push(1, 0)
    assert not q.should_notify()
    drv.avail_flags = 0
    q.push(2, 0)
    assert q.should_notify()


def test_should_notify_with_event_idx():
    _, drv, q = setup(event_idx=True)
    q.push(0, 0)
    assert q.should_notify()  # first time: always
    drv.used_event = 3  # "interrupt me once the used index passes 3"
    q.push(0, 0)
    assert not q.should_notify()  # used idx 2
    q.push(0, 0)
    assert not q.should_notify()  # 3
    q.push(0, 0)
    assert q.should_notify()  # 4: stepped past 3
    assert not q.should_notify()  # nothing new
    drv.used_event = 5
    for _ in range(3):
        q.push(0, 0)
    assert q.should_notify()  # 4 -> 7 crossed 5 in one batch
    drv.used_event = 2  # an event index already left behind
    q.push(0, 0)
    assert not q.should_notify()
    drv.used_event = 8
    drv.avail_flags = VIRTQ_AVAIL_F_NO_INTERRUPT  # ignored with EVENT_IDX (2.7.7.2)
    q.push(0, 0)
    assert q.should_notify()


def test_should_notify_event_idx_wraps():
    _, drv, q = setup(event_idx=True, start_idx=0xFFFD)
    q.push(0, 0)  # 0xFFFE
    assert q.should_notify()
    drv.used_event = 0xFFFF
    q.push(0, 0)  # 0xFFFF
    assert not q.should_notify()
    q.push(0, 0)  # 0x0000: stepped past 0xFFFF
    assert q.should_notify()
    drv.used_event = 0xFFFE  # far behind: the driver missed its chance
    q.push(0, 0)
    assert not q.should_notify()


def test_kick_suppression_without_event_idx():
    _, drv, q = setup()
    q.disable_kicks()
    assert drv.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_kicks() is False
    assert drv.used_flags == 0
    q.disable_kicks()
    drv.add([(DATA, 1, True)])
    assert q.enable_kicks() is True  # arrived while kicks were off: drain again
    assert drv.used_flags == 0


def test_kick_suppression_with_event_idx():
    _, drv, q = setup(event_idx=True)
    q.disable_kicks()
    assert drv.used_flags == 0  # EVENT_IDX: the flag is not used (2.7.10)
    drv.add([(DATA, 1, True)])
    drv.add([(DATA, 1, True)])
    q.pop()
    q.pop()
    assert q.enable_kicks() is False
    assert drv.avail_event == 2  # "kick me when you make entry 2 available"
    drv.add([(DATA, 1, True)])
    assert q.enable_kicks() is True


class Echo(VirtioDevice):
    """A toy device: writes its queue index, and lets a test act as the driver mid-drain."""

    device_id = 0xFFFF

    def __init__(self, on_handle=None):
        super().__init__()
        self.on_handle = on_handle
        self.seen: list[int] = []

    def device_features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    def handle(self, queue_index: int, chain: Chain) -> int:
        self.seen.append(chain.head)
        if self.on_handle:
            self.on_handle()
        return chain.write(0, bytes([queue_index]))


@pytest.mark.parametrize("event_idx", [False, True])
def test_drain_serves_what_arrives_while_draining(event_idx):
    _, drv, q = setup(event_idx=event_idx)
    added = []

    def add_one_more():
        if len(added) < 3:
            added.append(drv.add([(DATA + len(added), 1, True)]))

    dev = Echo(add_one_more)
    first = drv.add([(DATA + 0x100, 1, True)])
    dev.drain(0, q)
    assert dev.seen == [first, *added]
    assert [h for h, _ in drv.used()] == [first, *added]
    assert not q.has_available()
    assert drv.used_flags == 0  # kicks re-enabled on the way out


# -- property tests: random rings --------------------------------------------------------------
QSIZES = st.sampled_from([1, 2, 4, 8, 16])
# Region 2 holds two indirect tables and a few valid-looking buffers.
TABLES = (R2, R2 + 0x200)
EDGES = [R0, DATA, R1 - 1, R1 - 8, R1, R1 + 0xFFFF, R1 + 0x10000, R2, R2 + 0xFF0, R2 + 0x1000, 0x20000]
addresses = st.one_of(
    st.integers(DATA, R1 + 0x10000 - 1),  # mostly somewhere sensible ...
    st.integers(R2, R2 + 0xFFF),
    st.sampled_from(EDGES + list(TABLES)),  # ... or right at an edge ...
    st.integers(0, R2 + 0x1100),
    st.integers(0, 2**64 - 1),  # ... or anywhere at all
)
lengths = st.one_of(
    st.integers(0, 0x200),
    st.sampled_from([0, 1, 15, 16, 17, 32, 64, 512, 0x1000, 0x10000, 0x10001, 0x20000, 2**31, 2**32 - 1]),
    st.integers(0, 0x11000),
)
flag_values = st.one_of(
    st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | WRITE]),
    st.integers(0, 7),
    st.integers(0, 0xFFFF),
)


def descriptors(n_next: int):
    nexts = st.one_of(st.integers(0, n_next - 1), st.integers(0, n_next), st.integers(0, 0xFFFF))
    return st.tuples(addresses, lengths, flag_values, nexts)


buffers = st.tuples(
    st.one_of(
        *[st.integers(DATA, R1 + 0x10000 - 0x200)] * 4,
        st.integers(R2 + 0x400, R2 + 0xE00),
        st.integers(R1 - 0x100, R1),  # straddles regions 0 and 1
        st.sampled_from(EDGES),
    ),
    st.integers(0, 0x200),
    st.booleans(),
)


@st.composite
def structured_ring(draw):
    """A ring a driver could have written (direct and indirect chains), then a few hostile edits."""
    size = draw(QSIZES)
    indirect = draw(st.booleans())
    table = [(0, 0, 0, 0)] * size
    indirect_tables: list[list[tuple[int, int, int, int]]] = [[] for _ in TABLES]
    free, heads = list(range(size)), []
    for _ in range(draw(st.integers(1, size) | st.integers(1, size) | st.integers(0, size))):
        bufs = sorted(draw(st.lists(buffers, min_size=1, max_size=4)), key=lambda b: b[2])
        unused = [k for k, t in enumerate(indirect_tables) if not t]
        if unused and free and (indirect or draw(st.integers(0, 9)) == 0) and draw(st.booleans()):
            indirect_tables[unused[0]] = indirect_entries(bufs)
            head = free.pop(0)
            table[head] = (TABLES[unused[0]], 16 * len(bufs), INDIRECT, 0)
        elif len(bufs) <= len(free):
            ids = [free.pop(0) for _ in bufs]
            for k, (i, (addr, length, flags, _)) in enumerate(zip(ids, indirect_entries(bufs), strict=True)):
                table[i] = (addr, length, flags, ids[k + 1] if k + 1 < len(ids) else 0)
            head = ids[0]
        else:
            break
        heads.append(head)
    # hostile edits: a field of a ring or indirect descriptor, a head, the available index
    fields = (addresses, lengths, flag_values, st.integers(0, size) | st.integers(0, 0xFFFF))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        where = draw(st.integers(-len(TABLES), size - 1))
        f = draw(st.integers(0, 3))
        value = draw(fields[f])
        if where >= 0:
            d = list(table[where])
            d[f] = value
            table[where] = tuple(d)
        elif indirect_tables[where]:
            k = draw(st.integers(0, len(indirect_tables[where]) - 1))
            d = list(indirect_tables[where][k])
            d[f] = value
            indirect_tables[where][k] = tuple(d)
    if draw(st.integers(0, 9)) == 0:
        table = draw(st.lists(descriptors(size), min_size=size, max_size=size))  # entirely random
    n_avail = len(heads)
    if draw(st.integers(0, 9)) == 0:
        n_avail = draw(st.integers(0, size) | st.integers(0, 0xFFFF))
    heads += draw(st.lists(st.integers(0, 0xFFFF), min_size=size - len(heads), max_size=size - len(heads)))
    if draw(st.integers(0, 9)) == 0:
        heads[draw(st.integers(0, size - 1))] = draw(st.integers(0, 0xFFFF))
    start = draw(st.sampled_from([0, 1, 0xFFFF - 2, 0x7FFF]) | st.integers(0, 0xFFFF))
    payload = draw(st.binary(min_size=64, max_size=64))
    return indirect, (size, table, indirect_tables, start, n_avail, heads, payload)


def _install(g: GuardedMemory, size, table, indirect_tables, start, n_avail, heads, payload) -> Driver:
    drv = Driver(g.mem, size, R0, start_idx=start)
    for i, d in enumerate(table):
        drv.set_desc(i, *d)
    for addr, descs in zip(TABLES, indirect_tables, strict=True):
        write_table(g.mem, addr, descs)
    for i, h in enumerate(heads):
        drv._put16(drv.layout.avail + 4 + 2 * ((start + i) % size), h)
    drv.set_avail_idx(start + n_avail)
    g.write(DATA, payload)
    g.write(R1 - 32, payload)
    return drv


def _exercise(g: GuardedMemory, q: SplitQueue, drv: Driver, fill: bytes = b"\xc3") -> list[Chain]:
    """Pop until empty or VirtqueueError; write every writable byte; push. Checks invariants."""
    chains = []
    try:
        for _ in range(q.size + 2):
            chain = q.pop()
            if chain is None:
                break
            for v in chain.readable + chain.writable:
                assert g.inside(v), "a view escapes the shared regions"
            assert chain.readable_len + chain.writable_len <= MAX_CHAIN_BYTES
            n = chain.write(0, fill * min(chain.writable_len, 0x30000))
            q.push(chain.head, n)
            chains.append(chain)
        q.should_notify()
        q.disable_kicks()
        q.enable_kicks()
    except VirtqueueError:
        event("VirtqueueError")
    event(f"chains served: {min(len(chains), 3)}{'+' if len(chains) > 3 else ''}")
    assert g.guards_intact(), "bytes outside the shared regions changed"
    return chains


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=structured_ring(), event_idx=st.booleans())
def test_random_structured_rings(ring, event_idx):
    indirect, ring = ring
    g = GuardedMemory(SPECS)
    drv = _install(g, *ring)
    q = drv.queue(last_avail_idx=ring[3], event_idx=event_idx, indirect=indirect)
    _exercise(g, q, drv)


@st.composite
def raw_ring(draw):
    """Random bytes for the whole ring and the indirect tables; optionally tamed a little."""
    size = draw(QSIZES)
    lay = layout(R0, size)
    ring = bytearray(draw(st.binary(min_size=lay.end - lay.desc, max_size=lay.end - lay.desc)))
    start = draw(st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        # addresses near shared memory, indices in range, a sane available index
        for i in range(size):
            addr, length, flags, nxt = DESC.unpack_from(ring, 16 * i)
            DESC.pack_into(ring, 16 * i, addr & 0x3FFFF, length & 0x3FF, flags & 7, nxt % size)
        avail = lay.avail - lay.desc
        for i in range(size):
            ring[avail + 4 + 2 * i] %= size
            ring[avail + 5 + 2 * i] = 0
        ring[avail + 2 : avail + 4] = ((start + draw(st.integers(0, size))) & 0xFFFF).to_bytes(2, "little")
    tables = draw(st.binary(min_size=0x400, max_size=0x400))
    return size, bytes(ring), tables, start


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=raw_ring(), event_idx=st.booleans(), indirect=st.booleans())
def test_random_raw_rings(ring, event_idx, indirect):
    size, raw, tables, start = ring
    g = GuardedMemory(SPECS)
    drv = Driver(g.mem, size, R0)
    g.write(drv.layout.desc, raw)
    g.write(R2, tables)
    q = drv.queue(last_avail_idx=start, event_idx=event_idx, indirect=indirect)
    _exercise(g, q, drv)


def test_take_writable_takes_simple_receive_buffers_until_they_hold_enough():
    g, drv, q = setup(8)
    heads = [drv.add([(DATA + 0x100 * i, 0x80, True)]) for i in range(4)]
    assert q.take_writable(0x80 * 4 + 1) is None and q.last_avail_idx == 0  # too few: none taken
    assert q.take_writable(0x100, min_len=0x81) is None and q.last_avail_idx == 0
    taken = q.take_writable(0x101)
    assert taken is not None and [h for h, _ in taken] == heads[:3]
    assert all(len(v) == 0x80 and g.inside(v) for _, v in taken)
    assert q.pop().head == heads[3]  # the rest is where it was
    drv.add([(DATA, 8, False), (DATA + 8, 8, True)])  # not a one-descriptor receive buffer
    assert q.take_writable(1) is None
    assert q.pop() is not None


@st.composite
def receive_ring(draw):
    """Receive buffers as a driver posts them, with hostile ones mixed in now and then."""
    size = draw(QSIZES)
    descs = []
    for i in range(size):
        kind = draw(st.sampled_from(["buffer"] * 12 + ["readable", "chained", "indirect", "outside", "straddling"]))
        addr, length = DATA + 0x400 * (i % 8), draw(st.integers(0, 0x400))
        descs.append({
            "buffer": (addr, length, VIRTQ_DESC_F_WRITE, 0),
            "readable": (addr, length, 0, 0),
            "chained": (addr, length, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, (i + 1) % size),
            "indirect": (R2, 16, VIRTQ_DESC_F_INDIRECT, 0),
            "outside": (draw(st.integers(0x50000, 2**64 - 1)), length, VIRTQ_DESC_F_WRITE, 0),
            "straddling": (R1 - 8, 16, VIRTQ_DESC_F_WRITE, 0),
        }[kind])
    heads = draw(st.lists(st.integers(0, size - 1), min_size=size, max_size=size))
    if draw(st.integers(0, 9)) == 0:
        heads[draw(st.integers(0, size - 1))] = draw(st.integers(size, 0xFFFF))
    return size, descs, heads, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, size))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=receive_ring(), need=st.integers(0, 0x800), min_len=st.sampled_from([0, 10, 12, 0x100]))
def test_take_writable_on_random_rings_is_pop_without_chains(ring, need, min_len):
    """What `take_writable` returns is exactly what `pop` would, for the buffers it may take;
    when it declines, nothing moved."""
    size, descs, heads, start, n_avail = ring
    g = GuardedMemory(SPECS)
    drv = Driver(g.mem, size, R0, start_idx=start)
    for i, d in enumerate(descs):
        drv.set_desc(i, *d)
    for i, h in enumerate(heads):
        drv._put16(drv.layout.avail + 4 + 2 * ((start + i) % size), h)
    drv.set_avail_idx(start + n_avail)
    q = drv.queue(last_avail_idx=start, indirect=True)
    twin = drv.queue(last_avail_idx=start, indirect=True)
    try:
        taken = q.take_writable(need, min_len=min_len)
    except VirtqueueError:
        event("VirtqueueError")
        return
    if taken is None:
        event("declined")
        assert q.last_avail_idx == start
        return
    event(f"took {min(len(taken), 3)}{'+' if len(taken) > 3 else ''}")
    assert sum(len(v) for _, v in taken) >= need
    for head, view in taken:
        chain = twin.pop()
        assert chain is not None and chain.head == head and not chain.readable
        assert len(chain.writable) == 1 and len(view) == len(chain.writable[0]) >= min_len
        assert g.inside(view)
        view[:] = b"\xc3" * len(view)
    assert q.last_avail_idx == twin.last_avail_idx
    assert g.guards_intact()
