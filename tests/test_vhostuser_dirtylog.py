"""vhost-user dirty-page logging (QEMU docs/interop/vhost-user.rst, "Migration"): negotiation,
SET_LOG_BASE and SET_LOG_FD, logging on and off with VHOST_F_LOG_ALL, the used ring logged at its
log address when VHOST_VRING_F_LOG says so, and nothing written once GET_VRING_BASE answered."""

from __future__ import annotations

import fcntl
import os

import pytest

from slimvisor.devices.blk import SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, BlockDevice
from slimvisor.devices.console import ConsoleDevice, PortSpec
from slimvisor.devices.net import NetDevice
from slimvisor.devices.rng import RngDevice
from slimvisor.memory import VHOST_LOG_PAGE, log_bytes_for
from slimvisor.runtime.loop import EventLoop
from slimvisor.runtime.ratelimit import RateLimiter, TokenBucket
from slimvisor.vhostuser.backend import LOG_SLACK, VhostUserBackend
from slimvisor.vhostuser.protocol import (
    LOG,
    MEM_REGION,
    MEM_TABLE_HEADER,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_GET_FEATURES,
    VHOST_USER_GET_PROTOCOL_FEATURES,
    VHOST_USER_GET_VRING_BASE,
    VHOST_USER_PROTOCOL_F_CONFIG,
    VHOST_USER_PROTOCOL_F_LOG_SHMFD,
    VHOST_USER_PROTOCOL_F_MQ,
    VHOST_USER_PROTOCOL_F_REPLY_ACK,
    VHOST_USER_RESET_DEVICE,
    VHOST_USER_SET_FEATURES,
    VHOST_USER_SET_LOG_BASE,
    VHOST_USER_SET_LOG_FD,
    VHOST_USER_SET_MEM_TABLE,
    VHOST_USER_SET_PROTOCOL_FEATURES,
    VHOST_USER_SET_VRING_ADDR,
    VHOST_VRING_F_LOG,
    VRING_ADDR,
    VRING_STATE,
    ProtocolError,
)
from slimvisor.virtio.spec import bit
from tests.test_vhostuser import BackendLink, FrontEnd, Guest, fd_is_open, image_bytes, msg

PAGE = VHOST_LOG_PAGE
NEED = log_bytes_for(Guest.GPA + Guest.SIZE)  # what covers the test guest's memory
USED_LOG = 0x2000_0000  # a log_guest_addr away from the used ring's own address: where it must be logged


