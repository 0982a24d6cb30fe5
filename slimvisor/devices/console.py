"""virtio-console (virtio 1.2 section 5.3) with multiple ports: byte channels between host and guest.

A port marked `console` becomes the guest's hvc console; a named port appears in the guest as
/dev/vport<N>p<id> and /dev/virtio-ports/<name>, the channel a guest agent uses. On the host each
port is a byte pipe: `port_write` queues bytes for the guest, `on_output` gets what the guest
writes, `on_open` follows the guest opening and closing the port. Bytes for the guest wait until
the guest has the port open and has given receive buffers, in a bounded backlog: beyond it they
are dropped and counted, so a guest that never reads costs the host at most that much.

Everything on the control queue comes from the guest: a short or unknown message, or one naming a
port that does not exist, is ignored and counted; only a broken chain stops the device.
`console_unix.UnixPortBinding` puts one port on a Unix socket for host programs (the I/O edge).
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_CONSOLE, bit
from slimvisor.virtio.state import StateError, blob, fields, flag, integer, same, to_blob

log = logging.getLogger(__name__)

# 5.3.2 Virtqueues: port 0's pair, the control pair, then port N's pair at 2+2N and 3+2N
RECEIVEQ0 = 0
TRANSMITQ0 = 1
CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3

# 5.3.3 Feature bits
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# 5.3.6.2 Multiport Device Operation: events of struct virtio_console_control
VIRTIO_CONSOLE_DEVICE_READY = 0
VIRTIO_CONSOLE_DEVICE_ADD = 1
VIRTIO_CONSOLE_DEVICE_REMOVE = 2
VIRTIO_CONSOLE_PORT_READY = 3
VIRTIO_CONSOLE_CONSOLE_PORT = 4
VIRTIO_CONSOLE_RESIZE = 5
VIRTIO_CONSOLE_PORT_OPEN = 6
VIRTIO_CONSOLE_PORT_NAME = 7

_CONFIG = struct.Struct("<HHII")  # 5.3.4: le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr
CONTROL = struct.Struct("<IHH")  # 5.3.6.2: le32 id, le16 event, le16 value
RESIZE = struct.Struct("<HH")  # 5.3.6.2: struct virtio_console_resize, le16 cols, le16 rows
_FROM_DRIVER = (VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_READY, VIRTIO_CONSOLE_PORT_OPEN)

MAX_BACKLOG = 1 << 20  # bytes waiting for the guest, per port
MAX_CONTROL_BACKLOG = 1024  # control messages waiting for control receive buffers
# Guest output is copied out of a transmit buffer this much at a time, and at most MAX_TRANSMIT
# of one buffer is taken: a chain may name the same guest page again and again up to 4 GiB
# (1 MiB of guest memory once became a 256 MiB allocation). Linux sends at most a pipe's worth.
TRANSMIT_CHUNK = 1 << 16
MAX_TRANSMIT = 1 << 20


def receiveq(port_id: int) -> int:
    return RECEIVEQ0 if port_id == 0 else 2 + 2 * port_id


def transmitq(port_id: int) -> int:
    return receiveq(port_id) + 1


@dataclass(frozen=True)
class PortSpec:
    name: str = ""  # PORT_NAME: /dev/virtio-ports/<name> in the guest
    console: bool = False  # CONSOLE_PORT: the guest makes it an hvc console


@dataclass
class Port:
    """One port's state: what the guest said about it and what waits for it."""

    spec: PortSpec
    backlog: bytearray = field(default_factory=bytearray)  # bytes for the guest
    dropped: int = 0  # bytes for the guest dropped on a full backlog
    ready: bool = False  # the guest answered DEVICE_ADD with PORT_READY 1
    guest_open: bool = False
    host_open: bool = True  # what PORT_OPEN tells the guest; Linux blocks writes while it is false
    output: Callable[[bytes], None] | None = None  # instead of the device's on_output (a binding)


