"""virtio-net (5.1) driven through real split rings by the test driver, against a fake transport."""

from __future__ import annotations

import itertools
import struct
import time

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from slimvisor.devices.net import (
    ETH_HLEN,
    MAX_FRAME,
    OFFLOAD_FEATURES,
    RECEIVEQ,
    RX_BACKLOG,
    TRANSMITQ,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_S_LINK_UP,
    NetDevice,
    VnetHeader,
    complete_checksum,
)
from slimvisor.network.switch import Switch
from slimvisor.runtime.ratelimit import RateLimiter, TokenBucket
from slimvisor.virtio.device import COMMON_FEATURES
from slimvisor.virtio.queue import VirtqueueError
from slimvisor.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, bit
from tests.vring import Driver, FakeTransport, GuardedMemory, align

# Region 0 holds both rings and some data, region 1 (adjacent in guest space) the bulk of the
# buffers, region 2 stands apart for indirect tables.
R0, R1, R2 = 0x0, 0x10000, 0x80000
SPECS = [(R0, 0x10000), (R1, 0x30000), (R2, 0x1000)]
RX_RING, TX_RING, DATA = 0x0, 0x2000, 0x4000
END = R1 + 0x30000
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("5254000000bb")
HDR = VnetHeader()
ALL = NetDevice(MAC).features()
NO_MRG = ALL & ~bit(VIRTIO_NET_F_MRG_RXBUF)


def eth(length: int, dst: bytes = MAC, src: bytes = PEER, seed: int = 0) -> bytes:
    body = bytes((seed + i * 7) & 0xFF for i in range(max(0, length - ETH_HLEN)))
    return (dst + src + b"\x08\x00" + body)[:length]


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()  # token buckets start counting from the real clock

    def __call__(self) -> float:
        return self.now


class Rig:
    """One guest NIC: a receive and a transmit ring, buffers carved from a bump allocator."""

    def __init__(self, features: int = ALL, size: int = 64, *, event_idx: bool = False, **dev_kw):
        self.g = GuardedMemory(SPECS)
        self.rxd = Driver(self.g.mem, size, RX_RING)
        self.txd = Driver(self.g.mem, size, TX_RING)
        kw = {"indirect": True, "event_idx": event_idx}
        self.t = FakeTransport({RECEIVEQ: self.rxd.queue(**kw), TRANSMITQ: self.txd.queue(**kw)}, host_fds=False)
        self.dev = NetDevice(dev_kw.pop("mac", MAC), **dev_kw)
        self.dev.ack_features(features)
        self.dev.attach(self.t)
        self.sent: list[tuple[VnetHeader, bytes]] = []
        self.dev.on_transmit = lambda h, f: self.sent.append((h, f))
        self.cursor = DATA
        self.table = R2
        self.rx_bufs: dict[int, list[tuple[int, int]]] = {}

    def alloc(self, n: int) -> int:
        if self.cursor + n > END:
            self.cursor = DATA
        addr, self.cursor = self.cursor, align(self.cursor + n, 16)
        return addr

    # transmit
    def send(self, header: VnetHeader | bytes, frame: bytes, *, hsplit=(), fsplit: int = 0, indirect=False) -> int:
        raw = header if isinstance(header, bytes) else header.pack()[: self.dev.hdr_size]
        addr = self.alloc(len(raw) + len(frame))
        self.g.write(addr, raw + frame)
        bufs, at = [], addr
        for n in hsplit:
            bufs.append((at, n, False))
            at += n
        rest = len(raw) + len(frame) - (at - addr)
        step = fsplit or rest
        for off in range(0, rest, max(step, 1)):
            bufs.append((at + off, min(step, rest - off), False))
        if indirect:
            head = self.txd.add_indirect(self.table, bufs)
            self.table += 16 * len(bufs)
            return head
        return self.txd.add(bufs)

    def kick_tx(self) -> None:
        self.dev.drain(TRANSMITQ, self.t.queues[TRANSMITQ])

    # receive
    def post(self, *sizes: int, pieces: int = 1) -> list[int]:
        heads = []
        for size in sizes:
            addr = self.alloc(size)
            self.g.write(addr, b"\xee" * size)
            step = -(-size // pieces)
            bufs = [(addr + o, min(step, size - o), True) for o in range(0, size, step)]
            head = self.rxd.add(bufs)
            self.rx_bufs[head] = [(a, n) for a, n, _ in bufs]
            heads.append(head)
        return heads

    def kick_rx(self) -> None:
        self.dev.drain(RECEIVEQ, self.t.queues[RECEIVEQ])

    def _read(self, head: int, n: int) -> bytes:
        out = b""
        for addr, size in self.rx_bufs.pop(head):
            out += self.g.read(addr, min(size, n - len(out)))
        return out

    def received(self) -> list[tuple[VnetHeader, bytes, list[int]]]:
        """Frames the device wrote: (header, frame, used length of each buffer it took)."""
        size = self.dev.hdr_size
        used, out = self.rxd.used(), []
        while used:
            head, n = used.pop(0)
            data = self._read(head, n)
            header = VnetHeader.unpack(data[:size])
            count = header.num_buffers if self.dev.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) else 1
            lens = [n]
            for head, n in used[: count - 1]:
                data += self._read(head, n)
                lens.append(n)
            del used[: count - 1]
            out.append((header, data[size:], lens))
        assert self.g.guards_intact()
        return out