def log_memfd(size: int = NEED, *, seal: bool = True) -> int:
    fd = os.memfd_create("slimvisor-test-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # as QEMU's log
    return fd


def marked(fd: int, size: int = NEED) -> set[int]:
    raw = os.pread(fd, size, 0)
    return {i * 8 + b for i, byte in enumerate(raw) if byte for b in range(8) if byte >> b & 1}


def page(addr: int) -> int:
    return addr // PAGE


class Migrating:
    """A front-end set up as QEMU is when migration starts: LOG_SHMFD negotiated, ring 0 running."""

    def __init__(self, backend: VhostUserBackend, guest: Guest, eventfds: list[int]) -> None:
        self.backend, self.guest = backend, guest
        self.link = BackendLink(backend)
        self.fe = FrontEnd(self.link)
        self.features = self.fe.handshake(guest) & ~bit(VHOST_F_LOG_ALL)  # logging starts later
        self.fe.call(VHOST_USER_SET_FEATURES, U64.pack(self.features))
        want = bit(VHOST_USER_PROTOCOL_F_REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F_CONFIG) | bit(VHOST_USER_PROTOCOL_F_MQ)
        self.fe.call(VHOST_USER_SET_PROTOCOL_FEATURES, U64.pack(want | bit(VHOST_USER_PROTOCOL_F_LOG_SHMFD)))
        kick, call, err = eventfds
        self.fe.start_ring(guest, kick, call, err)
        self.log_fd = log_memfd()

    def set_log_base(self, size: int = NEED, offset: int = 0, fds: tuple[int, ...] | None = None) -> bytes:
        """As QEMU 7.2 sends it: no NEED_REPLY flag, and it waits for a SET_LOG_BASE reply."""
        return self.link.exchange(
            VHOST_USER_SET_LOG_BASE, 0, LOG.pack(size, offset), (self.log_fd,) if fds is None else fds, True
        )

    def logging(self, on: bool) -> None:
        features = self.features | bit(VHOST_F_LOG_ALL) if on else self.features
        self.fe.call(VHOST_USER_SET_FEATURES, U64.pack(features))

    def vring_log(self, on: bool, addr: int = USED_LOG) -> None:
        g, lay = self.guest, self.guest.drv.layout
        flags = bit(VHOST_VRING_F_LOG) if on else 0
        addrs = VRING_ADDR.pack(0, flags, g.uva(lay.desc), g.uva(lay.used), g.uva(lay.avail), addr)
        self.fe.call(VHOST_USER_SET_VRING_ADDR, addrs)

    def read_request(self) -> None:
        g = self.guest
        head = g.blk_request(VIRTIO_BLK_T_IN, 2, 2)
        self.backend.kick(0)
        assert g.drv.used() == [(head, 2 * SECTOR_SIZE + 1)] and g.status() == VIRTIO_BLK_S_OK
        assert g.read(g.DATA, 2 * SECTOR_SIZE) == image_bytes()[2 * SECTOR_SIZE : 4 * SECTOR_SIZE]

    def clear(self) -> None:
        os.pwrite(self.log_fd, bytes(NEED), 0)

    def close(self) -> None:
        os.close(self.log_fd)


@pytest.fixture
def parts(tmp_path):
    """A blk backend, a guest and its kick, call and err eventfds (as test_vhostuser's fixtures)."""
    path = tmp_path / "disk.img"
    path.write_bytes(image_bytes())
    dev = BlockDevice(str(path), serial="log-test")
    b, g = VhostUserBackend(dev), Guest()
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    yield b, g, efds
    b.close()
    dev.close()
    g.close()
    for fd in efds:
        os.close(fd)


@pytest.fixture
def mig(parts):
    m = Migrating(*parts)
    yield m
    m.close()


# -- negotiation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [RngDevice, lambda: NetDevice(bytes(6)), lambda: ConsoleDevice([PortSpec(console=True)])],
    ids=["rng", "net", "console"],
)
def test_every_device_offers_log_all_and_log_shmfd(make):
    b = VhostUserBackend(make())
    try:
        fe = FrontEnd(BackendLink(b))
        assert fe.get_u64(VHOST_USER_GET_FEATURES) & bit(VHOST_F_LOG_ALL)
        assert fe.get_u64(VHOST_USER_GET_PROTOCOL_FEATURES) & bit(VHOST_USER_PROTOCOL_F_LOG_SHMFD)
    finally:
        b.close()


def test_set_log_base_replies_as_qemu_waits_for_it(mig):
    assert mig.set_log_base() == U64.pack(0)  # BackendLink checked: request SET_LOG_BASE, reply flag
    assert mig.backend.dirty_log is not None and mig.backend.dirty_log.covers >= Guest.GPA + Guest.SIZE


# -- what is marked -----------------------------------------------------------------------------
def test_logging_marks_buffers_and_the_used_ring_at_its_log_address(mig):
    g = mig.guest
    mig.set_log_base()
    mig.read_request()
    assert marked(mig.log_fd) == set()  # VHOST_F_LOG_ALL not acked yet: nothing is logged
    mig.logging(True)
    mig.vring_log(True)
    mig.read_request()
    # the data (two sectors at DATA), the status byte, the used ring: at USED_LOG, not at its address
    assert marked(mig.log_fd) == {page(g.DATA), page(g.STATUS), page(USED_LOG)}
    assert page(g.drv.layout.used) not in {page(g.DATA), page(g.STATUS)}


def test_without_vring_f_log_the_used_ring_is_not_logged(mig):
    g = mig.guest
    mig.set_log_base()
    mig.logging(True)
    mig.vring_log(False)
    mig.read_request()
    assert marked(mig.log_fd) == {page(g.DATA), page(g.STATUS)}


def test_set_features_without_log_all_stops_logging(mig):
    mig.set_log_base()
    mig.logging(True)
    mig.vring_log(True)
    mig.read_request()
    assert marked(mig.log_fd)
    mig.logging(False)
    mig.clear()
    mig.read_request()
    assert marked(mig.log_fd) == set()
    mig.logging(True)  # and again: QEMU retries a failed migration
    mig.read_request()
    assert page(mig.guest.DATA) in marked(mig.log_fd)


def test_qemu_start_order_log_all_before_the_log(mig):
    """A device started mid-migration gets VHOST_F_LOG_ALL, then its rings, then the log."""
    mig.logging(True)
    mig.vring_log(True)
    mig.read_request()  # no log yet: nothing to mark, nothing breaks
    mig.set_log_base()
    mig.read_request()
    assert marked(mig.log_fd) == {page(mig.guest.DATA), page(mig.guest.STATUS), page(USED_LOG)}


