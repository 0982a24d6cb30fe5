"""What every virtio device is to a transport: features, config space, queues to drain.

A device is plain Python: the transport (vhost-user here, anything later) owns sockets and
eventfds, builds `SplitQueue`s over the guest's memory and calls `drain` when a queue is kicked.
Devices that also act on their own (a frame arriving from the switch, a host socket becoming
readable, a rate-limit timer) reach their queues and the host through the `Transport` they are
attached to, never through sockets of their own making.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit
from slimvisor.virtio.state import StateError, fields, integer, same

# Transport features every slimvisor device offers (6 Reserved Feature Bits).
COMMON_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
# What one queue may take of one loop turn before every other queue, port and control socket of
# the process has had its turn (Linux's vhost-net weighs 256 packets or 512 KiB the same way).
DRAIN_BUDGET_CHAINS = 64
DRAIN_BUDGET_BYTES = 512 * 1024


class Transport(Protocol):
    """What a connected device may ask of its transport and of the event loop behind it."""

    def queue(self, index: int) -> SplitQueue | None:
        """The running queue `index`, or None (not set up, disabled, or the device is broken)."""

    def interrupt(self, index: int) -> None:
        """Tell the driver about used buffers on `index`, if it asked to be told (EVENT_IDX)."""

    def fail(self, why: str) -> None:
        """Put the device in its error state (a guest broke the rules)."""

    def resume(self, index: int) -> None:
        """The device stopped draining `index` at its budget with work left: drain it again on
        the next loop turn, after everything else that is ready (kicks stay off meanwhile)."""

    def config_changed(self) -> None:
        """Tell the driver to re-read config space (balloon target, link status)."""

    def discard_memory(self, addr: int, length: int) -> None:
        """Return guest memory to the host (balloon); raises GuestMemoryError outside it."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` while `fd` can take more bytes (a host socket that filled up)."""

    def remove_writer(self, fd: int) -> None: ...


class VirtioDevice(ABC):
    device_id: int
    max_queues: int = 1
    queue_size_max: int = 1024

    # The device's own keys in `save()`'s dict, beside device_id and acked_features.
    state_fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.acked_features = 0
        self.transport: Transport | None = None

    # -- saved state (migration) ----------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """The device's state as plain data (ints, bools, strings, lists, dicts), for `restore`.

        Queues are saved apart (`SplitQueue.save`): they belong to the transport. A device saved
        is one not being served meanwhile (the transport stopped its queues).
        """
        return {"device_id": self.device_id, "acked_features": self.acked_features, **self.save_device()}

    def restore(self, state: object) -> None:
        """Take up `save()`'s state, from anywhere: checked whole (`StateError` naming the field)
        before any of it is applied, and only into a device configured as the saved one was."""
        what = type(self).__name__
        st = fields(state, what, ("device_id", "acked_features", *self.state_fields))
        same(st, "device_id", what, self.device_id)
        features = integer(st, "acked_features", what, 0, (1 << 64) - 1)
        if features & ~self.features():
            raise StateError(f"{what}: acked_features {features:#x} has bits this device does not offer")
        apply = self.restore_device(st)
        self.ack_features(features)
        apply()

    def save_device(self) -> dict[str, Any]:
        """The device type's own state (`state_fields`)."""
        return {}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        """Check the device type's own fields of `state` (keys already checked); return what applies them."""
        return lambda: None

    # -- announcing where the device is (after a migration) ---------------------------------------
    # Whether `announce` does anything: a transport offers announcement requests (vhost-user's
    # VHOST_USER_PROTOCOL_F_RARP) for such devices only.
    announces = False

    def announce(self, mac: bytes) -> bool:
        """Tell the network this device is reachable here as `mac` (a migrated NIC's gratuitous
        announcement); False when the device refuses (it has no network, or `mac` is not its own)."""
        return False

    def attach(self, transport: Transport) -> None:
        """A front-end connected; the device may now use its queues through `transport`."""
        self.transport = transport

    def detach(self) -> None:
        """The front-end went away: drop every reference into its memory."""
        self.transport = None
        self.forget_driver()

    def forget_driver(self) -> None:
        """Drop what the driver handed us (held buffers, backlogs, its view of ports): on reset
        and on detach alike, since a rebooted guest must never see a buffer it did not make."""

    @abstractmethod
    def device_features(self) -> int:
        """Device-type feature bits (5.x.3), without the common transport ones."""

    def features(self) -> int:
        return self.device_features() | COMMON_FEATURES

    @abstractmethod
    def config(self) -> bytes:
        """The device configuration space (5.x.4), little-endian."""

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver writes to config space; read-only by default (none needed so far)."""

    def ack_features(self, features: int) -> None:
        self.acked_features = features & self.features()

    @abstractmethod
    def handle(self, queue_index: int, chain: Chain) -> int:
        """Serve one request; return the number of bytes written into the chain."""

    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        """Serve the available chains, then re-arm kicks and drain again if more arrived; at the
        budget, stop with kicks off and let the transport come back (`over_budget`)."""
        chains = moved = 0
        while True:
            queue.disable_kicks()
            while (chain := queue.pop()) is not None:
                written = self.handle(queue_index, chain)
                queue.push(chain.head, written)
                chains += 1
                moved += chain.readable_len + written
                if self.over_budget(queue_index, chains, moved):
                    return
            if not queue.enable_kicks():
                return

    def over_budget(self, queue_index: int, chains: int, moved: int = 0) -> bool:
        """True, and the transport asked to resume the queue, once one drain served
        DRAIN_BUDGET_CHAINS chains or moved DRAIN_BUDGET_BYTES; a device without a transport
        (driven directly) has no loop to share and no budget."""
        if (chains < DRAIN_BUDGET_CHAINS and moved < DRAIN_BUDGET_BYTES) or self.transport is None:
            return False
        self.transport.resume(queue_index)
        return True

    def serve(self, queue_index: int) -> None:
        """Drain a queue outside a kick (a timer, host data): a guest error breaks the device only."""
        t = self.transport
        q = t.queue(queue_index) if t is not None else None
        if t is None or q is None:
            return
        try:
            self.drain(queue_index, q)
        except VirtqueueError as e:
            t.fail(f"queue {queue_index}: {e}")
        t.interrupt(queue_index)

    def reset(self) -> None:
        self.acked_features = 0
        self.forget_driver()

    def close(self) -> None:
        """Release host resources (files, sockets)."""
