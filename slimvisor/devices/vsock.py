"""virtio-vsock (virtio 1.2 section 5.10): the device between the guest's virtqueues and a host side.

The protocol lives in vsock_muxer, sans-IO; this file moves its packets between the muxer and the
virtqueues. Where host connections come from and go to is the `HostSide` the device is given:
`vsock_unix.UnixHostSide`, Unix sockets as Firecracker has them, is the one slimvisor serves
(`vsock_unix.unix_vsock` builds a device with it). The model itself opens no socket.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from slimvisor.devices.vsock_muxer import (
    CONN_BUF_ALLOC,
    VIRTIO_VSOCK_HDR_SIZE,
    VIRTIO_VSOCK_OP_RW,
    Connection,
    Header,
    Muxer,
)
from slimvisor.virtio.device import Transport, VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_VSOCK, bit
from slimvisor.virtio.state import same

# 5.10.2 Virtqueues
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

# 5.10.3 Feature bits
VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1

# 5.10.4 Device configuration layout: struct virtio_vsock_config { le64 guest_cid; }
_CONFIG = struct.Struct("<Q")

# 5.10.6.7 Device Events: struct virtio_vsock_event { le32 id; }
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
_EVENT = struct.Struct("<I")


class HostSide(Protocol):
    """Where the guest's connections to the host go and host connections to the guest come from.

    It drives the device's `muxer` (host_connect, host_data, host_eof, connected, ...) and calls
    `pump` after each host event; the device calls it back as below.
    """

    def bind(self, device: VsockDevice) -> None:
        """The device this side serves (called once, by the device's constructor)."""

    def attach(self, transport: Transport) -> None:
        """A front-end connected: start taking host connections, on the transport's loop."""

    def detach(self, transport: Transport) -> None:
        """The front-end went away (every connection has already ended)."""

    def connect(self, conn: Connection) -> None:
        """The guest connects to host port `conn.local_port`: answer `muxer.connected`."""

    def sync(self, conn: Connection) -> None:
        """Bring `conn`'s host end up to date with the muxer (bytes to write, shutdowns, its end)."""

    def end_all(self) -> None:
        """Close every host connection (the guest heard TRANSPORT_RESET)."""

    def close(self, transport: Transport | None) -> None:
        """Release what the host side holds on the host (idempotent)."""


class VsockDevice(VirtioDevice):
    """One guest's vsock; its host connections are its `host`'s business."""

    device_id = VIRTIO_ID_VSOCK
    max_queues = 3

    def __init__(self, guest_cid: int, host: HostSide, *, buf_alloc: int = CONN_BUF_ALLOC) -> None:
        super().__init__()
        if not 2 < guest_cid < 0xFFFFFFFF:  # 5.10.4: 0, 1, 2 (the host) and 0xffffffff are reserved
            raise ValueError(f"vsock guest CID {guest_cid} is reserved or too large (3 to 4294967294)")
        self.guest_cid = guest_cid
        self.muxer = Muxer(guest_cid, buf_alloc)
        self.host = host
        host.bind(self)

    def device_features(self) -> int:
        return bit(VIRTIO_VSOCK_F_STREAM)

    def config(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    # -- life cycle -----------------------------------------------------------------------------
    def attach(self, transport: Transport) -> None:
        super().attach(transport)
        self.host.attach(transport)

    def detach(self) -> None:
        self._end_all()
        if self.transport is not None:
            self.host.detach(self.transport)
        super().detach()

    def reset(self) -> None:
        self._end_all()
        super().reset()

    def close(self) -> None:
        self._end_all()
        self.host.close(self.transport)

    # -- saved state: the CID. Connections are not carried over: their host ends are sockets on
    # this host, so they end, and the guest hears TRANSPORT_RESET once its driver is back (as
    # Firecracker does after a snapshot restore).
    state_fields = ("guest_cid",)

    def save_device(self) -> dict[str, Any]:
        return {"guest_cid": self.guest_cid}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        same(state, "guest_cid", "vsock", self.guest_cid)
        return lambda: None

    def _end_all(self) -> None:
        """Every connection and greeting ends; the guest hears TRANSPORT_RESET if it can (5.10.6.7)."""
        self._send_event(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        self.muxer.reset()
        self.muxer.take_touched()
        self.host.end_all()

    def _send_event(self, event_id: int) -> None:
        t = self.transport
        q = t.queue(EVENT_QUEUE) if t is not None else None
        if t is None or q is None:
            return
        try:
            chain = q.pop()
            if chain is None:
                return
            if chain.writable_len < _EVENT.size:
                raise VirtqueueError(f"event buffer {chain.head} is shorter than an event")
            chain.write(0, _EVENT.pack(event_id))
            q.push(chain.head, _EVENT.size)
        except VirtqueueError as e:
            t.fail(f"event queue: {e}")
            return
        t.interrupt(EVENT_QUEUE)

    # -- virtqueues -----------------------------------------------------------------------------
    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        """tx: the guest's packets; rx: buffers for what waits; event: buffers kept for resets."""
        if queue_index == TX_QUEUE:
            super().drain(queue_index, queue)
        if queue_index in (TX_QUEUE, RX_QUEUE):
            self._run()

    def handle(self, queue_index: int, chain: Chain) -> int:
        """One packet from the tx queue (5.10.6.4); nothing is written back into it."""
        if chain.readable_len < VIRTIO_VSOCK_HDR_SIZE:
            raise VirtqueueError(f"tx chain {chain.head} is shorter than a packet header")
        hdr = Header.unpack(chain.read(0, VIRTIO_VSOCK_HDR_SIZE))
        # 5.10.6: buffers may be longer than len, never shorter
        if hdr.len > chain.readable_len - VIRTIO_VSOCK_HDR_SIZE or hdr.len > self.muxer.buf_alloc:
            self.muxer.malformed(hdr)
        elif hdr.op == VIRTIO_VSOCK_OP_RW:
            self.muxer.from_guest(hdr, chain.read(VIRTIO_VSOCK_HDR_SIZE, hdr.len))
        else:
            self.muxer.from_guest(hdr)
        return 0

    def _run(self) -> None:
        """Bring host sockets and the rx queue up to date with the muxer, until nothing changes."""
        while True:
            for conn in self.muxer.take_connects():
                self.host.connect(conn)
            self._deliver()
            touched = self.muxer.take_touched()
            if not touched:
                return
            for conn in touched:
                self.host.sync(conn)

    def pump(self) -> None:
        """`_run` after a host event: a bad rx buffer breaks the device, not the event loop."""
        try:
            self._run()
        except VirtqueueError as e:
            if self.transport is not None:
                self.transport.fail(f"rx queue: {e}")

    def _deliver(self) -> None:
        """What the guest is owed, into its rx buffers; kicks stay armed for when it has none."""
        t = self.transport
        q = t.queue(RX_QUEUE) if t is not None else None
        if t is None or q is None:
            return
        pushed = False
        try:
            while True:
                while self.muxer.has_output() and (chain := q.pop()) is not None:
                    room = chain.writable_len - VIRTIO_VSOCK_HDR_SIZE
                    if room < 0:
                        raise VirtqueueError(f"rx buffer {chain.head} cannot hold a packet header")
                    pkt = self.muxer.next_packet(room)
                    if pkt is None:  # only data is owed, and this buffer has no room for any
                        q.unpop()
                        return
                    chain.write(0, pkt[0].pack())
                    chain.write(VIRTIO_VSOCK_HDR_SIZE, pkt[1])
                    q.push(chain.head, VIRTIO_VSOCK_HDR_SIZE + len(pkt[1]))
                    pushed = True
                if not q.enable_kicks() or not self.muxer.has_output():
                    return
        finally:
            if pushed:
                t.interrupt(RX_QUEUE)