# -- features and config ------------------------------------------------------------------------
def test_features_and_config():
    dev = NetDevice(MAC)
    assert dev.device_id == VIRTIO_ID_NET == 1 and dev.max_queues == 2
    for f in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4):
        assert dev.features() & bit(f)
    assert dev.features() & COMMON_FEATURES == COMMON_FEATURES
    assert NetDevice(MAC, offloads=False).features() & OFFLOAD_FEATURES == 0
    assert dev.config() == MAC + struct.pack("<HH", VIRTIO_NET_S_LINK_UP, 1)
    with pytest.raises(ValueError, match="a MAC address has 6 bytes, not 2"):
        NetDevice(b"\x52\x54")


def test_link_status_goes_to_the_guest():
    rig = Rig()
    rig.dev.link_up = False
    assert rig.t.config_changes == 1 and rig.dev.config()[6:8] == b"\0\0"
    rig.dev.link_up = False
    assert rig.t.config_changes == 1  # no change, no notice
    rig.post(2048)
    assert not rig.dev.deliver(HDR, eth(60))  # a cable that is out carries nothing
    rig.send(HDR, eth(60))
    rig.kick_tx()
    assert rig.sent == [] and rig.dev.stats()["tx_dropped"] == 1
    rig.dev.link_up = True
    assert rig.t.config_changes == 2 and rig.dev.config()[6] == VIRTIO_NET_S_LINK_UP
    assert rig.dev.deliver(HDR, eth(60))


def test_header_roundtrip():
    h = VnetHeader(1, 4, 54, 1440, 34, 16, 3)
    assert VnetHeader.unpack(h.pack()) == h and len(h.pack()) == 12
    assert VnetHeader.unpack(h.pack()[:10]) == h._replace(num_buffers=0)


# -- transmit -----------------------------------------------------------------------------------
def test_transmit_with_split_header_and_frame():
    rig = Rig()
    frame = eth(1514, dst=b"\xff" * 6)
    head = rig.send(HDR, frame, hsplit=(5, 7), fsplit=100)
    rig.kick_tx()
    assert rig.sent == [(HDR, frame)]
    assert rig.txd.used() == [(head, 0)]
    stats = rig.dev.stats()
    assert (stats["tx_packets"], stats["tx_bytes"], stats["tx_dropped"]) == (1, 1514, 0)
    assert rig.g.guards_intact()


def test_transmit_header_and_frame_in_one_buffer_and_indirect():
    rig = Rig()
    frames = [eth(60, seed=1), eth(1000, seed=2), eth(ETH_HLEN)]
    rig.send(HDR, frames[0])
    rig.send(HDR, frames[1], hsplit=(3,), fsplit=7, indirect=True)
    rig.send(HDR, frames[2], hsplit=(12,))
    rig.kick_tx()
    assert [f for _, f in rig.sent] == frames
    assert [n for _, n in rig.txd.used()] == [0, 0, 0]


def test_transmit_big_gso_frame():
    rig = Rig()
    h = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16, num_buffers=7)
    frame = eth(MAX_FRAME, seed=3)
    rig.send(h, frame, fsplit=4096, indirect=True)
    rig.kick_tx()
    assert rig.sent == [(h._replace(num_buffers=0), frame)]  # num_buffers means nothing on transmit
    assert rig.dev.stats()["tx_bytes"] == MAX_FRAME


GSO4 = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16)


@pytest.mark.parametrize(
    "header, length, features",
    [
        (HDR, 0, ALL),  # a header and no frame
        (HDR, ETH_HLEN - 1, ALL),
        (HDR, MAX_FRAME + 1, ALL),
        (VnetHeader(flags=VIRTIO_NET_HDR_F_DATA_VALID), 60, ALL),  # device-to-driver flag
        (VnetHeader(flags=4), 60, ALL),
        (VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=50, csum_offset=9), 60, ALL),
        (VnetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16), 60, ALL & ~OFFLOAD_FEATURES),
        (GSO4._replace(gso_size=0), 2000, ALL),
        (GSO4._replace(hdr_len=2001), 2000, ALL),
        (GSO4._replace(gso_type=VIRTIO_NET_HDR_GSO_UDP), 2000, ALL),
        (GSO4._replace(gso_type=VIRTIO_NET_HDR_GSO_UDP_L4), 2000, ALL),
        (GSO4._replace(gso_type=VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN), 2000, ALL),
        (GSO4._replace(gso_type=99), 2000, ALL),
        (GSO4, 2000, ALL & ~bit(VIRTIO_NET_F_HOST_TSO4)),
    ],
)
def test_invalid_frames_are_dropped_and_counted(header, length, features):
    rig = Rig(features)
    bad = rig.send(header, eth(length))
    good = rig.send(HDR, eth(60))
    rig.kick_tx()
    assert rig.sent == [(HDR, eth(60))]  # the next frame still goes
    assert rig.txd.used() == [(bad, 0), (good, 0)]
    assert rig.dev.stats()["tx_dropped"] == 1 and rig.t.failed is None


