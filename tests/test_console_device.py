"""virtio-console (5.3) with multiport, driven the way Linux's virtio_console drives it."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slimvisor.devices.console import (
    CONTROL,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    MAX_BACKLOG,
    MAX_CONTROL_BACKLOG,
    RESIZE,
    VIRTIO_CONSOLE_CONSOLE_PORT,
    VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_CONSOLE_PORT_READY,
    VIRTIO_CONSOLE_RESIZE,
    ConsoleDevice,
    PortSpec,
    receiveq,
    transmitq,
)
from slimvisor.devices.console_unix import UnixPortBinding
from slimvisor.virtio.device import COMMON_FEATURES
from slimvisor.virtio.queue import VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_CONSOLE, bit
from tests.vring import Driver, FakeTransport, GuardedMemory, align

BAD_ID = 0xFFFFFFFF  # the id Linux puts in DEVICE_READY
MEM = 0x40000
BUFFERS = 0x8000  # past up to 32 rings of 16 entries at 0x0, 0x400, ...
PORTS = [PortSpec(console=True), PortSpec("org.qemu.guest_agent.0"), PortSpec("data")]
Msg = tuple[int, int, int, bytes]


class Guest:
    """A virtio_console driver over test rings: one Driver per queue, buffers from a bump allocator."""

    def __init__(self, ports: list[PortSpec] = PORTS, *, multiport: bool = True, **qkw: bool) -> None:
        self.g = GuardedMemory([(0, MEM)])
        self.output: list[tuple[int, bytes]] = []
        self.opens: list[tuple[int, bool]] = []
        self.dev = ConsoleDevice(
            ports, on_output=lambda p, d: self.output.append((p, d)), on_open=lambda p, o: self.opens.append((p, o))
        )
        self.drivers = [Driver(self.g.mem, 16, 0x400 * i) for i in range(self.dev.max_queues)]
        self.t = FakeTransport({i: d.queue(**qkw) for i, d in enumerate(self.drivers)})
        self.dev.attach(self.t)
        self.dev.ack_features(self.dev.features() if multiport else COMMON_FEATURES)
        self.next = BUFFERS
        self.addr: dict[tuple[int, int], int] = {}  # (queue, head) -> buffer address

    def alloc(self, n: int) -> int:
        addr, self.next = self.next, self.next + align(max(n, 1), 16)
        assert self.next <= MEM, "test guest out of buffer space"
        return addr

    def kick(self, q: int) -> None:
        self.dev.drain(q, self.t.queues[q])

    def give(self, q: int, count: int = 1, size: int = 64) -> None:
        """Receive buffers, as fill_queue() adds them."""
        for _ in range(count):
            addr = self.alloc(size)
            self.addr[q, self.drivers[q].add([(addr, size, True)])] = addr
        self.kick(q)

    def take(self, q: int) -> list[bytes]:
        """What the device put in receive buffers since the last call (the buffers are not re-added)."""
        return [self.g.read(self.addr.pop((q, head)), n) for head, n in self.drivers[q].used()]

    def send(self, q: int, data: bytes) -> None:
        addr = self.alloc(len(data))
        self.g.write(addr, data)
        self.drivers[q].add([(addr, len(data), False)])
        self.kick(q)
        assert all(n == 0 for _, n in self.drivers[q].used())  # transmit buffers come back empty

    def control(self, port_id: int, ev: int, value: int = 1) -> None:
        self.send(CONTROL_TRANSMITQ, CONTROL.pack(port_id, ev, value))

    def messages(self) -> list[Msg]:
        return [(*CONTROL.unpack(m[: CONTROL.size]), m[CONTROL.size :]) for m in self.take(CONTROL_RECEIVEQ)]

    def handshake(self) -> list[Msg]:
        """Probe as Linux does: control buffers, DEVICE_READY, then each added port's buffers and PORT_READY."""
        self.give(CONTROL_RECEIVEQ, 8, 128)
        self.control(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY)
        added = self.messages()
        assert added == [(i, VIRTIO_CONSOLE_DEVICE_ADD, 1, b"") for i in range(len(self.dev.ports))]
        out = []
        for port_id, _, _, _ in added:
            self.give(receiveq(port_id), 4)
            self.control(port_id, VIRTIO_CONSOLE_PORT_READY)
            self.give(CONTROL_RECEIVEQ, 4, 128)  # replacing what was used, as Linux does
            out += self.messages()
        return out


