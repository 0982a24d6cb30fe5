"""A vhost-user front-end's message stream, with real fds: requests in any order, any payload, any
fds (eventfds, pipes, sockets, sealed and unsealed memfds, /dev/null), split at any byte, between
kicks and guest-memory writes, dirty logs among them (SET_LOG_BASE, VHOST_F_LOG_ALL, a used ring
logged; corpus/vhostuser/seed-dirtylog sets a ring up with logging on and has a chain marked).
The only rejection is ProtocolError (the connection ends and the next one starts afresh); every fd
that came in is closed by the end; nothing else is raised."""

from __future__ import annotations

import fcntl
import gc
import os
import socket
from collections.abc import Callable

from fuzz.bytes import Input
from fuzz.virtqueue import _disk
from slimvisor.devices.blk import BlockDevice
from slimvisor.devices.rng import RngDevice
from slimvisor.vhostuser import protocol as vu
from slimvisor.vhostuser.backend import VhostUserBackend

GUEST_SIZE = 0x10000
UVA = 0x7F00_0000_0000
REQUESTS = [
    vu.VHOST_USER_GET_FEATURES, vu.VHOST_USER_SET_FEATURES, vu.VHOST_USER_SET_OWNER,
    vu.VHOST_USER_SET_MEM_TABLE, vu.VHOST_USER_SET_VRING_NUM, vu.VHOST_USER_SET_VRING_ADDR,
    vu.VHOST_USER_SET_VRING_BASE, vu.VHOST_USER_GET_VRING_BASE, vu.VHOST_USER_SET_VRING_KICK,
    vu.VHOST_USER_SET_VRING_CALL, vu.VHOST_USER_SET_VRING_ERR, vu.VHOST_USER_GET_PROTOCOL_FEATURES,
    vu.VHOST_USER_SET_PROTOCOL_FEATURES, vu.VHOST_USER_GET_QUEUE_NUM, vu.VHOST_USER_SET_VRING_ENABLE,
    vu.VHOST_USER_SET_BACKEND_REQ_FD, vu.VHOST_USER_SET_CONFIG, vu.VHOST_USER_RESET_DEVICE,
    vu.VHOST_USER_SET_LOG_BASE, vu.VHOST_USER_SET_LOG_FD,
]  # fmt: skip
LOG_SIZE = 8  # bytes of dirty log that cover GUEST_SIZE from address 0


def _memfd(sealed: bool) -> int:
    fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, GUEST_SIZE)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _pipe_end(which: int) -> int:
    ends = os.pipe()
    os.close(ends[1 - which])
    return ends[which]


FDS: list[Callable[[], int]] = [
    lambda: os.eventfd(0, os.EFD_NONBLOCK),
    lambda: _memfd(True),
    lambda: _memfd(False),
    lambda: _pipe_end(0),
    lambda: _pipe_end(1),
    lambda: socket.socketpair()[0].detach(),
    lambda: os.open("/dev/null", os.O_RDONLY),
]


def _open_fds() -> set[str]:
    gc.collect()  # mmaps of guest memory hold an fd until they are collected
    return set(os.listdir("/proc/self/fd"))


class _Session:
    """One connection: a reader, a backend, and the guest memory the front-end shared."""

    def __init__(self, inp: Input) -> None:
        device = BlockDevice(_disk) if inp.num() & 1 else RngDevice()
        self.backend = VhostUserBackend(device, unsealed_memory=bool(inp.num() & 1))
        self.reader = vu.MessageReader()

    def send(self, inp: Input, raw: bytes, fds: list[int]) -> None:
        """The bytes of one message in pieces, the fds with the first; replies are dropped."""
        pos = 0
        while pos < len(raw):
            n = min(1 + inp.num() % 64 if inp.num() & 1 else len(raw), self.reader.wanted(), len(raw) - pos)
            msg = self.reader.feed(raw[pos : pos + n], fds)
            fds, pos = [], pos + n
            if msg is not None:
                self.backend.handle(msg)
        for fd in fds:  # the reader never took them (nothing was fed): the front-end keeps its own
            os.close(fd)

    def close(self) -> None:
        self.reader.close()
        self.backend.close()
        self.backend.device.close()


