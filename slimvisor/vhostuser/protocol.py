"""vhost-user wire format (QEMU docs/interop/vhost-user.rst), sans-IO.

`MessageReader` turns bytes and passed fds into `Message`s without touching a socket; it asks
for exactly the bytes of the current message so fds can never be attributed to the wrong one.
Payload layouts are parsed here with their sizes checked; a malformed message raises
`ProtocolError`, which ends that connection only.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from slimvisor.runtime.errors import SlimvisorError

# "Message types": front-end requests
VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_LOG_BASE = 6
VHOST_USER_SET_LOG_FD = 7
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_SEND_RARP = 19
VHOST_USER_SET_BACKEND_REQ_FD = 21
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25
VHOST_USER_RESET_DEVICE = 34
VHOST_USER_GET_MAX_MEM_SLOTS = 36
VHOST_USER_SET_STATUS = 39
VHOST_USER_GET_STATUS = 40

# "Back-end message types": sent on the channel of SET_BACKEND_REQ_FD
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = 2

REQUEST_NAMES = {
    v: k[len("VHOST_USER_") :]
    for k, v in globals().items()
    if k.startswith("VHOST_USER_") and not k.startswith("VHOST_USER_BACKEND_")
}

# "Protocol features"
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1
VHOST_USER_PROTOCOL_F_RARP = 2
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_BACKEND_REQ = 5
VHOST_USER_PROTOCOL_F_CONFIG = 9
VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13

# "Feature bits": the virtio feature bit that announces protocol features
VHOST_USER_F_PROTOCOL_FEATURES = 30
# "Migration": the vhost feature bit of a back-end that logs its writes; acked, logging is on
VHOST_F_LOG_ALL = 26
# "Migration": a vring address flag (bit number): log the used ring's writes at its log address
VHOST_VRING_F_LOG = 0

# "Message specification": header flags
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

# "Vring descriptor indices": the u64 payload of SET_VRING_KICK/CALL/ERR
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

VHOST_MEMORY_BASELINE_NREGIONS = 8  # "Memory regions description"
VHOST_USER_MAX_CONFIG_SIZE = 256  # "Device configuration space"

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log
MEM_REGION = struct.Struct("<QQQQ")  # guest address, size, user address, mmap offset
MEM_TABLE_HEADER = struct.Struct("<II")  # num regions, padding
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
LOG = struct.Struct("<QQ")  # "Log description": mmap size, mmap offset

MAX_PAYLOAD = 4096
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS


class ProtocolError(SlimvisorError):
    """The front-end sent something the protocol does not allow; the connection must end."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.request, f"request {self.request}")

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def expect(self, size: int, nfds: int = 0) -> None:
        """Check the payload size and number of fds a request of this type must carry."""
        if len(self.payload) != size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, expected {size}")
        if len(self.fds) > nfds:
            raise ProtocolError(f"{self.name}: {len(self.fds)} file descriptors, expected at most {nfds}")

    def u64(self) -> int:
        self.expect(U64.size, nfds=1)
        return int(U64.unpack(self.payload)[0])


def reply(msg: Message, payload: bytes) -> bytes:
    return HEADER.pack(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, len(payload)) + payload


def request(req: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Encode a front-end request (tests and tools speak as a front-end)."""
    return HEADER.pack(req, VHOST_USER_VERSION | flags, len(payload)) + payload


class MessageReader:
    """Incremental parser: call `wanted()`, read at most that many bytes, `feed()` them."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None

    def wanted(self) -> int:
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[2] - len(self._buf)

    def feed(self, data: bytes, fds: list[int] = []) -> Message | None:  # noqa: B006 - never mutated
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise ProtocolError(f"too many file descriptors ({len(self._fds)}) in one message")
        if len(data) > self.wanted():
            raise ProtocolError("read past the end of a message")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER.size:
                return None
            req, flags, size = HEADER.unpack(self._buf)
            if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
                raise ProtocolError(f"unsupported vhost-user version {flags & VHOST_USER_VERSION_MASK}")
            if flags & VHOST_USER_REPLY_MASK:
                raise ProtocolError("a front-end request must not carry the reply flag")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"payload of {size} bytes is larger than {MAX_PAYLOAD}")
            self._header = (req, flags, size)
            self._buf.clear()
        if len(self._buf) < self._header[2]:
            return None
        msg = Message(self._header[0], self._header[1], bytes(self._buf), self._fds)
        self._header, self._buf, self._fds = None, bytearray(), []
        return msg

    def close(self) -> None:
        """Close fds of a message that never completed."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
