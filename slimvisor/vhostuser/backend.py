"""The vhost-user back-end state machine for one connection: messages in, replies out.

It owns what a connection brings (memory mappings, kick/call/err fds, vring state) and builds
`SplitQueue`s for a `VirtioDevice` when a ring starts. Sockets and polling live in server.py:
this class is driven with parsed `Message`s and `kick(index)` calls, so tests can drive it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from slimvisor.memory import GuestMemory, GuestMemoryError, log_bytes_for, map_fd_region
from slimvisor.runtime.loop import Loop
from slimvisor.vhostuser.dirtylog import SharedDirtyLog
from slimvisor.vhostuser.protocol import (
    CONFIG_HEADER,
    HEADER,
    LOG,
    MEM_REGION,
    MEM_TABLE_HEADER,
    U64,
    VHOST_F_LOG_ALL,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_BACKEND_CONFIG_CHANGE_MSG,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_GET_CONFIG,
    VHOST_USER_GET_FEATURES,
    VHOST_USER_GET_PROTOCOL_FEATURES,
    VHOST_USER_GET_QUEUE_NUM,
    VHOST_USER_GET_VRING_BASE,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_PROTOCOL_F_BACKEND_REQ,
    VHOST_USER_PROTOCOL_F_CONFIG,
    VHOST_USER_PROTOCOL_F_LOG_SHMFD,
    VHOST_USER_PROTOCOL_F_MQ,
    VHOST_USER_PROTOCOL_F_RARP,
    VHOST_USER_PROTOCOL_F_REPLY_ACK,
    VHOST_USER_PROTOCOL_F_RESET_DEVICE,
    VHOST_USER_RESET_DEVICE,
    VHOST_USER_RESET_OWNER,
    VHOST_USER_SEND_RARP,
    VHOST_USER_SET_BACKEND_REQ_FD,
    VHOST_USER_SET_CONFIG,
    VHOST_USER_SET_FEATURES,
    VHOST_USER_SET_LOG_BASE,
    VHOST_USER_SET_LOG_FD,
    VHOST_USER_SET_MEM_TABLE,
    VHOST_USER_SET_OWNER,
    VHOST_USER_SET_PROTOCOL_FEATURES,
    VHOST_USER_SET_VRING_ADDR,
    VHOST_USER_SET_VRING_BASE,
    VHOST_USER_SET_VRING_CALL,
    VHOST_USER_SET_VRING_ENABLE,
    VHOST_USER_SET_VRING_ERR,
    VHOST_USER_SET_VRING_KICK,
    VHOST_USER_SET_VRING_NUM,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    VHOST_VRING_F_LOG,
    VRING_ADDR,
    VRING_STATE,
    Message,
    ProtocolError,
    reply,
)
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTQ_USED_ELEM_SIZE, bit

log = logging.getLogger(__name__)

# BACKEND_REQ is offered because UML 6.1 takes its virtio interrupt number from setting up
# that channel: without it every queue's interrupt collides with the timer's (irq 0). LOG_SHMFD
# (with VHOST_F_LOG_ALL) is what QEMU asks before it migrates a guest: the dirty log in an fd.
PROTOCOL_FEATURES = (
    bit(VHOST_USER_PROTOCOL_F_MQ)
    | bit(VHOST_USER_PROTOCOL_F_LOG_SHMFD)
    | bit(VHOST_USER_PROTOCOL_F_REPLY_ACK)
    | bit(VHOST_USER_PROTOCOL_F_BACKEND_REQ)
    | bit(VHOST_USER_PROTOCOL_F_CONFIG)
    | bit(VHOST_USER_PROTOCOL_F_RESET_DEVICE)
)
_ONE = (1).to_bytes(8, "little")
# A queue with no interrupt asked for this long is quiet: its next one goes at once (a ping's
# frame); a busy queue's interrupts wait for the end of the loop turn: one for a whole burst.
IRQ_QUIET = 0.002
# How much larger than what covers guest memory a dirty log may be: room for used rings logged
# outside guest memory (the spec allows it) and for memory a front-end adds (QEMU grows its log
# before its memory table, by at least 4 KiB). 1 MiB of log covers 32 GiB of guest addresses.
LOG_SLACK = 1 << 20


@dataclass
class Vring:
    num: int = 0
    desc: int = 0
    used: int = 0
    avail: int = 0
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    flags: int = 0  # SET_VRING_ADDR's: VHOST_VRING_F_LOG
    log: int = 0  # SET_VRING_ADDR's log_guest_addr: where the used ring's writes are logged
    queue: SplitQueue | None = None
    last_irq: float = -math.inf  # when an interrupt was last asked for (monotonic)

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _signal(fd: int) -> None:
    """Write an eventfd (or socket, as UML uses) increment; a full pipe already means 'pending'.

    The fd was checked when it came (`_check_notify_fd`); anything else the kernel says of it
    (the front-end closed its end, an I/O error) costs that interrupt only, never the loop."""
    if fd >= 0:
        try:  # noqa: SIM105 - not contextlib.suppress: this runs for every interrupt
            os.write(fd, _ONE)
        except OSError:
            pass


def _check_notify_fd(name: str, fd: int, *, read: bool) -> None:
    """A kick, call or err fd must be an eventfd (vhost-user: "eventfd"), a socket (UML's call
    fds are socketpair ends) or a pipe end open for the way we use it: read for kicks, write for
    call and err. Anything else (a file, a device) would fail at the first interrupt or poll."""
    st = os.fstat(fd)
    if stat.S_ISFIFO(st.st_mode):
        kind = "pipe"
    elif stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    else:
        try:
            kind = "eventfd" if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]" else ""
        except OSError:  # no /proc: an anonymous inode is the best we can tell
            kind = "eventfd" if stat.S_IFMT(st.st_mode) == 0 else ""
    if not kind:
        raise ProtocolError(f"{name}: the fd is not an eventfd, a socket or a pipe (mode {st.st_mode:#o})")
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if access != os.O_RDWR and access != (os.O_RDONLY if read else os.O_WRONLY):
        raise ProtocolError(f"{name}: the {kind} is not open for {'reading' if read else 'writing'}")


def _check_memory_fd(fd: int, what: str) -> None:
    """Guest memory (and the dirty log) must be sealed against shrinking (memfd F_SEAL_SHRINK): a
    front-end that truncates a file we have mapped kills this process with SIGBUS at the next
    access, and Python cannot survive a SIGBUS. QEMU's memory-backend-memfd seals by default
    (seal=on), and QEMU's dirty log is always a sealed memfd."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a shmem or hugetlbfs file: it cannot be sealed at all
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError(
            f"{what} is not sealed against shrinking (F_SEAL_SHRINK): "
            "share it as a sealed memfd (QEMU: memory-backend-memfd with seal=on; QEMU's dirty log always is), "
            "or run the backend with --allow-unsealed-memory for a front-end that cannot shrink it"
        )