def _message(inp: Input) -> tuple[int, bytes, int]:
    """A vu.request: sane (as a front-end sets a ring up) or anything."""
    kind = inp.num() % 9
    index = inp.num() % 2
    if kind == 0:
        gpa = 0 if inp.num() & 3 else inp.num(4)
        size = GUEST_SIZE if inp.num() & 3 else inp.num(4)
        offset = 0 if inp.num() & 3 else inp.num(4)
        table = vu.MEM_TABLE_HEADER.pack(1, 0) + vu.MEM_REGION.pack(gpa, size, UVA, offset)
        return vu.VHOST_USER_SET_MEM_TABLE, table, 1
    if kind == 1:
        return vu.VHOST_USER_SET_VRING_NUM, vu.VRING_STATE.pack(index, inp.pick([16, 8, 256, 3, 0])), 0
    if kind == 2:
        desc, avail, used = (UVA + inp.num(2) % GUEST_SIZE for _ in range(3))
        flags, log = inp.num() % 3, inp.num(2) if inp.num() & 1 else inp.num(8)  # VHOST_VRING_F_LOG, its address
        return vu.VHOST_USER_SET_VRING_ADDR, vu.VRING_ADDR.pack(index, flags, desc, used, avail, log), 0
    if kind == 3:
        req = inp.pick([vu.VHOST_USER_SET_VRING_KICK, vu.VHOST_USER_SET_VRING_CALL, vu.VHOST_USER_SET_VRING_ERR])
        return req, vu.U64.pack(index | (0x100 if inp.num() % 8 == 0 else 0)), 1
    if kind == 4:
        return vu.VHOST_USER_SET_VRING_ENABLE, vu.VRING_STATE.pack(index, inp.num() % 3), 0
    if kind == 5:  # what QEMU negotiates before it migrates
        return vu.VHOST_USER_SET_PROTOCOL_FEATURES, vu.U64.pack(inp.pick([0x3, 0xB, 0x2, inp.num(8)])), 0
    if kind == 6:  # logging on and off (VHOST_F_LOG_ALL) with the features a front-end acks
        features = (1 << 32 | 1 << 30 | 1 << 29 | 1 << 28) | (1 << vu.VHOST_F_LOG_ALL if inp.num() & 1 else 0)
        return vu.VHOST_USER_SET_FEATURES, vu.U64.pack(features), 0
    if kind == 7:  # a dirty log: sane (a sealed memfd, then) or anything
        size = LOG_SIZE if inp.num() & 3 else inp.pick([0, 4, 16, 4096, inp.num(8)])
        offset = 0 if inp.num() & 3 else inp.pick([8, 4, 4096, inp.num(8)])
        return vu.VHOST_USER_SET_LOG_BASE, vu.LOG.pack(size, offset), inp.pick([1, 1, 1, 0, 2])
    return inp.pick(REQUESTS) if inp.num() & 7 else inp.num(4), inp.rest(80), inp.num() % 3


def target(data: bytes) -> None:
    inp = Input(data)
    before = _open_fds()
    session = _Session(inp)
    memfd = _memfd(True)  # the guest's memory, as the driver writes it
    try:
        while inp.more:
            op = inp.num() % 8
            if op == 0:  # the driver writes rings and buffers
                os.pwrite(memfd, inp.rest(64), inp.num(2) % GUEST_SIZE)
                continue
            if op == 1:
                index = inp.num() % 3
                if index < len(session.backend.vrings):
                    session.backend.kick(index)
                continue
            req, payload, nfds = _message(inp)
            features = (inp.num() << 2) & 0xC  # REPLY_ACK / NEED_REPLY bits now and then
            fds = [os.dup(memfd) if req == vu.VHOST_USER_SET_MEM_TABLE and i == 0 and inp.num() & 1
                   else _memfd(True) if req == vu.VHOST_USER_SET_LOG_BASE and i == 0 and inp.num() & 1
                   else inp.pick(FDS)() for i in range(nfds)]  # fmt: skip
            try:
                session.send(inp, vu.request(req, payload, features), fds)
            except vu.ProtocolError:
                session.close()
                session = _Session(inp)
    finally:
        session.close()
        os.close(memfd)
    leaked = _open_fds() - before
    assert not leaked, f"fds left open: {sorted(leaked)}"