def test_identity_config_and_queues():
    dev = ConsoleDevice(PORTS)
    assert dev.device_id == VIRTIO_ID_CONSOLE == 3
    assert dev.device_features() == bit(VIRTIO_CONSOLE_F_MULTIPORT)
    assert dev.config() == struct.pack("<HHII", 0, 0, 3, 0)
    assert dev.max_queues == 8
    assert [(receiveq(i), transmitq(i)) for i in range(3)] == [(0, 1), (4, 5), (6, 7)]
    with pytest.raises(ValueError, match="a console device needs at least one port"):
        ConsoleDevice([])


def test_multiport_handshake():
    guest = Guest()
    assert guest.handshake() == [
        (0, VIRTIO_CONSOLE_CONSOLE_PORT, 1, b""),
        (0, VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
        (1, VIRTIO_CONSOLE_PORT_NAME, 1, b"org.qemu.guest_agent.0\0"),
        (1, VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
        (2, VIRTIO_CONSOLE_PORT_NAME, 1, b"data\0"),
        (2, VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
    ]
    assert CONTROL_RECEIVEQ in guest.t.interrupts
    assert guest.dev.bad_control == guest.dev.unknown_port == 0
    assert guest.g.guards_intact()


def test_console_port_data_both_ways():
    guest = Guest()
    guest.dev.port_write(0, b"early")  # before the guest is ready: waits
    guest.handshake()
    assert guest.take(receiveq(0)) == [b"early"]
    guest.dev.port_write(0, b"ls\n")
    assert guest.take(receiveq(0)) == [b"ls\n"] and receiveq(0) in guest.t.interrupts
    guest.send(transmitq(0), b"bin etc\n")
    assert guest.output == [(0, b"bin etc\n")]


def test_named_port_waits_for_the_guest_to_open_it():
    guest = Guest()
    guest.handshake()
    guest.dev.port_write(1, b'{"execute":"guest-ping"}\n')
    assert guest.take(receiveq(1)) == []  # Linux would discard data for a port nobody opened
    guest.control(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    assert guest.opens == [(1, True)]
    assert guest.take(receiveq(1)) == [b'{"execute":"guest-ping"}\n']
    guest.send(transmitq(1), b'{"return":{}}\n')
    guest.control(1, VIRTIO_CONSOLE_PORT_OPEN, 0)
    assert guest.output == [(1, b'{"return":{}}\n')] and guest.opens == [(1, True), (1, False)]


def test_data_spans_buffers_and_waits_for_more():
    guest = Guest()
    guest.handshake()
    guest.control(2, VIRTIO_CONSOLE_PORT_OPEN, 1)
    data = bytes(range(256)) + b"tail"
    assert guest.dev.port_write(2, data) == len(data)
    got = guest.take(receiveq(2))
    assert got == [data[i : i + 64] for i in range(0, 256, 64)]  # the four buffers of the handshake
    guest.give(receiveq(2), 2)
    assert guest.take(receiveq(2)) == [b"tail"] and not guest.dev.ports[2].backlog


def test_a_transmit_chain_that_repeats_one_page_is_read_in_bounded_chunks():
    """16 descriptors naming the same 64 KiB (1 MiB claimed): pieces of at most TRANSMIT_CHUNK,
    MAX_TRANSMIT in all; what a longer chain claims beyond it is dropped and counted."""
    from slimvisor.devices.console import MAX_TRANSMIT, TRANSMIT_CHUNK

    g = GuardedMemory([(0, 0x4000), (0x100000, 0x10000)])
    out: list[bytes] = []
    dev = ConsoleDevice(PORTS, on_output=lambda p, d: out.append(d))
    drv = Driver(g.mem, 64, 0)
    t = FakeTransport({1: drv.queue()})
    dev.attach(t)
    dev.ack_features(dev.features())
    g.write(0x100000, bytes(range(256)) * 256)
    drv.add([(0x100000, 0x10000, False)] * 16)
    drv.add([(0x100000, 0x10000, False)] * 16 + [(0x100000, 0x100, False)])
    dev.drain(1, t.queues[1])
    assert t.resumed == [1]  # 1 MiB is past the drain budget's bytes: the second chain waits a turn
    dev.drain(1, t.queues[1])
    assert t.failed is None and [n for _, n in drv.used()] == [0, 0]
    assert max(map(len, out)) == TRANSMIT_CHUNK
    assert sum(map(len, out)) == 2 * MAX_TRANSMIT
    assert out[0] == bytes(range(256)) * 256
    assert dev.tx_truncated == 0x100


def test_backlog_is_bounded_then_drops_and_counts():
    guest = Guest()
    port = guest.dev.ports[2]
    assert guest.dev.port_write(2, b"a" * (MAX_BACKLOG - 1)) == MAX_BACKLOG - 1
    assert guest.dev.port_write(2, b"bb") == 0
    assert guest.dev.port_write(2, b"c") == 1
    assert len(port.backlog) == MAX_BACKLOG and port.dropped == 2
    with pytest.raises(ValueError, match=r"console port 3 does not exist \(3 ports\)"):
        guest.dev.port_write(3, b"no such port")


def test_control_backlog_is_bounded():
    guest = Guest()
    for _ in range(MAX_CONTROL_BACKLOG // 3 + 10):  # a guest that asks and never takes the answers
        guest.control(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY)
    assert guest.dev.control_dropped > 0 and len(guest.dev._control) == MAX_CONTROL_BACKLOG


@pytest.mark.parametrize(
    ("raw", "counter"),
    [
        (CONTROL.pack(1, VIRTIO_CONSOLE_PORT_READY, 1)[:7], "bad_control"),  # short
        (b"", "bad_control"),
        (CONTROL.pack(1, 42, 1), "bad_control"),  # unknown event
        (CONTROL.pack(1, VIRTIO_CONSOLE_DEVICE_ADD, 1), "bad_control"),  # only the device sends it
        (CONTROL.pack(1, VIRTIO_CONSOLE_PORT_NAME, 1) + b"evil\0", "bad_control"),
        (CONTROL.pack(1, VIRTIO_CONSOLE_PORT_OPEN, 2), "bad_control"),  # value is 0 or 1
        (CONTROL.pack(3, VIRTIO_CONSOLE_PORT_READY, 1), "unknown_port"),
        (CONTROL.pack(BAD_ID, VIRTIO_CONSOLE_PORT_OPEN, 1), "unknown_port"),
    ],
)
def test_malformed_control_messages_are_ignored_and_counted(raw, counter):
    guest = Guest()
    guest.handshake()
    addr = guest.alloc(len(raw))
    guest.g.write(addr, raw)
    guest.drivers[CONTROL_TRANSMITQ].add([(addr, len(raw), False)])
    guest.kick(CONTROL_TRANSMITQ)
    assert getattr(guest.dev, counter) == 1 and guest.messages() == [] and guest.opens == []
    assert guest.t.failed is None


def test_failed_device_and_port_setup():
    guest = Guest()
    guest.give(CONTROL_RECEIVEQ, 4, 128)
    guest.control(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 0)
    assert guest.messages() == []
    guest.control(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    guest.messages()
    guest.control(1, VIRTIO_CONSOLE_PORT_READY, 0)
    assert guest.messages() == [] and not guest.dev.ports[1].ready


@pytest.mark.parametrize(
    ("queue", "bufs"),
    [
        (transmitq(1), [(BUFFERS, 4, False), (BUFFERS + 0x100, 4, True)]),  # transmit with a writable part
        (CONTROL_TRANSMITQ, [(BUFFERS, 8, True)]),
        (receiveq(0), [(BUFFERS, 4, False), (BUFFERS + 0x100, 4, True)]),  # receive with a readable part
        (receiveq(0), [(BUFFERS, 0, True)]),  # no room at all
        (CONTROL_RECEIVEQ, [(BUFFERS, 7, True)]),  # shorter than a control message
    ],
)
def test_malformed_chains_are_virtqueue_errors(queue, bufs):
    guest = Guest()
    guest.handshake()
    guest.dev.port_write(0, bytes(1024))  # more than the receive buffers hold: some waits
    while not guest.dev._control:  # control messages waiting too
        guest.control(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY)
    guest.drivers[queue].add(bufs)
    with pytest.raises(VirtqueueError, match=r"has a device-writable part|is not a device-writable buffer big enough"):
        guest.kick(queue)
    assert guest.g.guards_intact()


def test_bad_receive_buffer_met_from_the_host_side_fails_the_device():
    guest = Guest()
    guest.handshake()
    guest.dev.port_write(0, bytes(4 * 64))  # fills the good buffers
    guest.drivers[receiveq(0)].add([(BUFFERS, 4, False)])
    assert guest.dev.port_write(0, b"x") == 1  # nothing escapes to the host caller
    assert guest.t.failed is not None and "queue 0" in guest.t.failed


def test_without_multiport_port0_is_a_plain_console():
    guest = Guest([PortSpec()], multiport=False)
    guest.give(receiveq(0), 2)
    guest.dev.port_write(0, b"login: ")
    assert guest.take(receiveq(0)) == [b"login: "]
    guest.send(transmitq(0), b"root\n")
    assert guest.output == [(0, b"root\n")]


def test_host_open_and_resize_messages():
    guest = Guest()
    guest.dev.set_host_open(1, False)  # before the port is ready: told with PORT_READY instead
    msgs = guest.handshake()
    assert (1, VIRTIO_CONSOLE_PORT_OPEN, 1, b"") not in msgs and (2, VIRTIO_CONSOLE_PORT_OPEN, 1, b"") in msgs
    guest.dev.set_host_open(1, True)
    guest.dev.set_host_open(1, True)  # no change, no message
    guest.dev.resize(0, 132, 43)
    assert guest.messages() == [
        (1, VIRTIO_CONSOLE_PORT_OPEN, 1, b""),
        (0, VIRTIO_CONSOLE_RESIZE, 0, RESIZE.pack(132, 43)),
    ]


def test_reset_and_detach_forget_the_guest():
    guest = Guest()
    guest.handshake()
    guest.control(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    guest.dev.port_write(1, b"kept for the next boot")
    guest.dev.reset()
    assert guest.opens == [(1, True), (1, False)]
    assert not any(p.ready or p.guest_open for p in guest.dev.ports) and not guest.dev._control
    assert guest.dev.ports[1].backlog == b""  # delivered before the reset
    guest.dev.port_write(2, b"waits")
    guest.dev.detach()
    assert guest.dev.ports[2].backlog == b"waits"


def test_unix_port_binding(tmp_path):
    guest = Guest()
    guest.handshake()
    guest.control(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    path = str(tmp_path / "agent.sock")
    binding = UnixPortBinding(guest.dev, 1, path)
    readers = guest.t.readers
    assert guest.messages() == [(1, VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]  # nobody on the host side yet
    guest.send(transmitq(1), b"lost")
    assert binding.dropped == 4 and guest.output == []

    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    readers[binding.listener.fileno()]()
    assert guest.messages() == [(1, VIRTIO_CONSOLE_PORT_OPEN, 1, b"")]
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(path)
    readers[binding.listener.fileno()]()  # one client at a time: the second is turned away
    assert other.recv(16) == b""
    other.close()

    client.sendall(b"ping\n")
    assert binding.client is not None
    readers[binding.client.fileno()]()
    assert guest.take(receiveq(1)) == [b"ping\n"]
    guest.send(transmitq(1), b"pong\n")
    assert client.recv(16) == b"pong\n" and guest.output == []

    client.close()
    readers[binding.client.fileno()]()
    assert binding.client is None and guest.messages() == [(1, VIRTIO_CONSOLE_PORT_OPEN, 0, b"")]
    assert list(readers) == [binding.listener.fileno()]
    binding.close()
    assert readers == {} and not (tmp_path / "agent.sock").exists()
    assert guest.dev.ports[1].output is None


def test_unix_port_binding_waits_for_a_slow_client(tmp_path):
    """Guest output the client's socket cannot take yet waits for add_writer, none of it dropped."""
    guest = Guest()
    guest.handshake()
    guest.control(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    path = str(tmp_path / "agent.sock")
    binding = UnixPortBinding(guest.dev, 1, path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    guest.t.readers[binding.listener.fileno()]()
    assert binding.client is not None
    fd = binding.client.fileno()
    binding.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(i * 7 & 0xFF for i in range(0x10000))
    guest.send(transmitq(1), data)
    assert binding.out and list(guest.t.writers) == [fd] and guest.t.timers == []
    got = bytearray()
    while len(got) < len(data):
        got += client.recv(len(data))
        if fd in guest.t.writers:
            guest.t.writers[fd]()
    assert got == data and binding.out == b"" and binding.dropped == 0 and guest.t.writers == {}

    guest.send(transmitq(1), data)  # the client leaves while output waits for it
    assert list(guest.t.writers) == [fd]
    client.close()
    guest.t.readers[fd]()
    assert binding.client is None and guest.t.writers == {} and binding.out == b""
    binding.close()
    assert guest.t.readers == {}


def test_unix_port_binding_needs_a_loop(tmp_path):
    with pytest.raises(ValueError, match="UnixPortBinding needs an event loop"):
        UnixPortBinding(ConsoleDevice(PORTS), 1, str(tmp_path / "x.sock"))
    assert not (tmp_path / "x.sock").exists()


# -- property: random guests only ever raise VirtqueueError --------------------------------------
N_PORTS = 3
ports_ids = st.sampled_from([0, 1, 2, 3, 7, BAD_ID])
events = st.sampled_from(
    [VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_READY, VIRTIO_CONSOLE_PORT_OPEN]
) | st.integers(0, 9)
control_msg = st.tuples(ports_ids, events, st.sampled_from([0, 1, 1, 2]), st.sampled_from([8, 8, 8, 0, 4, 12]))
buf = st.tuples(st.integers(BUFFERS, MEM - 0x100) | st.integers(0, MEM + 0x100), st.integers(0, 0x80), st.booleans())
good_control = st.tuples(
    st.integers(0, N_PORTS - 1),
    st.sampled_from([VIRTIO_CONSOLE_PORT_READY, VIRTIO_CONSOLE_PORT_OPEN]),
    st.just(1),
    st.just(8),
)
step = st.one_of(
    st.tuples(st.just("control"), control_msg),
    st.tuples(st.just("control"), good_control),
    st.tuples(st.just("rx"), st.integers(0, 2 + 2 * N_PORTS - 1), st.integers(0, 130)),
    st.tuples(st.just("tx"), st.integers(0, N_PORTS - 1), st.binary(max_size=40)),
    st.tuples(st.just("raw"), st.integers(0, 2 + 2 * N_PORTS - 1), st.lists(buf, min_size=1, max_size=3)),
    st.tuples(st.just("write"), st.integers(0, N_PORTS - 1), st.binary(min_size=1, max_size=200)),
    st.tuples(st.just("host_open"), st.integers(0, N_PORTS - 1), st.booleans()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25), handshake=st.booleans(), event_idx=st.booleans())
def test_random_guests_only_raise_virtqueue_error(steps, handshake, event_idx):
    guest = Guest(event_idx=event_idx)
    if handshake:
        guest.handshake()
    try:
        for kind, *args in steps:
            queue = {"control": CONTROL_TRANSMITQ, "tx": transmitq(args[0]) if kind == "tx" else 0}.get(kind, args[0])
            if kind in ("control", "rx", "tx", "raw") and len(guest.drivers[queue].free) < 3:
                continue  # the test guest never recycles receive buffers: its ring is full
            if kind == "control":
                port_id, ev, value, length = args[0]
                guest.send(queue, (CONTROL.pack(port_id, ev, value) + b"name")[:length])
            elif kind == "rx":
                guest.give(queue, 1, args[1])
            elif kind == "tx":
                guest.send(queue, args[1])
            elif kind == "raw":
                guest.drivers[queue].add(args[1])
                guest.kick(queue)
            elif kind == "write":
                guest.dev.port_write(args[0], args[1])
            else:
                guest.dev.set_host_open(args[0], args[1])
        event("all steps done")
    except VirtqueueError:
        event("VirtqueueError")
    assert guest.g.guards_intact()
    assert all(len(p.backlog) <= MAX_BACKLOG for p in guest.dev.ports)
    assert len(guest.dev._control) <= MAX_CONTROL_BACKLOG
    event(f"bad control {bool(guest.dev.bad_control)}, unknown port {bool(guest.dev.unknown_port)}")
    event(f"guest opened a port: {any(p.guest_open for p in guest.dev.ports)}")