def test_a_new_log_replaces_the_old_one(mig):
    mig.set_log_base()
    old = mig.backend.dirty_log
    mig.logging(True)
    second = log_memfd(NEED + 4096)
    try:
        assert mig.set_log_base(NEED + 4096, fds=(second,)) == U64.pack(0)
        assert old is not None and old.covers == 0  # unmapped
        mig.read_request()
        assert marked(second, NEED + 4096) == {page(mig.guest.DATA), page(mig.guest.STATUS)}
        assert marked(mig.log_fd) == set()
    finally:
        os.close(second)


def test_an_empty_log_without_fd_drops_the_log(mig):
    mig.set_log_base()
    mig.logging(True)
    assert mig.set_log_base(0, fds=()) == U64.pack(0)
    assert mig.backend.dirty_log is None
    mig.read_request()
    assert marked(mig.log_fd) == set()


def test_discarded_memory_is_marked(mig):
    mig.set_log_base()
    mig.logging(True)
    mig.backend.discard_memory(mig.guest.GPA + 0x10000, 2 * PAGE)  # a balloon's inflate
    assert marked(mig.log_fd) == {page(mig.guest.GPA + 0x10000), page(mig.guest.GPA + 0x11000)}


def test_reset_drops_the_log(mig):
    mig.set_log_base()
    mig.fe.call(VHOST_USER_RESET_DEVICE)
    assert mig.backend.dirty_log is None


# -- hostile input ------------------------------------------------------------------------------
def _unsealed() -> int:
    return log_memfd(seal=False)


@pytest.mark.parametrize(
    ("size", "offset", "make", "why"),
    [
        (8, 0, None, r"SET_LOG_BASE: a log of 0x8 bytes: guest memory needs 0x8020 \(at most 0x100000 more"),
        (NEED + LOG_SLACK + 8, 0, None, "SET_LOG_BASE: a log of 0x108028 bytes: guest memory needs 0x8020"),
        (1 << 63, 0, None, "SET_LOG_BASE: a log of 0x8000000000000000 bytes"),
        (NEED + 4, 0, None, "SET_LOG_BASE: cannot map the log: bad dirty log size=0x8024"),
        (NEED, 4, None, "SET_LOG_BASE: cannot map the log: bad dirty log size=0x8020 offset=0x4"),
        (NEED, 8, None, r"cannot map the log: dirty log 0x8\+0x8020 is beyond the end of its file \(0x8020\)"),
        (NEED, (1 << 64) - 8, None, "cannot map the log: dirty log 0xfffffffffffffff8"),
        (NEED, 0, _unsealed, "SET_LOG_BASE: the log file is not sealed against shrinking"),
    ],
)
def test_set_log_base_refuses_bad_logs(mig, size, offset, make, why):
    fd = make() if make is not None else os.dup(mig.log_fd)
    with pytest.raises(ProtocolError, match=why):
        mig.backend.handle(msg(VHOST_USER_SET_LOG_BASE, LOG.pack(size, offset), [fd]))
    assert not fd_is_open(fd)  # the refused fd went with the message
    assert mig.backend.dirty_log is None


@pytest.mark.parametrize(
    ("payload", "nfds", "why"),
    [
        (LOG.pack(NEED, 0), 0, "SET_LOG_BASE: a log of 0x8020 bytes without its fd"),
        (U64.pack(0), 1, "SET_LOG_BASE: payload of 8 bytes, expected 16"),
        (LOG.pack(NEED, 0), 2, "SET_LOG_BASE: 2 file descriptors, expected at most 1"),
    ],
)
def test_set_log_base_malformed(mig, payload, nfds, why):
    fds = [os.dup(mig.log_fd) for _ in range(nfds)]
    with pytest.raises(ProtocolError, match=why):
        mig.backend.handle(msg(VHOST_USER_SET_LOG_BASE, payload, fds))
    assert not any(fd_is_open(fd) for fd in fds)


def test_an_unsealed_log_is_refused_even_where_unsealed_memory_is_taken(parts):
    """The switch and the supervisors take UML's unsealed memory; a log must be sealed anyway."""
    _, guest, efds = parts
    b = VhostUserBackend(RngDevice(), unsealed_memory=True)
    try:
        m = Migrating(b, guest, efds)
        fd = log_memfd(seal=False)
        with pytest.raises(ProtocolError, match="SET_LOG_BASE: the log file is not sealed against shrinking"):
            b.handle(msg(VHOST_USER_SET_LOG_BASE, LOG.pack(NEED, 0), [fd]))
        m.close()
    finally:
        b.close()