def test_gso_v6_with_its_feature():
    rig = Rig()
    h = GSO4._replace(gso_type=VIRTIO_NET_HDR_GSO_TCPV6, csum_start=54)
    rig.send(h, eth(3000))
    rig.kick_tx()
    assert rig.sent == [(h, eth(3000))]


def test_without_a_switch_frames_are_dropped():
    rig = Rig()
    rig.dev.on_transmit = None
    rig.send(HDR, eth(60))
    rig.kick_tx()
    assert rig.dev.stats()["tx_dropped"] == 1 and len(rig.txd.used()) == 1


@pytest.mark.parametrize(
    "bufs",
    [
        [(DATA, 12, False), (DATA + 0x100, 60, True)],  # a writable buffer on transmit
        [(DATA + 0x100, 72, True)],
        [(DATA, 11, False)],  # no whole header
        [(DATA, 5, False), (DATA + 5, 5, False)],
        [(END - 8, 72, False)],  # runs out of guest memory
    ],
)
def test_malformed_transmit_chain_is_a_virtqueue_error(bufs):
    rig = Rig()
    rig.g.write(DATA, HDR.pack() + eth(60))
    rig.txd.add(bufs)
    with pytest.raises(VirtqueueError, match=r"has writable buffers or no header|is not in shared memory"):
        rig.kick_tx()
    assert rig.sent == [] and rig.txd.used() == []
    assert rig.g.guards_intact()


def test_legacy_header_without_version_1():
    rig = Rig(ALL & ~bit(VIRTIO_F_VERSION_1) & ~bit(VIRTIO_NET_F_MRG_RXBUF))
    assert rig.dev.hdr_size == 10
    rig.send(HDR, eth(60))
    rig.kick_tx()
    assert rig.sent == [(HDR, eth(60))]
    rig.post(1000)
    assert rig.dev.deliver(HDR, eth(100))
    [(h, f, lens)] = rig.received()
    assert (h._replace(num_buffers=0), f, lens) == (HDR, eth(100), [110])


# -- transmit rate limit ------------------------------------------------------------------------
def test_rate_limit_defers_transmit_and_resumes_from_a_timer():
    clock = Clock()
    rig = Rig(tx_limiter=RateLimiter(ops=TokenBucket(size=2, refill_time=1.0)), clock=clock)
    frames = [eth(100, seed=i) for i in range(5)]
    heads = [rig.send(HDR, f) for f in frames]
    rig.kick_tx()
    assert [f for _, f in rig.sent] == frames[:2]
    assert [h for h, _ in rig.txd.used()] == heads[:2]  # the third is still the driver's... in the ring
    [(delay, _)] = rig.t.timers
    assert delay == pytest.approx(0.5)
    rig.kick_tx()  # kicks while waiting do nothing and schedule nothing more
    assert len(rig.sent) == 2 and len(rig.t.timers) == 1
    clock.now += delay
    rig.t.run_timers()
    assert [f for _, f in rig.sent] == frames[:3] and rig.t.interrupts[-1] == TRANSMITQ
    assert len(rig.t.timers) == 1  # the fourth waits again
    clock.now += 10
    rig.t.run_timers()
    assert [f for _, f in rig.sent] == frames and rig.t.timers == []
    assert [h for h, _ in rig.txd.used()] == heads[2:]
    assert rig.dev.stats()["tx_dropped"] == 0


def test_rate_limited_bytes():
    clock = Clock()
    rig = Rig(tx_limiter=RateLimiter(bandwidth=TokenBucket(size=3000, refill_time=1.0)), clock=clock)
    for i in range(4):
        rig.send(HDR, eth(1000, seed=i))
    rig.kick_tx()
    assert len(rig.sent) == 3
    [(delay, _)] = rig.t.timers
    assert delay == pytest.approx(1000 / 3000)


def test_deferred_transmit_after_detach_does_nothing():
    clock = Clock()
    rig = Rig(tx_limiter=RateLimiter(ops=TokenBucket(size=1)), clock=clock)
    rig.send(HDR, eth(60))
    rig.send(HDR, eth(60))
    rig.kick_tx()
    rig.dev.detach()
    clock.now += 5
    rig.t.run_timers()
    assert len(rig.sent) == 1


