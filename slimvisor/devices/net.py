"""virtio-net (virtio 1.2 section 5.1): one guest's port on the dom0 switch, sans-IO.

The transmit queue is drained into `on_transmit` (the switch sets it); frames from the switch come
in through `deliver`, which writes them into the receive queue. Frames are copied out of guest
memory once, so nothing downstream ever holds a view into a guest. What a guest puts *in* a frame
is its own business: a bad length or header drops that frame and is counted. A chain that is not
a network buffer at all (no header, writable descriptors on transmit) is a VirtqueueError.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from slimvisor.runtime.ratelimit import RateLimiter
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_F_VERSION_1, VIRTIO_ID_NET, bit
from slimvisor.virtio.state import flag, same

# 5.1.2 Virtqueues (no control queue, one queue pair)
RECEIVEQ = 0
TRANSMITQ = 1

# 5.1.3 Feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

# 5.1.4 Device configuration layout: status
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# 5.1.6 Device Operation: struct virtio_net_hdr flags and gso_type
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

OFFLOAD_FEATURES = (
    bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6)
)  # fmt: skip
# The GSO types we take from a guest (HOST_*) and give to one (GUEST_*); no ECN, no UFO offered.
_HOST_GSO = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6}
_GUEST_GSO = {VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6}

ETH_HLEN = 14
# A migrated NIC's announcement, as QEMU's qemu_announce_self builds it: a RARP request (RFC 903)
# from and about its MAC, broadcast, so every switch on the way learns where the MAC is now.
ETH_P_RARP = 0x8035  # Linux if_ether.h
ARPHRD_ETHER = 1  # RFC 826 / Linux if_arp.h: hardware type
ETH_P_IP = 0x0800  # protocol type
ARPOP_RREQUEST = 3  # RFC 903: reverse request
ETH_ZLEN = 60  # the shortest Ethernet frame, without its FCS
_BROADCAST = b"\xff" * 6
MAX_FRAME = ETH_HLEN + 65536  # a 64 KiB GSO packet behind its Ethernet header
RX_BACKLOG = 256  # frames held for a guest that has no receive buffers posted
HDR_SIZE = 12  # struct virtio_net_hdr with num_buffers (VERSION_1 or MRG_RXBUF)
LEGACY_HDR_SIZE = 10

_HDR = struct.Struct("<BBHHHHH")
_CONFIG = struct.Struct("<6sHH")  # mac, status, max_virtqueue_pairs

# How placing one frame into the receive queue went.
_DELIVERED, _NO_ROOM, _DROPPED = range(3)


def rarp_announcement(mac: bytes) -> bytes:
    """The broadcast RARP request that says `mac` is here: sender and target hardware address are
    both `mac`, protocol addresses 0, padded to ETH_ZLEN (QEMU's announce frame, byte for byte)."""
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_RREQUEST, mac, bytes(4), mac, bytes(4))
    return (_BROADCAST + mac + ETH_P_RARP.to_bytes(2, "big") + arp).ljust(ETH_ZLEN, b"\0")


class VnetHeader(NamedTuple):
    """struct virtio_net_hdr (5.1.6): the offload state that travels with a frame through the switch."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> VnetHeader:
        """From 12 bytes, or the 10 of a legacy header without num_buffers."""
        return cls._make(_HDR.unpack(data if len(data) != LEGACY_HDR_SIZE else data + b"\0\0"))

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    def pack_with(self, num_buffers: int) -> bytes:
        """Packed with another num_buffers (what `_replace` would do, without its cost per frame)."""
        return _HDR.pack(self[0], self[1], self[2], self[3], self[4], self[5], num_buffers)


# The header of a frame with no offload at all (ping, ARP, most small frames): the switch path
# recognizes it by identity and skips parsing, validating and refitting it.
PLAIN = VnetHeader()
_ZERO_HDR = bytes(HDR_SIZE)


def complete_checksum(frame: bytes, start: int, offset: int) -> bytes:
    """Fill in a partial checksum (NEEDS_CSUM) for a guest that did not offer to: what a NIC does.

    The field already holds the pseudo-header sum; the 16-bit ones' complement sum of
    frame[start:] is the big-endian number it spells modulo 0xffff (2**16 = 1 mod 0xffff), so
    its complement is 0xffff minus that: never 0, which goes out as 0xffff as in Linux.
    """
    data = frame[start:]
    r = int.from_bytes(data + b"\0" * (len(data) & 1), "big") % 0xFFFF
    pos = start + offset
    return frame[:pos] + (0xFFFF - r).to_bytes(2, "big") + frame[pos + 2 :]


@dataclass
class NetCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0  # every frame the guest did not get, rx_gso_dropped included
    rx_gso_dropped: int = 0  # GSO frames for a guest that cannot take them
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0


class _Throttled(Exception):
    """The transmit rate limit says wait `delay` seconds; the chain goes back to the ring."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