class ConsoleDevice(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE

    def __init__(
        self,
        ports: list[PortSpec],
        *,
        on_output: Callable[[int, bytes], None] | None = None,
        on_open: Callable[[int, bool], None] | None = None,
    ) -> None:
        super().__init__()
        if not ports:
            raise ValueError("a console device needs at least one port")
        self.ports = [Port(spec) for spec in ports]
        self.max_queues = 2 + 2 * len(ports)
        self.on_output = on_output
        self.on_open = on_open
        self.bad_control = 0  # short, unknown or device-only control messages from the guest
        self.unknown_port = 0  # control messages naming a port that does not exist
        self.tx_truncated = 0  # bytes of transmit buffers past MAX_TRANSMIT, dropped
        self.control_dropped = 0  # control messages for the guest dropped on a full backlog
        self._control: deque[bytes] = deque()  # control messages for the guest
        self._wake: set[int] = set()  # receive queues to serve once a control batch is handled

    def device_features(self) -> int:
        return bit(VIRTIO_CONSOLE_F_MULTIPORT)

    def config(self) -> bytes:
        return _CONFIG.pack(0, 0, len(self.ports), 0)

    @property
    def multiport(self) -> bool:
        return bool(self.acked_features & bit(VIRTIO_CONSOLE_F_MULTIPORT))

    # -- host side ------------------------------------------------------------------------------
    def port_write(self, port_id: int, data: bytes) -> int:
        """Queue `data` for the guest; returns len(data), or 0 when the backlog had no room for it."""
        port = self._port(port_id)
        if len(port.backlog) + len(data) > MAX_BACKLOG:
            port.dropped += len(data)
            return 0
        port.backlog += data
        self.serve(receiveq(port_id))
        return len(data)

    def set_host_open(self, port_id: int, opened: bool) -> None:
        """Tell the guest whether anyone listens on the host side of the port (PORT_OPEN)."""
        port = self._port(port_id)
        if port.host_open != opened:
            port.host_open = opened
            if port.ready:
                self._send(port_id, VIRTIO_CONSOLE_PORT_OPEN, int(opened))
                self.serve(CONTROL_RECEIVEQ)

    def resize(self, port_id: int, cols: int, rows: int) -> None:
        """Tell the guest a console port's terminal size changed (RESIZE)."""
        if self._port(port_id).ready:
            self._send(port_id, VIRTIO_CONSOLE_RESIZE, 0, RESIZE.pack(cols, rows))
            self.serve(CONTROL_RECEIVEQ)

    def _port(self, port_id: int) -> Port:
        if not 0 <= port_id < len(self.ports):
            raise ValueError(f"console port {port_id} does not exist ({len(self.ports)} ports)")
        return self.ports[port_id]

    # -- queues ---------------------------------------------------------------------------------
    def _role(self, index: int) -> tuple[int | None, bool]:
        """(port id, or None for control; transmit?) of a queue index."""
        if CONTROL_RECEIVEQ <= index <= CONTROL_TRANSMITQ:
            return None, index == CONTROL_TRANSMITQ
        return (0 if index < 2 else index // 2 - 1), index % 2 == 1

    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        port_id, transmit = self._role(queue_index)
        if port_id is not None and port_id >= len(self.ports):
            return
        if transmit:
            super().drain(queue_index, queue)
            if port_id is None:  # answers and newly deliverable ports from that control batch
                for index in sorted({CONTROL_RECEIVEQ} | self._wake):
                    self.serve(index)
                self._wake.clear()
            return
        while True:  # receive: fill the driver's buffers while there is something for them
            while self._pending(port_id) and (chain := queue.pop()) is not None:
                queue.push(chain.head, self._fill(port_id, chain))
            if not (queue.enable_kicks() and self._pending(port_id)):
                return

    def _pending(self, port_id: int | None) -> bool:
        if port_id is None:
            return bool(self._control)
        port = self.ports[port_id]
        if not port.backlog:
            return False
        if not self.multiport:
            return port_id == 0
        return port.ready and (port.spec.console or port.guest_open)

    def _fill(self, port_id: int | None, chain: Chain) -> int:
        room = chain.writable_len
        if chain.readable or room < (1 if port_id is not None else CONTROL.size):
            raise VirtqueueError(f"receive buffer {chain.head} is not a device-writable buffer big enough")
        if port_id is None:
            return chain.write(0, self._control.popleft())  # one message a buffer, as Linux reads them
        backlog = self.ports[port_id].backlog
        n = chain.write(0, bytes(backlog[:room]))
        del backlog[:n]
        return n

    def handle(self, queue_index: int, chain: Chain) -> int:
        if chain.writable:
            raise VirtqueueError(f"transmit buffer {chain.head} has a device-writable part")
        port_id, _ = self._role(queue_index)
        if port_id is None:
            self._control_message(chain)
        else:
            self._transmit(port_id, chain)
        return 0

    def _transmit(self, port_id: int, chain: Chain) -> None:
        """Hand a transmit buffer's bytes on, TRANSMIT_CHUNK at a time, at most MAX_TRANSMIT."""
        port = self.ports[port_id]
        left = MAX_TRANSMIT
        for view in chain.readable:
            for start in range(0, min(len(view), left), TRANSMIT_CHUNK):
                piece = bytes(view[start : start + min(TRANSMIT_CHUNK, left - start)])
                if port.output is not None:
                    port.output(piece)
                elif self.on_output is not None:
                    self.on_output(port_id, piece)
            left -= min(len(view), left)
        self.tx_truncated += max(0, chain.readable_len - MAX_TRANSMIT)

    # -- control messages -----------------------------------------------------------------------
    def _control_message(self, chain: Chain) -> None:
        if chain.readable_len < CONTROL.size:
            self.bad_control += 1
            return
        port_id, event, value = CONTROL.unpack(chain.read(0, CONTROL.size))
        if value > 1 or event not in _FROM_DRIVER:
            self.bad_control += 1  # unknown, or one only the device sends
        elif event == VIRTIO_CONSOLE_DEVICE_READY:
            if not value:
                log.warning("console: the guest failed to set up its ports")
            for i in range(len(self.ports) if value else 0):
                self._send(i, VIRTIO_CONSOLE_DEVICE_ADD, 1)
        elif port_id >= len(self.ports):
            self.unknown_port += 1
        elif event == VIRTIO_CONSOLE_PORT_READY:
            self._port_ready(port_id, value == 1)
        else:
            self._guest_open(port_id, value == 1)

    def _port_ready(self, port_id: int, ok: bool) -> None:
        port = self.ports[port_id]
        port.ready = ok
        if not ok:
            log.warning("console: the guest failed to add port %d", port_id)
            return
        if port.spec.console:
            self._send(port_id, VIRTIO_CONSOLE_CONSOLE_PORT, 1)
        if port.spec.name:
            self._send(port_id, VIRTIO_CONSOLE_PORT_NAME, 1, port.spec.name.encode() + b"\0")
        if port.host_open:
            self._send(port_id, VIRTIO_CONSOLE_PORT_OPEN, 1)
        self._wake.add(receiveq(port_id))

    def _guest_open(self, port_id: int, opened: bool) -> None:
        port = self.ports[port_id]
        if port.guest_open == opened:
            return
        port.guest_open = opened
        if opened:
            self._wake.add(receiveq(port_id))
        if self.on_open is not None:
            self.on_open(port_id, opened)

    def _send(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self._control) >= MAX_CONTROL_BACKLOG:
            self.control_dropped += 1
            return
        self._control.append(CONTROL.pack(port_id, event, value) + extra)

    # -- saved state: each port's flags and backlog, and control messages not yet delivered -------
    state_fields = ("ports", "control")
    _PORT_FIELDS = ("name", "console", "ready", "guest_open", "host_open", "backlog", "dropped")
    _MAX_CONTROL_MESSAGE = CONTROL.size + 256  # PORT_NAME: the header, then a name and its NUL

    def save_device(self) -> dict[str, Any]:
        ports = [{"name": p.spec.name, "console": p.spec.console, "ready": p.ready, "guest_open": p.guest_open,
                  "host_open": p.host_open, "backlog": to_blob(p.backlog), "dropped": p.dropped}
                 for p in self.ports]  # fmt: skip
        return {"ports": ports, "control": [to_blob(m) for m in self._control]}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        saved, control = state["ports"], state["control"]
        if not isinstance(saved, list) or len(saved) != len(self.ports):
            raise StateError(f"console: ports is not a list of this device's {len(self.ports)} ports")
        if not isinstance(control, list) or len(control) > MAX_CONTROL_BACKLOG:
            raise StateError(f"console: control is not a list of at most {MAX_CONTROL_BACKLOG} messages")
        ports = []
        for i, (raw, port) in enumerate(zip(saved, self.ports, strict=True)):
            what = f"console port {i}"
            st = fields(raw, what, self._PORT_FIELDS)
            same(st, "name", what, port.spec.name)
            same(st, "console", what, port.spec.console)
            ports.append((flag(st, "ready", what), flag(st, "guest_open", what), flag(st, "host_open", what),
                          blob(st["backlog"], "backlog", what, MAX_BACKLOG),
                          integer(st, "dropped", what, 0, (1 << 64) - 1)))  # fmt: skip
        messages = [blob(m, f"control[{i}]", "console", self._MAX_CONTROL_MESSAGE) for i, m in enumerate(control)]
        for i, m in enumerate(messages):
            if len(m) < CONTROL.size:
                raise StateError(f"console: control[{i}] is shorter than a control message")

        def apply() -> None:
            for i, (ready, guest_open, host_open, backlog, dropped) in enumerate(ports):
                port = self.ports[i]
                port.ready, port.host_open, port.backlog, port.dropped = ready, host_open, bytearray(backlog), dropped
                self._guest_open(i, guest_open)  # a binding hears of it
            self._control = deque(messages)

        return apply

    def forget_driver(self) -> None:
        """The driver is gone (reset, disconnect): ports are neither added nor open any more."""
        for i, port in enumerate(self.ports):
            port.ready = False
            self._guest_open(i, False)
        self._control.clear()
        self._wake.clear()