# -- receive ------------------------------------------------------------------------------------
def test_receive_without_mergeable_buffers():
    rig = Rig(NO_MRG)
    rig.post(1526, 1526, pieces=3)
    frame = eth(1514, seed=5)
    assert rig.dev.deliver(HDR, frame)
    assert rig.t.interrupts == [RECEIVEQ]
    [(h, f, lens)] = rig.received()
    assert (h, f, lens) == (HDR._replace(num_buffers=1), frame, [1526])
    # a frame no single buffer can hold is dropped; the buffer stays for the next one
    assert not rig.dev.deliver(HDR, eth(3000))
    assert rig.rxd.used() == []
    assert rig.dev.deliver(HDR, eth(60))
    assert [f for _, f, _ in rig.received()] == [eth(60)]
    stats = rig.dev.stats()
    assert (stats["rx_packets"], stats["rx_bytes"], stats["rx_dropped"]) == (2, 1574, 1)


def test_mergeable_receive_across_small_buffers():
    rig = Rig()
    rig.post(*[512] * 10, pieces=2)
    frame = eth(3000, seed=9)
    assert rig.dev.deliver(HDR, frame)
    [(h, f, lens)] = rig.received()
    assert h.num_buffers == 6 and f == frame
    assert lens == [512] * 5 + [3012 - 5 * 512]
    # the rest of the buffers take the next frames, one each
    assert rig.dev.deliver(HDR, eth(100)) and rig.dev.deliver(HDR, eth(500))
    assert [(h.num_buffers, f) for h, f, _ in rig.received()] == [(1, eth(100)), (1, eth(500))]


def test_mergeable_waits_for_enough_buffers():
    rig = Rig(event_idx=True)
    rig.post(512, 512)
    frame = eth(3000)
    assert rig.dev.deliver(HDR, frame)  # held: not enough room yet
    assert rig.rxd.used() == [] and rig.dev.stats()["rx_backlog"] == 1
    assert rig.rxd.avail_event == rig.rxd.avail_idx  # the next buffer posted will kick us
    rig.post(*[512] * 5)
    rig.kick_rx()
    [(h, f, _)] = rig.received()
    assert (h.num_buffers, f) == (6, frame)
    assert rig.dev.deliver(HDR, eth(60))  # one buffer left
    assert len(rig.received()) == 1


def test_mergeable_frame_larger_than_the_whole_ring_is_dropped():
    rig = Rig(size=8)
    rig.post(*[64] * 8)
    assert not rig.dev.deliver(HDR, eth(1000))
    assert rig.dev.stats()["rx_dropped"] == 1 and rig.dev.stats()["rx_backlog"] == 0
    assert rig.dev.deliver(HDR, eth(100))
    [(h, f, lens)] = rig.received()
    assert (h.num_buffers, f, lens) == (2, eth(100), [64, 48])


@pytest.mark.parametrize("event_idx", [False, True])
def test_backlog_without_buffers_then_delivery_on_kick(event_idx):
    rig = Rig(event_idx=event_idx)
    frames = [eth(60 + i % 100, seed=i) for i in range(RX_BACKLOG + 44)]
    taken = [rig.dev.deliver(HDR, f) for f in frames]
    assert taken == [True] * RX_BACKLOG + [False] * 44
    stats = rig.dev.stats()
    assert (stats["rx_backlog"], stats["rx_dropped"], stats["rx_packets"]) == (RX_BACKLOG, 44, 0)
    assert rig.t.interrupts == []
    got = []
    while rig.dev.backlog:
        rig.post(*[256] * 64)
        rig.kick_rx()
        got += [f for _, f, _ in rig.received()]
    assert got == frames[:RX_BACKLOG]  # in order
    assert rig.dev.stats()["rx_packets"] == RX_BACKLOG


def test_backlog_goes_first_even_without_a_kick():
    rig = Rig()
    assert rig.dev.deliver(HDR, eth(60, seed=1))
    rig.post(256, 256)  # the guest's kick has not arrived yet
    assert rig.dev.deliver(HDR, eth(60, seed=2))
    assert [f for _, f, _ in rig.received()] == [eth(60, seed=1), eth(60, seed=2)]


def test_receive_rate_limit_drops():
    clock = Clock()
    rig = Rig(rx_limiter=RateLimiter(ops=TokenBucket(size=2, refill_time=1.0)), clock=clock)
    rig.post(*[256] * 8)
    assert [rig.dev.deliver(HDR, eth(60)) for _ in range(4)] == [True, True, False, False]
    clock.now += 1
    assert rig.dev.deliver(HDR, eth(60))
    assert len(rig.received()) == 3 and rig.dev.stats()["rx_dropped"] == 2


def test_detached_device_drops():
    rig = Rig()
    rig.dev.deliver(HDR, eth(60))  # backlogged
    rig.dev.detach()
    assert not rig.dev.deliver(HDR, eth(60))
    stats = rig.dev.stats()
    assert (stats["rx_dropped"], stats["rx_backlog"]) == (2, 0)