def _memory_end(mem: GuestMemory) -> int:
    """The end of the highest guest region: what the dirty log must cover."""
    return max((r.guest_addr + r.size for r in mem.regions), default=0)


class VhostUserBackend:
    """One connection's state; also the `Transport` its device uses between kicks.

    `unsealed_memory`: accept memory files without F_SEAL_SHRINK. Only for front-ends that cannot
    shrink them: UML in slimvisor's jail (its memory file is an O_TMPFILE, which cannot be sealed,
    in the jail's private tmpfs, and its seccomp filter has no ftruncate, truncate or fallocate),
    or one the user vouches for (`slimvisor backend --allow-unsealed-memory`).
    """

    def __init__(
        self, device: VirtioDevice, name: str = "", loop: Loop | None = None, *, unsealed_memory: bool = False
    ) -> None:
        self.device = device
        self.unsealed_memory = unsealed_memory
        self.loop = loop
        self.name = name or type(device).__name__
        self.protocol_features = 0
        self.features = 0
        self.mem = GuestMemory()
        self.vrings = [Vring() for _ in range(device.max_queues)]
        self.broken: str | None = None
        self.refused_announcements = 0  # SEND_RARPs the device did not send (logged once)
        self.backend_req_fd = -1  # kept for config-change notices; nothing is sent on it yet
        self.dirty_log: SharedDirtyLog | None = None  # SET_LOG_BASE's; used while VHOST_F_LOG_ALL is acked
        self._irq_pending: set[int] = set()  # queues to interrupt at the end of the loop turn
        self._resumes: set[int] = set()  # queues that stopped at their drain budget with work left
        self.irq_quiet = IRQ_QUIET
        self._handlers = {
            VHOST_USER_GET_FEATURES: self._get_features,
            VHOST_USER_SET_FEATURES: self._set_features,
            VHOST_USER_GET_PROTOCOL_FEATURES: self._get_protocol_features,
            VHOST_USER_SET_PROTOCOL_FEATURES: self._set_protocol_features,
            VHOST_USER_SET_OWNER: self._nothing,
            VHOST_USER_RESET_OWNER: self._reset,
            VHOST_USER_RESET_DEVICE: self._reset,
            VHOST_USER_SET_MEM_TABLE: self._set_mem_table,
            VHOST_USER_SET_LOG_BASE: self._set_log_base,
            VHOST_USER_SET_LOG_FD: self._set_log_fd,
            VHOST_USER_SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            VHOST_USER_SET_VRING_NUM: self._set_vring_num,
            VHOST_USER_SET_VRING_ADDR: self._set_vring_addr,
            VHOST_USER_SET_VRING_BASE: self._set_vring_base,
            VHOST_USER_GET_VRING_BASE: self._get_vring_base,
            VHOST_USER_SET_VRING_KICK: self._set_vring_fd,
            VHOST_USER_SET_VRING_CALL: self._set_vring_fd,
            VHOST_USER_SET_VRING_ERR: self._set_vring_fd,
            VHOST_USER_SET_VRING_ENABLE: self._set_vring_enable,
            VHOST_USER_GET_QUEUE_NUM: self._get_queue_num,
            VHOST_USER_GET_CONFIG: self._get_config,
            VHOST_USER_SET_CONFIG: self._set_config,
            VHOST_USER_SEND_RARP: self._send_rarp,
        }
        device.attach(self)

    # -- Transport (slimvisor.virtio.device) ----------------------------------------------------
    def queue(self, index: int) -> SplitQueue | None:
        if self.broken or not 0 <= index < len(self.vrings) or not self.vrings[index].enabled:
            return None
        return self.vrings[index].queue

    def interrupt(self, index: int) -> None:
        """Adaptive, as NICs moderate interrupts: a quiet queue is notified at once, since the
        driver may be waiting on just this (a ping through the switch: about 25 us less per hop
        here). A busy one, with an event loop, once per loop turn: a guest sent a burst of frames
        (a TX ring drained into its receive queue) takes one interrupt for all of them."""
        vring = self.vrings[index]
        now = time.monotonic()
        quiet, vring.last_irq = now - vring.last_irq > self.irq_quiet, now
        if self.loop is None or quiet:
            self._notify(index)
            return
        if not self._irq_pending:
            self.loop.call_soon(self._flush_interrupts)
        self._irq_pending.add(index)

    def _flush_interrupts(self) -> None:
        pending, self._irq_pending = self._irq_pending, set()
        for index in sorted(pending):
            self._notify(index)

    def _notify(self, index: int) -> None:
        vring = self.vrings[index]
        if vring.queue is not None and vring.queue.should_notify():
            _signal(vring.call)

    def fail(self, why: str) -> None:
        if not self.broken:
            self._break(why, self.vrings[0])

    def resume(self, index: int) -> None:
        """With a loop, the queue's next batch waits for the next turn (a timer due at once, so
        every fd that is ready goes first); without one, `kick` goes on with it at once."""
        if self.loop is not None and not self._resumes:
            self.loop.call_later(0.0, self._resume_all)
        self._resumes.add(index)

    def _resume_all(self) -> None:
        resumes, self._resumes = self._resumes, set()
        for index in sorted(resumes):
            self.kick(index)

    def config_changed(self) -> None:
        if self.backend_req_fd >= 0:  # no reply asked: UML's end of this channel is a pipe
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self.backend_req_fd, HEADER.pack(VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, VHOST_USER_VERSION, 0))

    def discard_memory(self, addr: int, length: int) -> None:
        self.mem.discard(addr, length)
        dirty = self._logging()
        if dirty is not None:  # the pages now read as zeros: the destination must get them too
            dirty.mark(addr, length)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        if self.loop is None:
            raise RuntimeError("this backend has no event loop")
        self.loop.call_later(delay, callback)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        if self.loop is None:
            raise RuntimeError("this backend has no event loop")
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        if self.loop is not None:
            self.loop.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        if self.loop is None:
            raise RuntimeError("this backend has no event loop")
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        if self.loop is not None:
            self.loop.remove_writer(fd)

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, msg: Message) -> bytes | None:
        """Apply one request; return the bytes to send back, if any. ProtocolError ends the link."""
        handler = self._handlers.get(msg.request)
        if handler is None:
            msg.close_fds()
            raise ProtocolError(f"unsupported vhost-user request: {msg.name}")
        try:
            out = handler(msg)
        finally:
            msg.close_fds()  # handlers take the fds they keep out of msg.fds
        if self._irq_pending:  # what a message started is signalled before its reply goes
            self._flush_interrupts()
        if out is not None:
            return reply(msg, out)
        if msg.need_reply and self.protocol_features & bit(VHOST_USER_PROTOCOL_F_REPLY_ACK):
            return reply(msg, U64.pack(0))
        return None

    def kick_fds(self) -> dict[int, int]:
        """fd -> queue index for every ring that is running and wants polling."""
        return {v.kick: i for i, v in enumerate(self.vrings) if v.queue is not None and v.enabled}

    def kick(self, index: int) -> None:
        """The driver kicked queue `index`: serve it and interrupt the driver if it asked."""
        vring = self.vrings[index]
        q = vring.queue
        if q is None or not vring.enabled or self.broken:
            return
        try:
            self.device.drain(index, q)
            while self.loop is None and index in self._resumes:  # driven directly: no turn to wait for
                self._resumes.discard(index)
                self.device.drain(index, q)
        except VirtqueueError as e:
            self._break(f"queue {index}: {e}", vring)
        self.interrupt(index)

    def _break(self, why: str, vring: Vring) -> None:
        """Error state (virtio's DEVICE_NEEDS_RESET): stop serving, tell the front-end, log once."""
        self.broken = why
        log.error("%s: guest error, device stopped until reset: %s", self.name, why)
        _signal(vring.err)

    def close(self) -> None:
        self.device.detach()
        if self.backend_req_fd >= 0:
            os.close(self.backend_req_fd)
            self.backend_req_fd = -1
        for v in self.vrings:
            v.close_fds()
            v.queue = None
        self.mem = GuestMemory()
        self._drop_log()

    # -- helpers --------------------------------------------------------------------------------
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"vring index {index} out of range (device has {len(self.vrings)})")
        return self.vrings[index]

    def _start(self, index: int) -> None:
        """Build the queue once the ring has its size, addresses and kick fd."""
        v = self.vrings[index]
        if v.kick < 0 or v.queue is not None:
            return
        try:
            v.queue = SplitQueue(
                self.mem, v.num, self.mem.user_to_guest(v.desc), self.mem.user_to_guest(v.avail),
                self.mem.user_to_guest(v.used),
                event_idx=bool(self.features & bit(VIRTIO_F_EVENT_IDX)),
                indirect=bool(self.features & bit(VIRTIO_F_INDIRECT_DESC)),
                last_avail_idx=v.base,
            )  # fmt: skip
        except (VirtqueueError, GuestMemoryError) as e:
            self._break(f"queue {index} cannot start: {e}", v)
            return
        self._log_queue(index, "the ring's start")

    # -- dirty logging (vhost-user "Migration") ------------------------------------------------
    def _logging(self) -> SharedDirtyLog | None:
        """The log to mark: while VHOST_F_LOG_ALL is acked and the front-end gave one. QEMU
        acks the bit before it sends the log when a device starts mid-migration."""
        return self.dirty_log if self.features & bit(VHOST_F_LOG_ALL) else None

    def _log_queue(self, index: int, what: str) -> None:
        """Tell ring `index`'s queue what to log. Its used ring is logged at log_guest_addr, which
        the spec lets lie outside guest memory but not outside the log."""
        v = self.vrings[index]
        if v.queue is None:
            return
        dirty, used_log = self._logging(), None
        if dirty is not None and v.flags & bit(VHOST_VRING_F_LOG):
            used_log = v.log
            if used_log + 6 + VIRTQ_USED_ELEM_SIZE * v.queue.size > dirty.covers:
                raise ProtocolError(
                    f"{what}: ring {index}'s used ring log address {used_log:#x} is beyond the dirty log "
                    f"(it covers guest addresses up to {dirty.covers:#x})"
                )
        v.queue.log_writes(dirty, used_log)

    def _log_queues(self, what: str) -> None:
        for i in range(len(self.vrings)):
            self._log_queue(i, what)

    def _drop_log(self) -> None:
        for v in self.vrings:
            if v.queue is not None:
                v.queue.log_writes(None)
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None

    def _stop(self, index: int) -> int:
        v = self.vrings[index]
        base = v.queue.last_avail_idx if v.queue is not None else v.base
        v.queue = None
        v.base = base
        if v.kick >= 0:
            os.close(v.kick)
            v.kick = -1
        return base

    # -- handlers -------------------------------------------------------------------------------
    def _nothing(self, msg: Message) -> None:
        msg.expect(0)

    def _offered(self) -> int:
        """Every device logs its writes (VHOST_F_LOG_ALL): its queues do it, whatever the device."""
        return self.device.features() | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL)

    def _get_features(self, msg: Message) -> bytes:
        msg.expect(0)
        return U64.pack(self._offered())

    def _set_features(self, msg: Message) -> None:
        features = msg.u64()
        offered = self._offered()
        if features & ~offered:
            raise ProtocolError(f"front-end acked features {features & ~offered:#x} that were not offered")
        if (features ^ self.features) & bit(VHOST_F_LOG_ALL):
            on = "on" if features & bit(VHOST_F_LOG_ALL) else "off"
            log.info("%s: logging writes for migration: %s", self.name, on)
        self.features = features
        self.device.ack_features(features)
        if not features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            for v in self.vrings:  # "rings are initialized in an enabled state"
                v.enabled = True
        self._log_queues("SET_FEATURES")  # VHOST_F_LOG_ALL starts or stops logging

    def _offered_protocol_features(self) -> int:
        """PROTOCOL_FEATURES, and RARP for a device that can announce itself (net)."""
        return PROTOCOL_FEATURES | (bit(VHOST_USER_PROTOCOL_F_RARP) if self.device.announces else 0)

    def _get_protocol_features(self, msg: Message) -> bytes:
        msg.expect(0)
        return U64.pack(self._offered_protocol_features())

    def _set_protocol_features(self, msg: Message) -> None:
        features = msg.u64()
        if features & ~self._offered_protocol_features():
            raise ProtocolError(f"front-end set protocol features {features:#x} that were not offered")
        self.protocol_features = features

    def _reset(self, msg: Message) -> None:
        msg.expect(0)
        for i, v in enumerate(self.vrings):
            self._stop(i)
            v.close_fds()
            self.vrings[i] = Vring()
        self.features = 0
        self.broken = None
        self._drop_log()
        self.device.reset()

    def _set_mem_table(self, msg: Message) -> None:
        if len(msg.payload) < MEM_TABLE_HEADER.size:
            raise ProtocolError("SET_MEM_TABLE: short payload")
        nregions, _ = MEM_TABLE_HEADER.unpack_from(msg.payload)
        if not 0 < nregions <= VHOST_MEMORY_BASELINE_NREGIONS or len(msg.fds) != nregions:
            raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions with {len(msg.fds)} fds")
        if len(msg.payload) < MEM_TABLE_HEADER.size + nregions * MEM_REGION.size:
            raise ProtocolError("SET_MEM_TABLE: payload shorter than its regions")
        regions = []
        try:
            for i, fd in enumerate(msg.fds):
                if not self.unsealed_memory:
                    _check_memory_fd(fd, f"SET_MEM_TABLE: region {i}'s memory file")
                gpa, size, uva, offset = MEM_REGION.unpack_from(msg.payload, 8 + i * MEM_REGION.size)
                regions.append(map_fd_region(fd, gpa, uva, size, offset))
            mem = GuestMemory(regions)
        except (OSError, ValueError, OverflowError, GuestMemoryError) as e:
            raise ProtocolError(f"SET_MEM_TABLE: cannot map guest memory: {e}") from e
        end = _memory_end(mem)
        if self.dirty_log is not None and end > self.dirty_log.covers:
            if self._logging():  # QEMU grows its log before its memory table, never after
                raise ProtocolError(
                    f"SET_MEM_TABLE: guest memory up to {end:#x} is beyond the dirty log, which covers "
                    f"{self.dirty_log.covers:#x}: send a larger log (SET_LOG_BASE) first"
                )
            self._drop_log()  # a log of an earlier migration: a new one comes before logging restarts
        self.mem = mem  # the old mappings go when the queues that view them do
        for i, v in enumerate(self.vrings):
            if v.queue is not None:
                v.base = v.queue.last_avail_idx
                v.queue = None
                self._start(i)

    def _set_log_base(self, msg: Message) -> bytes:
        """Map the front-end's dirty log (LOG_SHMFD: an fd, the log's size and offset in it),
        replacing any earlier one. It must cover guest memory ("from address 0 to the maximum of
        guest regions") and may exceed that by LOG_SLACK. QEMU waits for a reply of this type."""
        msg.expect(LOG.size, nfds=1)
        size, offset = LOG.unpack(msg.payload)
        if not self.protocol_features & bit(VHOST_USER_PROTOCOL_F_LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD: no log to map")
        if not msg.fds:
            if size:  # QEMU sends no fd for an empty log only
                raise ProtocolError(f"SET_LOG_BASE: a log of {size:#x} bytes without its fd")
            self._drop_log()
            self._log_queues("SET_LOG_BASE")
            return U64.pack(0)
        need = log_bytes_for(_memory_end(self.mem))
        if not need <= size <= need + LOG_SLACK:
            raise ProtocolError(
                f"SET_LOG_BASE: a log of {size:#x} bytes: guest memory needs {need:#x} "
                f"(at most {LOG_SLACK:#x} more is taken)"
            )
        fd = msg.fds[0]
        # Sealed even where unsealed guest memory is taken (the switch, supervisors): QEMU's log
        # always is, UML sends none, and a truncated log would kill the process with SIGBUS.
        _check_memory_fd(fd, "SET_LOG_BASE: the log file")
        try:
            dirty = SharedDirtyLog(fd, size, offset)
        except (OSError, ValueError, OverflowError, GuestMemoryError) as e:
            raise ProtocolError(f"SET_LOG_BASE: cannot map the log: {e}") from e
        old, self.dirty_log = self.dirty_log, dirty
        log.info("%s: dirty log of %d bytes mapped (guest addresses up to %#x)", self.name, size, dirty.covers)
        try:
            self._log_queues("SET_LOG_BASE")
        finally:
            if old is not None:
                old.close()
        return U64.pack(0)

    def _set_log_fd(self, msg: Message) -> None:
        """An eventfd by which we could tell the front-end the log changed: optional, and QEMU
        never sends it; it reads the log when it wants. Taken and closed (with the message)."""
        if len(msg.payload) not in (0, U64.size):
            raise ProtocolError(f"SET_LOG_FD: payload of {len(msg.payload)} bytes")
        msg.expect(len(msg.payload), nfds=1)

    def _set_backend_req_fd(self, msg: Message) -> None:
        msg.expect(0, nfds=1)
        if not msg.fds:
            raise ProtocolError("SET_BACKEND_REQ_FD without an fd")
        if self.backend_req_fd >= 0:
            os.close(self.backend_req_fd)
        self.backend_req_fd = msg.fds.pop()
        os.set_blocking(self.backend_req_fd, False)

    def _set_vring_num(self, msg: Message) -> None:
        msg.expect(VRING_STATE.size)
        index, num = VRING_STATE.unpack(msg.payload)
        if not 0 < num <= self.device.queue_size_max or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: bad queue size {num}")
        self._vring(index).num = num

    def _set_vring_addr(self, msg: Message) -> None:
        msg.expect(VRING_ADDR.size)
        index, flags, desc, used, avail, log = VRING_ADDR.unpack(msg.payload)
        if flags & ~bit(VHOST_VRING_F_LOG):
            raise ProtocolError(f"SET_VRING_ADDR: unknown flags {flags:#x}")
        v = self._vring(index)
        v.desc, v.used, v.avail, v.flags, v.log = desc, used, avail, flags, log
        self._log_queue(index, "SET_VRING_ADDR")  # QEMU starts and stops the used ring's logging here

    def _set_vring_base(self, msg: Message) -> None:
        msg.expect(VRING_STATE.size)
        index, num = VRING_STATE.unpack(msg.payload)
        self._vring(index).base = num & 0xFFFF

    def _get_vring_base(self, msg: Message) -> bytes:
        """Stop the ring. Nothing written to guest memory can follow the reply (migration's
        "no further update"): every device serves its requests synchronously, inside the call
        that pops them, and reaches a queue only through `queue()`, which has none once stopped."""
        msg.expect(VRING_STATE.size)
        index, _ = VRING_STATE.unpack(msg.payload)
        self._vring(index)
        return VRING_STATE.pack(index, self._stop(index))

    def _set_vring_fd(self, msg: Message) -> None:
        value = msg.u64()
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise ProtocolError(f"{msg.name}: unknown bits in {value:#x}")
        v = self._vring(value & VHOST_USER_VRING_IDX_MASK)
        nofd = bool(value & VHOST_USER_VRING_NOFD_MASK)
        if nofd == bool(msg.fds):
            raise ProtocolError(f"{msg.name}: fd presence does not match the NOFD flag")
        if nofd and msg.request == VHOST_USER_SET_VRING_KICK:
            raise ProtocolError("SET_VRING_KICK without an fd (polling mode) is not supported")
        name = {VHOST_USER_SET_VRING_KICK: "kick", VHOST_USER_SET_VRING_CALL: "call"}.get(msg.request, "err")
        if msg.fds:
            _check_notify_fd(msg.name, msg.fds[0], read=name == "kick")  # a refused fd closes with msg
        fd = msg.fds.pop() if msg.fds else -1
        old = getattr(v, name)
        if old >= 0:
            os.close(old)
        if fd >= 0:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # never block on a full pipe
        setattr(v, name, fd)
        if name == "call" and fd >= 0 and v.queue is not None:
            # One interrupt on a running ring's new call fd: a completion whose interrupt went to the
            # old one, or to none (QEMU sets the call fd after the kick fd, and a migration's source
            # may stop before it injects the last one), would leave the driver waiting for good; a
            # spurious one costs the driver a look at its used ring.
            _signal(fd)
        if name == "kick":
            if v.queue is not None:  # a new kick fd for a running ring keeps its position
                v.base = v.queue.last_avail_idx
            v.queue = None
            self._start(value & VHOST_USER_VRING_IDX_MASK)
            self.kick(value & VHOST_USER_VRING_IDX_MASK)  # serve what was queued before the kick fd

    def _set_vring_enable(self, msg: Message) -> None:
        msg.expect(VRING_STATE.size)
        index, enable = VRING_STATE.unpack(msg.payload)
        if enable > 1:
            raise ProtocolError(f"SET_VRING_ENABLE: bad value {enable}")
        self._vring(index).enabled = bool(enable)
        if enable:
            self.kick(index)

    def _get_queue_num(self, msg: Message) -> bytes:
        msg.expect(0)
        return U64.pack(len(self.vrings))

    def _config_request(self, msg: Message) -> tuple[int, int, bytes]:
        if len(msg.payload) < CONFIG_HEADER.size:
            raise ProtocolError(f"{msg.name}: short payload")
        offset, size, _flags = CONFIG_HEADER.unpack_from(msg.payload)
        data = msg.payload[CONFIG_HEADER.size :]
        if size > VHOST_USER_MAX_CONFIG_SIZE or offset > VHOST_USER_MAX_CONFIG_SIZE or len(data) != size:
            raise ProtocolError(f"{msg.name}: bad config range {offset}+{size}")
        return offset, size, data

    def _get_config(self, msg: Message) -> bytes:
        offset, size, _ = self._config_request(msg)
        space = self.device.config()
        chunk = space[offset : offset + size].ljust(size, b"\0")
        return msg.payload[: CONFIG_HEADER.size] + chunk

    def _set_config(self, msg: Message) -> None:
        offset, _, data = self._config_request(msg)
        self.device.write_config(offset, data)

    def _send_rarp(self, msg: Message) -> bytes | None:
        """SEND_RARP ("Front-end message types"): a migrated guest arrived; QEMU sends it from its
        announce (after an incoming migration, or QMP announce-self) for a guest that did not ack
        VIRTIO_NET_F_GUEST_ANNOUNCE. The payload's first 6 bytes are the MAC, the other 2 padding;
        no reply payload. A MAC the device refuses (not its own) costs that request only: with
        REPLY_ACK asked for, a non-zero ack says so."""
        msg.expect(U64.size)
        if not self.protocol_features & bit(VHOST_USER_PROTOCOL_F_RARP):
            raise ProtocolError("SEND_RARP without VHOST_USER_PROTOCOL_F_RARP negotiated")
        mac = msg.payload[:6]
        if self.device.announce(mac):
            return None
        self.refused_announcements += 1
        if self.refused_announcements == 1:  # the front-end may repeat it at will: once a connection
            log.warning("%s: SEND_RARP for %s not sent (not the device's MAC, or its link is down)",
                        self.name, mac.hex(":"))  # fmt: skip
        if msg.need_reply and self.protocol_features & bit(VHOST_USER_PROTOCOL_F_REPLY_ACK):
            return U64.pack(1)
        return None