def test_set_log_base_needs_log_shmfd(parts):
    backend, guest, _ = parts
    FrontEnd(BackendLink(backend)).handshake(guest)
    fd = log_memfd()
    try:
        with pytest.raises(ProtocolError, match="SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD"):
            backend.handle(msg(VHOST_USER_SET_LOG_BASE, LOG.pack(NEED, 0), [os.dup(fd)]))
    finally:
        os.close(fd)


def test_used_ring_log_address_beyond_the_log_is_refused(mig):
    mig.set_log_base()
    mig.logging(True)
    with pytest.raises(ProtocolError, match=r"SET_VRING_ADDR: ring 0's used ring log address 0x40100000 is beyond"):
        mig.vring_log(True, addr=Guest.GPA + Guest.SIZE)
    # the log address is the front-end's to choose, inside the log (the spec allows it outside memory)
    mig.vring_log(True, addr=NEED * 8 * PAGE - 6 - 8 * Guest().qsize)


def test_memory_beyond_the_log(mig):
    beyond = MEM_REGION.pack(Guest.GPA + PAGE * 8 * NEED, PAGE, mig.guest.UVA + Guest.SIZE, 0)  # past the log
    table = MEM_TABLE_HEADER.pack(1, 0) + beyond
    mig.set_log_base()
    mig.logging(True)
    why = "SET_MEM_TABLE: guest memory up to 0x80101000 is beyond the dirty log, which covers 0x40100000"
    with pytest.raises(ProtocolError, match=why):
        mig.backend.handle(msg(VHOST_USER_SET_MEM_TABLE, table, [os.dup(mig.guest.fd)]))
    mig.logging(False)  # not logging: the old log is dropped, the next migration sends a new one
    mig.backend.handle(msg(VHOST_USER_SET_MEM_TABLE, table, [os.dup(mig.guest.fd)]))
    assert mig.backend.dirty_log is None


def test_set_log_fd_is_taken_and_closed(mig):
    efd = os.eventfd(0)
    mig.backend.handle(msg(VHOST_USER_SET_LOG_FD, b"", [efd]))
    assert not fd_is_open(efd)
    mig.backend.handle(msg(VHOST_USER_SET_LOG_FD, U64.pack(0)))  # with a u64, without the fd: fine
    fds = [os.eventfd(0), os.eventfd(0)]
    with pytest.raises(ProtocolError, match="SET_LOG_FD: 2 file descriptors, expected at most 1"):
        mig.backend.handle(msg(VHOST_USER_SET_LOG_FD, b"", fds))
    with pytest.raises(ProtocolError, match="SET_LOG_FD: payload of 3 bytes"):
        mig.backend.handle(msg(VHOST_USER_SET_LOG_FD, b"abc"))


# -- nothing is written after GET_VRING_BASE ------------------------------------------------------
def test_a_deferred_request_never_lands_after_get_vring_base(parts):
    """Devices complete requests inside the call that pops them; what waits (rng's rate limit,
    host data for net, vsock and console) reaches its queue through the backend, which has none
    once GET_VRING_BASE answered. Here rng's deferred request: its timer fires after the stop."""
    _, guest, eventfds = parts
    loop = EventLoop()
    dev = RngDevice(limiter=RateLimiter(ops=TokenBucket(size=1, refill_time=0.05)))
    b = VhostUserBackend(dev, loop=loop)
    try:
        fe = FrontEnd(BackendLink(b))
        fe.handshake(guest)
        kick, call, err = eventfds
        fe.start_ring(guest, kick, call, err)
        first = guest.drv.add([(guest.DATA, 16, True)])
        second = guest.drv.add([(guest.DATA + PAGE, 16, True)])
        b.kick(0)
        assert guest.drv.used() == [(first, 16)]  # the second waits for the token bucket
        assert fe.call(VHOST_USER_GET_VRING_BASE, VRING_STATE.pack(0, 0)) == VRING_STATE.pack(0, 1)
        before = guest.read(guest.GPA, Guest.SIZE)
        assert dev.waiting
        for _ in range(100):  # the rate limit's timer (50 ms) is the loop's only event
            loop.run_once(1.0)
            if not dev.waiting:
                break
        assert not dev.waiting  # the timer ran...
        assert guest.read(guest.GPA, Guest.SIZE) == before  # ...and wrote nothing
        assert guest.drv.used() == [] and second is not None
    finally:
        b.close()
        loop.close()