@pytest.mark.parametrize("length", [0, ETH_HLEN - 1, MAX_FRAME + 1])
def test_receive_refuses_impossible_frames(length):
    rig = Rig()
    rig.post(*[4096] * 20)
    assert not rig.dev.deliver(HDR, bytes(length))
    assert rig.rxd.used() == []


def test_receive_chain_with_readable_buffer_fails_the_device():
    rig = Rig()
    rig.rxd.add([(DATA, 16, False), (DATA + 0x100, 2048, True)])
    assert not rig.dev.deliver(HDR, eth(60))  # no exception reaches the sender
    assert rig.t.failed and "receive" in rig.t.failed
    assert not rig.dev.deliver(HDR, eth(60))
    assert rig.dev.stats()["rx_dropped"] == 2


@pytest.mark.parametrize("bufs", [[(DATA, 11, True)], [(DATA, 16, False), (DATA + 0x100, 100, True)]])
def test_malformed_receive_chain_raises_on_kick(bufs):
    rig = Rig()
    rig.dev.deliver(HDR, eth(60))
    rig.rxd.add(bufs)
    with pytest.raises(VirtqueueError, match="is not a receive buffer"):
        rig.kick_rx()
    assert rig.g.guards_intact()


# -- offloads on receive ------------------------------------------------------------------------
def ones_sum(data: bytes) -> int:
    """RFC 1071 the long way: 16-bit words with end-around carry."""
    data += b"\0" * (len(data) % 2)
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


