"""Dirty-page logging (vhost-user "Migration"): the bitmap, its atomic marking, and what each
device's queues mark. The property: with logging on, every byte of guest memory a device changed
lies in a page marked in the log, for every device kind, whatever the guest asks."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimvisor.devices.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlockDevice,
)
from slimvisor.devices.console import CONTROL_RECEIVEQ, receiveq, transmitq
from slimvisor.devices.net import RECEIVEQ, TRANSMITQ
from slimvisor.devices.rng import RngDevice
from slimvisor.devices.vsock_muxer import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RW,
)
from slimvisor.memory import VHOST_LOG_PAGE, GuestMemory, GuestMemoryError, dirty_words, log_bytes_for
from slimvisor.vhostuser.dirtylog import SharedDirtyLog
from slimvisor.virtio.queue import SplitQueue
from tests import test_console_device as console_t
from tests import test_net_device as net_t
from tests import test_rng_balloon as rng_t
from tests import test_vsock as vsock_t
from tests.vring import Driver, FakeTransport, GuardedMemory

PAGE = VHOST_LOG_PAGE


def memfd(size: int) -> int:
    fd = os.memfd_create("slimvisor-test-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


@contextmanager
def shared_log(size: int, offset: int = 0) -> Iterator[SharedDirtyLog]:
    fd = memfd(offset + size)
    log = SharedDirtyLog(fd, size, offset)
    os.close(fd)
    try:
        yield log
    finally:
        log.close()


def marked_pages(log: SharedDirtyLog) -> set[int]:
    raw = log.read()
    return {i * 8 + b for i, byte in enumerate(raw) if byte for b in range(8) if byte >> b & 1}


# -- the bitmap ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("addr", "length", "words"),
    [
        (0, 1, [(0, 1)]),
        (PAGE - 1, 2, [(0, 0b11)]),  # one byte either side of a page boundary
        (5 * PAGE, PAGE, [(0, 1 << 5)]),
        (63 * PAGE, PAGE + 1, [(0, 1 << 63), (1, 1)]),  # across a word
        (64 * PAGE, 1 << 20, [(w, (1 << 64) - 1) for w in (1, 2, 3, 4)]),  # 1 MiB: four whole words
        (64 * PAGE + 1, 1 << 20, [(w, (1 << 64) - 1) for w in (1, 2, 3, 4)] + [(5, 1)]),
        (0, 0, []),
    ],
)
def test_dirty_words(addr, length, words):
    assert dirty_words(addr, length) == words


@given(addr=st.integers(0, 1 << 40), length=st.integers(1, 1 << 24))
def test_dirty_words_cover_exactly_the_pages_written(addr, length):
    pages = {w * 64 + b for w, bits in dirty_words(addr, length) for b in range(64) if bits >> b & 1}
    assert pages == set(range(addr // PAGE, (addr + length - 1) // PAGE + 1))


def test_log_bytes_for():
    ends = (0, 1, 64 * PAGE, 64 * PAGE + 1, 1 << 30)
    assert [log_bytes_for(n) for n in ends] == [0, 8, 8, 16, (1 << 30) // PAGE // 8]


def test_shared_log_marks_little_endian_words_at_its_offset_and_refuses_beyond_it():
    fd = memfd(3 * PAGE)
    os.write(fd, b"\xff" * PAGE)  # what lies before the log's offset is never touched
    log = SharedDirtyLog(fd, 16, PAGE)
    try:
        log.mark(0, 1)
        log.mark(9 * PAGE + 5, 1)  # page 9: byte 1, bit 1
        log.mark(70 * PAGE, 3 * PAGE)  # pages 70..72: byte 8, bits 6 and 7, byte 9 bit 0
        assert log.read() == bytes([1, 2, 0, 0, 0, 0, 0, 0, 0xC0, 1, 0, 0, 0, 0, 0, 0])
        assert os.pread(fd, 17, PAGE - 1) == b"\xff" + log.read()
        assert marked_pages(log) == {0, 9, 70, 71, 72}
        with pytest.raises(GuestMemoryError, match=r"range 0x7ffff\+0x2 is beyond the dirty log \(it covers 0x80000"):
            log.mark(128 * PAGE - 1, 2)
    finally:
        log.close()
        os.close(fd)
    with pytest.raises(GuestMemoryError, match="beyond the dirty log"):
        log.mark(0, 1)  # a closed log writes nowhere


@pytest.mark.parametrize(
    ("size", "offset", "why"),
    [
        (0, 0, "bad dirty log size=0x0"),
        (12, 0, "bad dirty log size=0xc"),
        (16, 4, "bad dirty log size=0x10 offset=0x4"),
        (2 * PAGE, PAGE, r"dirty log 0x1000\+0x2000 is beyond the end of its file \(0x2000\)"),
        (8, 1 << 62, "is beyond the end of its file"),
    ],
)
def test_shared_log_refuses_bad_sizes_and_offsets(size, offset, why):
    fd = memfd(2 * PAGE)
    try:
        with pytest.raises(GuestMemoryError, match=why):
            SharedDirtyLog(fd, size, offset)
    finally:
        os.close(fd)


# The front-end's side, in another process: read-and-clear every word with an atomic exchange,
# as QEMU's vhost_sync_dirty_bitmap does, and OR what it took into its own copy.
FRONT_END = r"""
import ctypes, mmap, os, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, size)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
xchg = ctypes.CDLL("libatomic.so.1").__atomic_exchange_8
xchg.argtypes, xchg.restype = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int), ctypes.c_uint64
seen = [0] * (size // 8)
print("ready", flush=True)
while True:
    for w in range(size // 8):
        seen[w] |= xchg(base + 8 * w, 0, 5)
    if os.path.exists(sys.argv[3]):
        break
for w in range(size // 8):
    seen[w] |= xchg(base + 8 * w, 0, 5)
print(" ".join(str(s) for s in seen), flush=True)
"""
# Another backend of the same guest (the switch, a qemu-storage-daemon): marks the odd pages of
# each round's words when told to go.
OTHER_BACKEND = r"""
import sys
from slimvisor.vhostuser.dirtylog import SharedDirtyLog
log = SharedDirtyLog(int(sys.argv[1]), int(sys.argv[2]), 0)
print("ready", flush=True)
for line in sys.stdin:
    first = int(line)
    for page in range(first + 1, first + ROUND_PAGES, 2):
        log.mark(page * 4096, 1)
    print("done", flush=True)
"""
ROUND_WORDS = 64  # the words both backends mark at once, each bit once, in one round


def test_marks_are_never_lost_to_other_writers_and_a_front_end_clearing_the_log(tmp_path):
    """Two backends mark interleaved pages of the same words, once each, while the front-end
    exchanges words for zeros: every bit must end up taken by the front-end or still in the log.
    A read-modify-write would lose the other backend's bits when both write one word at once."""
    rounds = 200
    size = rounds * ROUND_WORDS * 8
    fd = memfd(size)
    done = tmp_path / "done"
    code = OTHER_BACKEND.replace("ROUND_PAGES", str(ROUND_WORDS * 64))
    front = subprocess.Popen(
        [sys.executable, "-c", FRONT_END, str(fd), str(size), str(done)],
        pass_fds=[fd], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(fd), str(size)],
        pass_fds=[fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert front.stdout is not None and other.stdout is not None and other.stdin is not None
    log = SharedDirtyLog(fd, size, 0)
    try:
        assert front.stdout.readline() == "ready\n" and other.stdout.readline() == "ready\n"
        for r in range(rounds):  # both start each round together, on the same 64 words
            first = r * ROUND_WORDS * 64
            other.stdin.write(f"{first}\n")
            other.stdin.flush()
            for page in range(first, first + ROUND_WORDS * 64, 2):
                log.mark(page * PAGE, 1)
            assert other.stdout.readline() == "done\n"
        other.stdin.close()
        left = log.read()
        done.touch()
        seen = [int(s) for s in front.stdout.readline().split()]
        assert front.wait(10) == 0 and other.wait(10) == 0
    finally:
        log.close()
        os.close(fd)
        for p in (front, other):
            if p.poll() is None:
                p.kill()
                p.wait()
    taken = b"".join(struct.pack("<Q", s) for s in seen)
    lost = sum(8 - bin(a | b).count("1") for a, b in zip(taken, left, strict=True))
    assert lost == 0, f"{lost} marks lost"
    assert any(taken), "the front-end took nothing while we marked: the test raced nothing"


def test_marking_cost():
    """Measured, and bounded loosely: a marked chain must stay cheap beside the copy it marks."""
    with shared_log(log_bytes_for(1 << 30)) as log:
        n = 20000
        t0 = time.perf_counter()
        for i in range(n):
            log.mark((i * 64) % (1 << 29), 64)
        small = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for i in range(n):
            log.mark((i << 20) % (1 << 29), 1 << 20)
        big = (time.perf_counter() - t0) / n
    print(f"mark 64 B: {small * 1e6:.2f} us, mark 1 MiB: {big * 1e6:.2f} us")
    assert small < 20e-6 and big < 50e-6


# -- the queue: what it marks, and where -----------------------------------------------------------
class Recorder:
    """A DirtyLog that records the ranges it is told."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def mark(self, addr: int, length: int) -> None:
        self.ranges.append((addr, length))


def recorded_queue(size: int, event_idx: bool = False, used_log: bool = False) -> tuple[Driver, SplitQueue, Recorder]:
    """A driver and a queue of `size` over 64 KiB of guarded memory, the queue logging into a Recorder
    (its used ring too, at the ring's own address, with `used_log`)."""
    drv = Driver(GuardedMemory([(0, 0x10000)]).mem, size, 0)
    q = drv.queue(event_idx=event_idx)
    rec = Recorder()
    q.log_writes(rec, drv.layout.used if used_log else None)
    return drv, q, rec


def test_queue_marks_written_bytes_then_the_used_ring_at_its_log_address_across_the_wrap():
    g = GuardedMemory([(0, 0x10000)])
    drv = Driver(g.mem, 4, 0, start_idx=0xFFFE)
    q = drv.queue(last_avail_idx=0xFFFE)
    rec, ring_log = Recorder(), 0x5000_0000  # the spec lets log_guest_addr lie outside memory
    q.log_writes(rec, ring_log)
    chains_in = [[(0x1000, 100, True), (0x3000, 50, True)], [(0x4000, 8, True)], [(0x5000, 9, True)]]
    heads = [drv.add(bufs) for bufs in chains_in]
    chains = [q.pop() for _ in heads]
    assert [c.head for c in chains if c is not None] == heads
    q.push_many([(heads[0], 120), (heads[1], 8), (heads[2], 0)])
    assert rec.ranges == [
        (0x1000, 100), (0x3000, 20),  # the first 120 bytes of the writable part, nothing beyond
        (0x4000, 8),  # the third chain wrote nothing: no mark
        (ring_log + 4 + 8 * 2, 16), (ring_log + 4, 8),  # elements 0xFFFE, 0xFFFF, then 0x0000: wrapped
        (ring_log, 4),  # flags and idx
    ]  # fmt: skip
    assert drv.used() == [(heads[0], 120), (heads[1], 8), (heads[2], 0)]


def test_queue_marks_how_far_a_chain_was_written_when_the_device_reports_less():
    """virtio-blk reports 1 byte written after a failed read, its status at the end of the buffer."""
    drv, q, rec = recorded_queue(4)
    head = drv.add([(0x1000, 16, False), (0x2000, 0x2000, True), (0x6000, 1, True)])
    chain = q.pop()
    assert chain is not None
    chain.write(0x2000, b"\x01")
    q.push(head, 1)
    assert rec.ranges == [(0x2000, 0x2000), (0x6000, 1)]  # no used ring: VHOST_VRING_F_LOG is off


@pytest.mark.parametrize("event_idx", [False, True])
def test_queue_marks_what_kick_suppression_stores_in_the_used_ring(event_idx):
    drv, q, rec = recorded_queue(8, event_idx, used_log=True)
    q.disable_kicks()
    q.enable_kicks()
    where = (drv.layout.used + 4 + 8 * 8, 2) if event_idx else (drv.layout.used, 2)  # avail_event, or flags
    assert rec.ranges == ([] if event_idx else [where]) + [where]


def test_queue_without_a_log_keeps_nothing():
    drv, q, rec = recorded_queue(4)
    q.log_writes(None)
    drv.add([(0x1000, 10, True)])
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 10)
    taken = None
    drv.add([(0x2000, 10, True)])
    taken = q.take_writable(10)
    assert taken is not None
    q.push(taken[0][0], 10)
    assert rec.ranges == [] and q._writable_at == {}


def test_take_writable_marks_each_buffer():
    drv, q, rec = recorded_queue(4)
    a, b = drv.add([(0x1000, 100, True)]), drv.add([(0x8000, 100, True)])
    taken = q.take_writable(150)
    assert [h for h, _ in (taken or [])] == [a, b]
    q.push_many([(a, 100), (b, 50)])
    assert rec.ranges == [(0x1000, 100), (0x8000, 50)]


# -- every device kind: changed bytes lie in marked pages -----------------------------------------
class Logged:
    """A guest whose queues log into a real shared log. The driver writes guest memory too
    (descriptors, rings, buffers it fills), so what the device changed is taken around each of
    its calls (`device`); those bytes must lie in pages marked by then."""

    def __init__(self, mem: GuestMemory, rings: list[tuple[SplitQueue, Driver]]) -> None:
        self.mem, self.rings = mem, rings
        size = log_bytes_for(max(r.guest_addr + r.size for r in mem.regions))
        self.fd = memfd(size)
        self.log = SharedDirtyLog(self.fd, size, 0)
        for q, d in rings:
            q.log_writes(self.log, d.layout.used)  # log_guest_addr: the used ring's, as QEMU's
        self.calls = self.changed = 0

    def device(self, call: Callable[[], object]) -> None:
        """Run one device action; every page it changed must be marked when it returns."""
        before = [bytes(r.data) for r in self.mem.regions]
        used = [d.used_idx for _, d in self.rings]
        call()
        marked, bad = marked_pages(self.log), []
        for r, old in zip(self.mem.regions, before, strict=True):
            new, start, end = bytes(r.data), r.guest_addr, r.guest_addr + r.size
            if new == old:
                continue
            for page in range(start // PAGE, (end - 1) // PAGE + 1):
                lo, hi = max(page * PAGE, start) - start, min((page + 1) * PAGE, end) - start
                if new[lo:hi] != old[lo:hi]:
                    self.changed += 1
                    if page not in marked:
                        bad.append(page * PAGE)
        assert bad == [], "pages the device wrote and did not mark"
        for (_, d), idx in zip(self.rings, used, strict=True):
            if d.used_idx != idx:
                assert (d.layout.used + 2) // PAGE in marked  # the used index's page
        self.calls += 1

    def close(self) -> None:
        for q, _ in self.rings:
            q.log_writes(None)
        self.log.close()
        os.close(self.fd)


@contextmanager
def logged(mem: GuestMemory, rings: list[tuple[SplitQueue, Driver]]) -> Iterator[Logged]:
    lg = Logged(mem, rings)
    try:
        yield lg
    finally:
        lg.close()


bufsplit = st.lists(st.integers(1, 3000), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(st.tuples(bufsplit, st.integers(0, 0x8000)), min_size=1, max_size=12), event_idx=st.booleans())
def test_rng_writes_are_marked(chains, event_idx):
    dev = RngDevice()
    g, (drv,), t = rng_t.rig(dev, 1, event_idx=event_idx, indirect=True)
    q = t.queues[0]
    with logged(g.mem, [(q, drv)]) as lg:
        for sizes, at in chains:
            addr = rng_t.R1 + at
            bufs = []
            for n in sizes:
                bufs.append((addr, n, True))
                addr += n
            if addr > rng_t.R1 + 0x10000 or len(drv.free) < len(bufs):
                continue
            drv.add(bufs)
            lg.device(lambda: dev.drain(0, q))
            drv.used()
    assert t.failed is None


blk_request = st.tuples(
    st.sampled_from([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_FLUSH, 99]),
    st.integers(0, 70),  # past the 64-sector disk too: an error writes the status byte only
    st.integers(0, 9),
    st.integers(0, 0x6000),
    st.integers(1, 3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(blk_request, min_size=1, max_size=10), event_idx=st.booleans())
def test_blk_writes_are_marked(requests, event_idx):
    with tempfile.NamedTemporaryFile() as image:
        image.write(bytes(range(256)) * (64 * SECTOR_SIZE // 256))
        image.flush()
        dev = BlockDevice(image.name)
        g = GuardedMemory([(0, 0x4000), (0x4000, 0x10000)])
        drv = Driver(g.mem, 16, 0)
        q = drv.queue(event_idx=event_idx, indirect=True)
        t = FakeTransport({0: q}, host_fds=False)
        dev.attach(t)
        dev.ack_features(dev.features())
        try:
            with logged(g.mem, [(q, drv)]) as lg:
                for rtype, sector, nsec, at, pieces in requests:
                    data = 0x4000 + at
                    g.write(0x1000, struct.pack("<IIQ", rtype, 0, sector))
                    n = max(nsec * SECTOR_SIZE, 20 if rtype == VIRTIO_BLK_T_GET_ID else 0)
                    step = -(-n // pieces) if n else 1
                    writable = rtype != VIRTIO_BLK_T_OUT
                    bufs = [(0x1000, 16, False)] + [(data + o, min(step, n - o), writable) for o in range(0, n, step)]
                    bufs.append((data + n + 7, 1, True))  # the status byte, a page away at times
                    drv.add(bufs)
                    lg.device(lambda: dev.drain(0, q))
                    drv.used()
        finally:
            dev.close()
    assert t.failed is None


net_step = st.one_of(
    st.tuples(st.just("post"), st.integers(60, 5000), st.integers(1, 3)),
    st.tuples(st.just("deliver"), st.integers(net_t.ETH_HLEN, 9000)),
    st.tuples(st.just("send"), st.integers(net_t.ETH_HLEN, 2000)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(net_step, min_size=1, max_size=15), mergeable=st.booleans(), event_idx=st.booleans())
def test_net_writes_are_marked(steps, mergeable, event_idx):
    rig = net_t.Rig(net_t.ALL if mergeable else net_t.NO_MRG, event_idx=event_idx)
    rings = [(rig.t.queues[RECEIVEQ], rig.rxd), (rig.t.queues[TRANSMITQ], rig.txd)]
    with logged(rig.g.mem, rings) as lg:
        for kind, *args in steps:
            if kind == "post" and len(rig.rxd.free) >= args[1]:
                rig.post(args[0], pieces=args[1])
                lg.device(rig.kick_rx)
            elif kind == "deliver":
                lg.device(lambda n=args[0]: rig.dev.deliver(net_t.HDR, net_t.eth(n)))
            elif kind == "send" and rig.txd.free:
                rig.send(net_t.HDR, net_t.eth(args[0]))
                lg.device(rig.kick_tx)
                rig.txd.used()
        rig.received()
    assert rig.t.failed is None


PORTS = len(console_t.PORTS)
console_step = st.one_of(
    st.tuples(st.just("give"), st.integers(0, PORTS - 1), st.integers(1, 300)),
    st.tuples(st.just("write"), st.integers(0, PORTS - 1), st.binary(min_size=1, max_size=500)),
    st.tuples(st.just("send"), st.integers(0, PORTS - 1), st.binary(min_size=1, max_size=100)),
    st.tuples(st.just("open"), st.integers(0, PORTS - 1), st.booleans()),
    st.tuples(st.just("control"), st.integers(0, PORTS - 1), st.integers(1, 200)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(console_step, min_size=1, max_size=15))
def test_console_writes_are_marked(steps):
    guest = console_t.Guest(event_idx=True, indirect=True)
    guest.handshake()
    rings = [(guest.t.queues[i], d) for i, d in enumerate(guest.drivers)]

    def give(q: int, size: int) -> None:
        if len(guest.drivers[q].free) > 1 and guest.next + size < console_t.MEM:
            addr = guest.alloc(size)
            guest.addr[q, guest.drivers[q].add([(addr, size, True)])] = addr
            lg.device(lambda: guest.kick(q))

    with logged(guest.g.mem, rings) as lg:
        for kind, port, arg in steps:
            q_tx = transmitq(port)
            if kind == "give":
                give(receiveq(port), arg)
            elif kind == "control":
                give(CONTROL_RECEIVEQ, arg)
            elif kind == "write":
                lg.device(lambda p=port, data=arg: guest.dev.port_write(p, data))
            elif kind == "open":
                lg.device(lambda p=port, on=arg: guest.dev.set_host_open(p, on))
            elif len(guest.drivers[q_tx].free) > 1 and guest.next + len(arg) < console_t.MEM:
                addr = guest.alloc(len(arg))
                guest.g.write(addr, arg)
                guest.drivers[q_tx].add([(addr, len(arg), False)])
                lg.device(lambda q=q_tx: guest.kick(q))
                guest.drivers[q_tx].used()
            for q in (receiveq(port), CONTROL_RECEIVEQ):
                for head, _ in guest.drivers[q].used():
                    guest.addr.pop((q, head))
    assert guest.t.failed is None


vsock_step = st.one_of(
    st.tuples(st.just("connect"), st.integers(1, 3000)),  # no host listener: answered with RST
    st.tuples(st.just("credit"), st.integers(1, 3000)),
    st.tuples(st.just("data"), st.integers(1, 3000), st.binary(max_size=300)),
    st.tuples(st.just("loop")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(vsock_step, min_size=1, max_size=12))
def test_vsock_writes_are_marked(steps):
    with tempfile.TemporaryDirectory() as tmp:
        rig = vsock_t.Rig(os.path.join(tmp, "v.sock"), loop=vsock_t.WriterServer())
        rx, tx = rig.drivers[vsock_t.RX_QUEUE], rig.drivers[vsock_t.TX_QUEUE]

        def send(h: vsock_t.Header, payload: bytes = b"") -> None:
            raw = h.pack() + payload
            addr = vsock_t.TXBUF + tx.free[0] * vsock_t.TX_SLOT
            rig.g.write(addr, raw)
            tx.add([(addr, len(raw), False)])
            lg.device(lambda: rig.kick(vsock_t.TX_QUEUE))
            tx.used()

        try:
            with logged(rig.g.mem, list(zip(rig.queues, rig.drivers, strict=True))) as lg:
                for kind, *args in steps:
                    while rx.free:
                        rx.add([(vsock_t.RXBUF + rx.free[0] * vsock_t.RX_SLOT, vsock_t.RX_SLOT, True)])
                    lg.device(lambda: rig.kick(vsock_t.RX_QUEUE))
                    if kind == "connect":
                        send(vsock_t.hdr(VIRTIO_VSOCK_OP_REQUEST, 1000 + args[0], args[0]))
                    elif kind == "credit":
                        send(vsock_t.hdr(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 1000 + args[0], args[0]))
                    elif kind == "data":
                        send(vsock_t.hdr(VIRTIO_VSOCK_OP_RW, 1000 + args[0], args[0], args[1]), args[1])
                    else:
                        lg.device(lambda: rig.loop.run_once(0.0))
                    rx.used()
                if any(kind != "loop" for kind, *_ in steps):
                    assert lg.changed > 0  # the device answered into receive buffers
            assert rig.broken is None
        finally:
            rig.close()