class NetDevice(VirtioDevice):
    """A NIC whose wire is `on_transmit` one way and `deliver` the other; limiters cap each way."""

    device_id = VIRTIO_ID_NET
    max_queues = 2

    def __init__(
        self,
        mac: bytes,
        *,
        offloads: bool = True,
        tx_limiter: RateLimiter | None = None,
        rx_limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
        backlog_max: int = RX_BACKLOG,
    ) -> None:
        super().__init__()
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.mac = bytes(mac)
        self.offloads = offloads
        self.tx_limiter = tx_limiter
        self.rx_limiter = rx_limiter
        self.clock = clock
        self.backlog_max = backlog_max
        self.backlog: deque[tuple[VnetHeader, bytes]] = deque()
        self.counters = NetCounters()
        self.on_transmit: Callable[[VnetHeader, bytes], None] | None = None
        self._link_up = True
        self._tx_waiting = False
        self._negotiated()

    # -- features and config space ---------------------------------------------------------------
    def device_features(self) -> int:
        f = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF)
        return f | OFFLOAD_FEATURES if self.offloads else f

    def config(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP if self._link_up else 0, 1)

    def _acked(self, feature: int) -> bool:
        return bool(self.acked_features & bit(feature))

    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        self._negotiated()

    def reset(self) -> None:
        super().reset()
        self._negotiated()

    def _negotiated(self) -> None:
        """What every frame needs to know of the features, worked out once per negotiation."""
        modern = self.acked_features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF))
        # The header in front of every frame: num_buffers is there with VERSION_1 or MRG_RXBUF (5.1.6).
        self.hdr_size = HDR_SIZE if modern else LEGACY_HDR_SIZE
        self._zero_hdr = _ZERO_HDR[: self.hdr_size]
        self._mergeable = self._acked(VIRTIO_NET_F_MRG_RXBUF)

    @property
    def link_up(self) -> bool:
        return self._link_up

    @link_up.setter
    def link_up(self, up: bool) -> None:
        """Cable in or out: the guest re-reads status; frames are dropped both ways while down."""
        if up != self._link_up:
            self._link_up = up
            if self.transport is not None:
                self.transport.config_changed()

    def stats(self) -> dict[str, int]:
        return {**asdict(self.counters), "rx_backlog": len(self.backlog)}

    # -- announcement after a migration (vhost-user's SEND_RARP) ---------------------------------
    # Why RARP from here rather than VIRTIO_NET_F_GUEST_ANNOUNCE: QEMU 7.2 passes GUEST_ANNOUNCE
    # to the guest only when the back-end offers it (hw/net/vhost_net.c user_feature_bits), and a
    # guest that acks it is asked to announce itself (config status VIRTIO_NET_S_ANNOUNCE, acked
    # on the control queue), in which case QEMU sends no SEND_RARP at all. This device has no
    # control queue, and UML hands our features to its guest as they are: Linux's virtio_net
    # refuses to probe a NIC offering GUEST_ANNOUNCE without VIRTIO_NET_F_CTRL_VQ
    # (virtnet_validate_features), so offering it would cost every PV domain its network. SEND_RARP
    # also goes out the moment QEMU announces, without waiting for the migrated guest to be
    # scheduled, and from this port only (the switch enforces the MAC). So: no GUEST_ANNOUNCE.
    announces = True

    def announce(self, mac: bytes) -> bool:
        """Broadcast the RARP announcement from this port, for this port's MAC only (the front-end
        could name any MAC; the switch would drop a forged source anyway, this refuses it first).
        Counted as a transmitted frame; dropped as one with the link down or over the rate limit."""
        if mac != self.mac:
            return False
        frame = rarp_announcement(mac)
        limiter = self.tx_limiter
        if (
            not self._link_up
            or self.on_transmit is None
            or (limiter is not None and not limiter.allow(len(frame), self.clock()))
        ):
            self.counters.tx_dropped += 1
            return False
        self.counters.tx_packets += 1
        self.counters.tx_bytes += len(frame)
        self.on_transmit(PLAIN, frame)
        return True

    # -- saved state: the link; frames in flight are dropped, as on a wire -----------------------
    state_fields = ("mac", "link_up")

    def save_device(self) -> dict[str, Any]:
        return {"mac": self.mac.hex(), "link_up": self._link_up}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        same(state, "mac", "net", self.mac.hex())
        up = flag(state, "link_up", "net")
        return lambda: setattr(self, "link_up", up)

    def forget_driver(self) -> None:
        self._drop_backlog()
        self._tx_waiting = False

    # -- queues ----------------------------------------------------------------------------------
    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        """A kick: new receive buffers take the backlog; the transmit queue goes to the switch."""
        if queue_index == RECEIVEQ:
            self._flush(queue)
        elif queue_index == TRANSMITQ and not self._tx_waiting:
            try:
                super().drain(queue_index, queue)
            except _Throttled as t:
                queue.unpop()  # the chain handle() refused stays available, kicks stay off
                if self.transport is not None:
                    self._tx_waiting = True
                    self.transport.call_later(t.delay, self._resume_tx)

    def _resume_tx(self) -> None:
        """The rate limit's wait is over: serve the transmit queue as if it had been kicked."""
        self._tx_waiting = False
        self.serve(TRANSMITQ)

    def handle(self, queue_index: int, chain: Chain) -> int:
        """One transmit chain: header then frame, all device-readable; nothing is written back."""
        if queue_index != TRANSMITQ:
            raise VirtqueueError(f"queue {queue_index} takes no requests")
        size, length = self.hdr_size, chain.readable_len
        if chain.writable or length < size:
            raise VirtqueueError(f"transmit chain {chain.head} has writable buffers or no header")
        raw = chain.read(0, size)
        length -= size
        if raw == self._zero_hdr:
            header, valid = PLAIN, ETH_HLEN <= length <= MAX_FRAME
        else:
            header = VnetHeader.unpack(raw)
            valid = self._tx_valid(header, length)
            if header.num_buffers:  # the driver's to leave 0 (5.1.6.2); it means nothing past us
                header = header._replace(num_buffers=0)
        if not self._link_up or self.on_transmit is None or not valid:
            self.counters.tx_dropped += 1
            return 0
        if self.tx_limiter is not None and not self.tx_limiter.allow(length, now := self.clock()):
            raise _Throttled(self.tx_limiter.wait_time(length, now))
        frame = chain.read(size, length)
        self.counters.tx_packets += 1
        self.counters.tx_bytes += length
        self.on_transmit(header, frame)
        return 0

    def _tx_valid(self, h: VnetHeader, length: int) -> bool:
        """What 5.1.6.2 lets a driver send, given what it negotiated."""
        if not ETH_HLEN <= length <= MAX_FRAME:
            return False
        if h.flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:  # DATA_VALID, RSC_INFO: device to driver only
            return False
        if h.flags and (not self._acked(VIRTIO_NET_F_CSUM) or h.csum_start + h.csum_offset + 2 > length):
            return False
        if h.gso_type == VIRTIO_NET_HDR_GSO_NONE:
            return True
        feature = _HOST_GSO.get(h.gso_type)
        return feature is not None and self._acked(feature) and h.gso_size > 0 and h.hdr_len <= length

    # -- receive ---------------------------------------------------------------------------------
    def deliver(self, header: VnetHeader, frame: bytes) -> bool:
        """Give the guest one frame from the switch: True if it got it or will (backlog)."""
        transport = self.transport
        if transport is None or not self._link_up or not ETH_HLEN <= len(frame) <= MAX_FRAME:
            return self._rx_drop()
        fitted = (header, frame) if header is PLAIN else self._rx_offloads(header, frame)
        if fitted is None:
            return self._rx_drop()
        if self.rx_limiter is not None and not self.rx_limiter.allow(len(frame), self.clock()):
            return self._rx_drop()
        queue = transport.queue(RECEIVEQ)
        if queue is None:
            return self._rx_drop()
        try:
            moved = self._flush(queue) if self.backlog else False
            outcome = _NO_ROOM if self.backlog else self._put(queue, *fitted)
        except VirtqueueError as e:
            transport.fail(f"receive queue: {e}")
            self._drop_backlog()
            return self._rx_drop()
        if moved or outcome == _DELIVERED:
            transport.interrupt(RECEIVEQ)
        if outcome != _NO_ROOM:
            return outcome == _DELIVERED
        if len(self.backlog) >= self.backlog_max:
            return self._rx_drop()
        self.backlog.append(fitted)
        return True

    def _rx_drop(self) -> bool:
        self.counters.rx_dropped += 1
        return False

    def _drop_backlog(self) -> None:
        self.counters.rx_dropped += len(self.backlog)
        self.backlog.clear()

    def _rx_offloads(self, h: VnetHeader, frame: bytes) -> tuple[VnetHeader, bytes] | None:
        """Fit a frame to what this guest negotiated (5.1.6.4); None when it cannot take it."""
        guest_csum = self._acked(VIRTIO_NET_F_GUEST_CSUM)
        if h.gso_type != VIRTIO_NET_HDR_GSO_NONE:
            feature = _GUEST_GSO.get(h.gso_type)
            if feature is None or not (guest_csum and self._acked(feature)) or h.gso_size == 0:
                self.counters.rx_gso_dropped += 1
                return None
        flags = h.flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if h.csum_start + h.csum_offset + 2 > len(frame):
                return None
            if not guest_csum:
                frame = complete_checksum(frame, h.csum_start, h.csum_offset)
        if not guest_csum:
            flags = 0
        return (h if flags == h.flags else h._replace(flags=flags)), frame

    def _flush(self, queue: SplitQueue) -> bool:
        """Move backlogged frames into the receive queue while it has room; True if any went."""
        moved = False
        while self.backlog:
            outcome = self._put(queue, *self.backlog[0])
            if outcome == _NO_ROOM:
                break
            self.backlog.popleft()
            moved |= outcome == _DELIVERED
        return moved

    def _put(self, queue: SplitQueue, header: VnetHeader, frame: bytes) -> int:
        """Write one frame into one receive chain, or as many as it takes with MRG_RXBUF (5.1.6.4)."""
        size = self.hdr_size
        need = size + len(frame)
        if self._mergeable:  # Linux posts one-page buffers: a big packet takes a dozen of them
            taken = queue.take_writable(need, min_len=size)
            if taken is None:
                return self._put_slow(queue, header, frame)
            return self._scatter(queue, taken, header.pack_with(len(taken))[:size], frame)
        chain = queue.pop()
        if chain is None:
            return self._put_slow(queue, header, frame)
        if len(chain.writable) == 1 and not chain.readable and chain.writable_len >= need:
            return self._scatter(queue, [(chain.head, chain.writable[0])], header.pack_with(1)[:size], frame)
        queue.unpop()
        return self._put_slow(queue, header, frame)

    def _scatter(self, queue: SplitQueue, taken: list[tuple[int, memoryview]], header: bytes, frame: bytes) -> int:
        """Header, then frame, over buffers of one view each: one buffer, or a merged packet (5.1.6.4)."""
        src = memoryview(frame)
        first = taken[0][1]
        hlen = len(header)
        first[:hlen] = header
        done = min(len(first) - hlen, len(src))
        first[hlen : hlen + done] = src[:done]
        used = [(taken[0][0], hlen + done)]
        for head, view in taken[1:]:
            n = min(len(view), len(src) - done)
            view[:n] = src[done : done + n]
            used.append((head, n))
            done += n
        queue.push_many(used)  # one index update: the driver never sees half a merged packet
        self.counters.rx_packets += 1
        self.counters.rx_bytes += len(frame)
        return _DELIVERED

    def _put_slow(self, queue: SplitQueue, header: VnetHeader, frame: bytes) -> int:
        """Every other case of `_put`: merged buffers, scattered buffers, waiting for buffers."""
        size = self.hdr_size
        need = size + len(frame)
        mergeable = self._mergeable
        for _ in range(queue.size + 1):  # each retry means the driver posted buffers meanwhile
            chains: list[Chain] = []
            room = 0
            while room < need and (mergeable or not chains) and (chain := queue.pop()) is not None:
                if chain.readable or (mergeable and chain.writable_len < size):
                    raise VirtqueueError(f"receive chain {chain.head} is not a receive buffer")
                chains.append(chain)
                room += chain.writable_len
            if room >= need:
                return self._write(queue, chains, header.pack_with(len(chains))[:size], frame)
            full = chains and (not mergeable or len(chains) >= queue.size)
            # Out of buffers: ask for a kick while the index we saw is the newest, then give the
            # chains back. When no buffer of this ring can ever hold the frame, it goes.
            more = False if full else queue.enable_kicks()
            for _ in chains:
                queue.unpop()
            if full:
                self.counters.rx_dropped += 1
                return _DROPPED
            if not more:
                break
        return _NO_ROOM

    def _write(self, queue: SplitQueue, chains: list[Chain], header: bytes, frame: bytes) -> int:
        """The header into the first chain (_put checked it has room), the frame after it."""
        src = memoryview(frame)  # sliced without copies: each byte is copied once, into the guest
        first, hlen = chains[0], len(header)
        first.write(0, header)
        done = first.write(hlen, src[: first.writable_len - hlen])
        used = [(first.head, hlen + done)]
        for chain in chains[1:]:
            n = min(chain.writable_len, len(src) - done)
            if len(chain.writable) == 1:  # one buffer (always, from Linux): no slicing of views
                chain.writable[0][:n] = src[done : done + n]
            else:
                chain.write(0, src[done : done + n])
            used.append((chain.head, n))
            done += n
        queue.push_many(used)  # one index update: the driver never sees half a merged packet
        self.counters.rx_packets += 1
        self.counters.rx_bytes += len(frame)
        return _DELIVERED