SRC_IP, DST_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def tcp_frame(payload: bytes) -> tuple[bytes, bytes, int]:
    """(frame with the partial checksum Linux leaves, the frame with the right checksum, TCP offset)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, SRC_IP, DST_IP)
    pseudo = SRC_IP + DST_IP + struct.pack("!BBH", 0, 6, len(tcp))
    partial = ones_sum(pseudo)  # CHECKSUM_PARTIAL: the field holds the pseudo-header sum
    right = ~ones_sum(pseudo + tcp) & 0xFFFF
    assert right not in (0, 0xFFFF)
    head = MAC + PEER + b"\x08\x00" + ip + tcp[:16]
    return head + struct.pack("!H", partial) + tcp[18:], head + struct.pack("!H", right) + tcp[18:], 34


@pytest.mark.parametrize("payload_len", [0, 1, 100, 1401])
def test_checksum_completed_for_a_guest_without_guest_csum(payload_len):
    rig = Rig(ALL & ~bit(VIRTIO_NET_F_GUEST_CSUM) & ~bit(VIRTIO_NET_F_GUEST_TSO4) & ~bit(VIRTIO_NET_F_GUEST_TSO6))
    partial, right, start = tcp_frame(bytes((i * 13) & 0xFF for i in range(payload_len)))
    rig.post(2048)
    h = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=16)
    assert rig.dev.deliver(h, partial)
    [(got_h, got, _)] = rig.received()
    assert got == right and got_h.flags == 0


def test_checksum_left_to_a_guest_with_guest_csum():
    rig = Rig()
    partial, _, start = tcp_frame(b"hello")
    rig.post(2048)
    h = VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID, csum_start=start, csum_offset=16)
    assert rig.dev.deliver(h, partial)
    [(got_h, got, _)] = rig.received()
    assert got == partial and got_h == h._replace(num_buffers=1)


def test_data_valid_only_for_a_guest_with_guest_csum():
    rig = Rig(ALL & ~OFFLOAD_FEATURES)
    rig.post(2048)
    assert rig.dev.deliver(VnetHeader(VIRTIO_NET_HDR_F_DATA_VALID | 4), eth(60))
    [(h, _, _)] = rig.received()
    assert h.flags == 0


def test_checksum_outside_the_frame_is_dropped():
    rig = Rig(ALL & ~OFFLOAD_FEATURES)
    rig.post(2048)
    assert not rig.dev.deliver(VnetHeader(VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=50, csum_offset=9), eth(60))
    assert rig.rxd.used() == []


@st.composite
def partial_checksums(draw):
    data = draw(st.binary(min_size=2, max_size=300))
    start = draw(st.integers(0, len(data) - 2))
    offset = 2 * draw(st.integers(0, (len(data) - start - 2) // 2))
    return data, start, offset


@example((bytes(20), 0, 4))  # all zero
@example((b"\xff\xff\0\0", 0, 2))  # sums to 0xffff: a zero checksum, sent as 0xffff
@example((b"\x12\x34\x56" * 101, 33, 24))  # odd length
@given(partial_checksums())
def test_completed_checksum_verifies(case):
    data, start, offset = case
    out = complete_checksum(data, start, offset)
    pos = start + offset
    assert len(out) == len(data) and out[:pos] == data[:pos] and out[pos + 2 :] == data[pos + 2 :]
    # the pseudo-header sum that stood in the field plus everything now there: all ones
    assert ones_sum(data[pos : pos + 2] + out[start:]) == 0xFFFF
    assert out[pos : pos + 2] != b"\0\0"


@pytest.mark.parametrize(
    "features, gso",
    [
        (ALL & ~bit(VIRTIO_NET_F_GUEST_TSO4), VIRTIO_NET_HDR_GSO_TCPV4),
        (ALL & ~bit(VIRTIO_NET_F_GUEST_TSO6), VIRTIO_NET_HDR_GSO_TCPV6),
        (ALL & ~bit(VIRTIO_NET_F_GUEST_CSUM), VIRTIO_NET_HDR_GSO_TCPV4),
        (ALL, VIRTIO_NET_HDR_GSO_UDP),
        (ALL, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN),
    ],
)
def test_gso_for_a_guest_that_cannot_take_it_is_dropped(features, gso):
    rig = Rig(features)
    rig.post(*[4096] * 20)
    assert not rig.dev.deliver(GSO4._replace(gso_type=gso), eth(20000))
    stats = rig.dev.stats()
    assert (stats["rx_gso_dropped"], stats["rx_dropped"], stats["rx_packets"]) == (1, 1, 0)


def test_gso_frame_through_the_switch_between_two_guests():
    """Guest a sends a 64 KiB TSO frame to guest b: it arrives whole, header and all."""
    a, b = Rig(mac=PEER), Rig(event_idx=True)
    sw = Switch()
    sw.add_port("a", PEER, a.dev.deliver)
    sw.add_port("b", MAC, b.dev.deliver)
    a.dev.on_transmit = lambda h, f: sw.receive("a", h, f, 0.0)
    b.post(*[4096] * 20)
    frame = eth(MAX_FRAME, dst=MAC, src=PEER, seed=11)
    a.send(GSO4, frame, fsplit=4096)
    a.kick_tx()
    [(h, f, lens)] = b.received()
    assert (h, f) == (GSO4._replace(num_buffers=17), frame)
    assert sum(lens) == MAX_FRAME + 12 and b.t.interrupts == [RECEIVEQ]
    assert sw.stats()["b"]["tx_packets"] == 1 and sw.stats()["a"]["rx_bytes"] == MAX_FRAME


# -- property: random rings, frames and headers ------------------------------------------------
NEEDS, GSO_TYPES = VIRTIO_NET_HDR_F_NEEDS_CSUM, [0, 1, 3, 4, 5, 0x81, 0xFF]
headers = st.one_of(
    st.sampled_from([HDR.pack(), GSO4.pack(), VnetHeader(NEEDS, 0, 0, 0, 34, 16).pack()]),
    st.binary(min_size=12, max_size=12),
    st.builds(
        lambda *f: VnetHeader(*f).pack(),
        st.sampled_from([0, NEEDS, NEEDS, VIRTIO_NET_HDR_F_DATA_VALID, 0xFF]),
        st.sampled_from(GSO_TYPES),
        st.integers(0, 100) | st.integers(0, 0xFFFF),
        st.integers(0, 2000) | st.just(0),
        st.integers(0, 80) | st.integers(0, 0xFFFF),
        st.integers(0, 40),
        st.integers(0, 0xFFFF),
    ),
)
lengths = st.sampled_from([60, 1514, 0, 1, 13, 14, MAX_FRAME, MAX_FRAME + 1]) | st.integers(14, 9000)
# Wild addresses leave room below 2**64 for the offsets the rig adds (descriptors hold a u64).
addresses = st.one_of(
    st.integers(DATA, END - 0x100), st.integers(R0, END + 0x100), st.integers(0, 2**64 - 1 - 0x20000)
)
tx_chain = st.tuples(
    headers,
    lengths,
    st.lists(st.integers(1, 5000), max_size=4),  # split points
    st.integers(0, 19),  # 0: a writable buffer too, 1: a wild address, 2-5: indirect
    addresses,
)
rx_chain = st.tuples(
    st.sampled_from([1526, 4096, 65562, 0, 8, 12, 64, 512]) | st.integers(0, 5000),
    st.integers(1, 3),  # pieces
    st.integers(0, 19),  # 0: a readable buffer first, 1: a wild address
    addresses,
)
deliveries = st.tuples(st.binary(min_size=12, max_size=12) | headers, lengths)
FEATURE_BITS = [VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    features=st.one_of(
        st.sampled_from([ALL, NO_MRG]), st.sets(st.sampled_from(FEATURE_BITS)).map(lambda fs: sum(bit(f) for f in fs))
    ),
    txs=st.lists(tx_chain, max_size=6),
    rxs=st.lists(rx_chain, max_size=8),
    more=st.lists(deliveries, max_size=5),
    limited=st.booleans(),
)
def test_random_traffic_only_ever_raises_virtqueue_error(features, txs, rxs, more, limited):
    acked = features
    clock = Clock()
    limiter = RateLimiter(ops=TokenBucket(size=2, refill_time=1.0)) if limited else None
    rig = Rig(acked, size=16, event_idx=bool(acked & bit(VIRTIO_F_EVENT_IDX)), tx_limiter=limiter, clock=clock)
    dev = rig.dev
    offered = [0]

    def loopback(h: VnetHeader, f: bytes) -> None:
        offered[0] += 1
        dev.deliver(h, f)

    dev.on_transmit = loopback
    for size, pieces, kind, wild in rxs:
        if len(rig.rxd.free) < pieces + 1:
            break
        addr = wild if kind == 1 else rig.alloc(size)
        step = max(1, -(-size // pieces))
        bufs = [(addr + o, min(step, size - o), True) for o in range(0, size, step)] or [(addr, 0, True)]
        if kind == 0:
            bufs.insert(0, (addr, 4, False))
        rig.rxd.add(bufs)
    for raw, length, cuts, kind, wild in txs:
        size = len(raw) + length
        addr = wild if kind == 1 else rig.alloc(size)
        if kind != 1:
            rig.g.write(addr, raw + eth(length))
        points = sorted({0, size, *(c for c in cuts if c < size)})
        bufs = [(addr + s, e - s, False) for s, e in itertools.pairwise(points)] or [(addr, 0, False)]
        if kind == 0:
            bufs.append((DATA, 16, True))
        if 2 <= kind <= 5 and rig.txd.free and rig.table + 16 * len(bufs) <= R2 + 0x1000:
            rig.txd.add_indirect(rig.table, bufs)
            rig.table += 16 * len(bufs)
        elif len(bufs) <= len(rig.txd.free):
            rig.txd.add(bufs)
    for step in range(3):
        for index in (TRANSMITQ, RECEIVEQ):
            try:
                dev.drain(index, rig.t.queues[index])
            except VirtqueueError:
                event(f"VirtqueueError on queue {index}")
        if rig.t.failed:
            event("receive queue failed the device")
        for raw, length in more if step == 0 else []:
            offered[0] += 1
            dev.deliver(VnetHeader.unpack(raw), eth(length))
        clock.now += 1
        rig.t.run_timers()
    stats = dev.stats()
    assert rig.g.guards_intact(), "bytes outside the shared regions changed"
    assert offered[0] == stats["rx_packets"] + stats["rx_dropped"] + stats["rx_backlog"]
    assert stats["rx_backlog"] <= RX_BACKLOG
    event(f"sent {min(stats['tx_packets'], 2)}+, dropped {min(stats['tx_dropped'], 2)}+")
    event(f"received {min(stats['rx_packets'], 2)}+, dropped {min(stats['rx_dropped'], 2)}+")


# -- model driver: every used id must be a head the driver has outstanding ---------------------
class Guest:
    """One guest NIC driven like Linux's virtio_net: it tracks exactly which heads it made available
    and has not had back, and checks every used element against that (virtqueue_get_buf_ctx_split's
    "id N is not a head!"), and that a merged packet's num_buffers entries are all there.

    Each head owns a fixed slot of guest memory, so buffers never overlap while outstanding.
    """

    RX_SIZE, TX_SIZE, SLOT = 32, 16, 0x1000

    def __init__(self, mac: bytes, features: int = ALL, *, event_idx: bool = False, start: int = 0, **dev_kw) -> None:
        self.mac = mac
        self.g = GuardedMemory(SPECS)
        self.rxd = Driver(self.g.mem, self.RX_SIZE, RX_RING, start_idx=start)
        self.txd = Driver(self.g.mem, self.TX_SIZE, TX_RING, start_idx=start)
        kw = {"indirect": True, "event_idx": event_idx, "last_avail_idx": start}
        self.t = FakeTransport({RECEIVEQ: self.rxd.queue(**kw), TRANSMITQ: self.txd.queue(**kw)}, host_fds=False)
        self.dev = NetDevice(mac, **dev_kw)
        self.dev.ack_features(features)
        self.dev.attach(self.t)
        self.rx_out: dict[int, int] = {}  # head -> buffer size
        self.tx_out: dict[int, bytes] = {}  # head -> frame
        self.received: list[bytes] = []
        self.sent: list[bytes] = []
        self.table = R2

    def rx_slot(self, head: int) -> int:
        return R1 + head * self.SLOT

    def tx_slot(self, head: int) -> int:
        return R1 + (self.RX_SIZE + head) * self.SLOT

    def post(self, size: int, pieces: int = 1) -> bool:
        if len(self.rxd.free) < pieces:
            return False
        head = self.rxd.free[0]
        addr = self.rx_slot(head)
        step = -(-size // pieces)
        bufs = [(addr + o, min(step, size - o), True) for o in range(0, size, step)]
        assert self.rxd.add(bufs) == head and head not in self.rx_out
        self.rx_out[head] = size
        return True

    def send(self, frame: bytes, pieces: int = 1, indirect: bool = False) -> bool:
        raw = HDR.pack()[: self.dev.hdr_size] + frame
        if len(self.txd.free) < (1 if indirect else pieces) or len(raw) > self.SLOT:
            return False
        head = self.txd.free[0]
        addr = self.tx_slot(head)
        self.g.write(addr, raw)
        step = -(-len(raw) // pieces)
        bufs = [(addr + o, min(step, len(raw) - o), False) for o in range(0, len(raw), step)]
        if indirect:
            table = R2 + head * (0x1000 // self.TX_SIZE)  # a table per head: 16 descriptors each
            bufs = bufs[:16]
            assert self.txd.add_indirect(table, bufs) == head
        else:
            assert self.txd.add(bufs) == head
        assert head not in self.tx_out
        self.tx_out[head] = frame
        return True

    def consume_rx(self) -> None:
        used = self.rxd.used()
        size = self.dev.hdr_size
        mergeable = bool(self.dev.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF))
        while used:
            head, n = used.pop(0)
            assert head in self.rx_out, f"rx: id {head} is not a head (outstanding {sorted(self.rx_out)})"
            assert size <= n <= self.rx_out.pop(head)
            data = self.g.read(self.rx_slot(head), n)
            count = VnetHeader.unpack(data[:size]).num_buffers if mergeable else 1
            assert count >= 1 and len(used) >= count - 1, f"rx: num_buffers {count}, {len(used) + 1} used"
            for more, m in used[: count - 1]:
                assert more in self.rx_out, f"rx: id {more} is not a head (outstanding {sorted(self.rx_out)})"
                assert 0 < m <= self.rx_out.pop(more)
                data += self.g.read(self.rx_slot(more), m)
            del used[: count - 1]
            self.received.append(data[size:])
        assert self.g.guards_intact()

    def consume_tx(self) -> None:
        for head, n in self.txd.used():
            assert head in self.tx_out, f"tx: id {head} is not a head (outstanding {sorted(self.tx_out)})"
            assert n == 0
            self.sent.append(self.tx_out.pop(head))

    def kick(self, index: int) -> None:
        self.dev.drain(index, self.t.queues[index])


guest_ops = st.lists(
    st.tuples(
        st.sampled_from(["post", "post", "send", "send", "kick_tx", "kick_rx", "deliver", "use_rx", "use_tx", "tick"]),
        st.booleans(),  # which guest
        st.sampled_from([14, 60, 1514, 1526, 3000, 4000]) | st.integers(14, 4000),  # a frame length
        st.sampled_from([12, 64, 256, 1526, 4096]) | st.integers(12, 4096),  # a receive buffer size
        st.integers(1, 3),  # pieces
        st.booleans(),  # indirect
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    ops=guest_ops,
    features=st.sampled_from([ALL, NO_MRG]),
    event_idx=st.booleans(),
    limited=st.booleans(),
    start=st.sampled_from([0, 0xFFF0, 0xFFFF]),
)
def test_two_guests_through_the_switch_only_ever_get_back_their_own_heads(ops, features, event_idx, limited, start):
    """Both guests send to each other through the real switch while posting, kicking and consuming
    in any order: every used element names a head the driver has outstanding, once."""
    clock = Clock()

    def limiter() -> RateLimiter | None:
        return RateLimiter(ops=TokenBucket(size=2, refill_time=1.0)) if limited else None

    a = Guest(PEER, features, event_idx=event_idx, start=start, tx_limiter=limiter(), clock=clock, backlog_max=8)
    b = Guest(MAC, features, event_idx=event_idx, start=start, tx_limiter=limiter(), clock=clock, backlog_max=8)
    sw = Switch(clock=clock)
    sw.add_port("a", PEER, a.dev.deliver)
    sw.add_port("b", MAC, b.dev.deliver)
    a.dev.on_transmit = lambda h, f: sw.receive("a", h, f)
    b.dev.on_transmit = lambda h, f: sw.receive("b", h, f)
    for op, which, length, size, pieces, indirect in ops:
        g, other = (a, b) if which else (b, a)
        if op == "post":
            g.post(size, pieces)
        elif op == "send":
            g.send(eth(length, dst=other.mac, src=g.mac, seed=length), pieces, indirect)
        elif op == "kick_tx":
            g.kick(TRANSMITQ)
        elif op == "kick_rx":
            g.kick(RECEIVEQ)
        elif op == "deliver":
            g.dev.deliver(HDR, eth(length, dst=g.mac, src=other.mac))
        elif op == "use_rx":
            g.consume_rx()
        elif op == "use_tx":
            g.consume_tx()
        else:
            clock.now += 0.5
            g.t.run_timers()
        assert a.t.failed is None and b.t.failed is None
    for g in (a, b):
        g.consume_rx()
        g.consume_tx()
