"""Xenstore's wire format (Xen xen/include/public/io/xs_wire.h, docs/misc/xenstore.txt), sans-IO.

Every message in either direction is a 16-byte `struct xsd_sockmsg` header and up to
XENSTORE_PAYLOAD_MAX bytes of payload, mostly NUL-terminated strings. `MessageReader` asks for
exactly the bytes of the current message; a header announcing a larger payload raises `WireError`,
which ends that connection only (xenstored kills such a client too). Anything wrong *inside* a
well-framed payload is a `XenstoreError`, answered with an ERROR reply.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from slimvisor.runtime.errors import SlimvisorError

# "enum xsd_sockmsg_type"
XS_CONTROL = 0
XS_DEBUG = XS_CONTROL  # the old name of XS_CONTROL
XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_INTRODUCE = 8
XS_RELEASE = 9
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_IS_DOMAIN_INTRODUCED = 17
XS_RESUME = 18
XS_SET_TARGET = 19
# 20 was XS_RESTRICT, which xenstored no longer implements
XS_RESET_WATCHES = 21
XS_DIRECTORY_PART = 22
XS_INVALID = 0xFFFF  # "Guaranteed to remain an invalid type"

TYPE_NAMES = {v: k[len("XS_") :] for k, v in globals().items() if k.startswith("XS_") and k != "XS_DEBUG"}

# "struct xsd_errors": the errno names an ERROR reply may carry; libxenstore reads any other as EINVAL
XSD_ERRORS = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
)

# "enum xs_watch_type": the strings of a WATCH_EVENT payload
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

XENSTORE_PAYLOAD_MAX = 4096  # "Violating this is very bad"
XENSTORE_ABS_PATH_MAX = 3072  # "Violating these just gets you an error back"
XENSTORE_REL_PATH_MAX = 2048

# xen.h: domain ids from here on are special (DOMID_SELF, DOMID_IO, ...), never a real domain
DOMID_FIRST_RESERVED = 0x7FF0

HEADER = struct.Struct("<IIII")  # type, req_id, tx_id, len

ACK = b"OK\0"  # "Where no reply payload format is specified below"


class WireError(SlimvisorError):
    """The peer broke the framing; the connection must end (the store is untouched)."""


class XenstoreError(SlimvisorError):
    """A request failed: the reply is an ERROR carrying this errno name (one of `XSD_ERRORS`)."""

    def __init__(self, name: str, detail: str = "") -> None:
        assert name in XSD_ERRORS, name
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


# "GET_PERMS / SET_PERMS": the letter of <perm-as-string>, as xenstore_lib.h's XS_PERM_* bits
XS_PERM_NONE = 0x00
XS_PERM_READ = 0x01
XS_PERM_WRITE = 0x02
XS_PERM_OWNER = 0x08  # internal to xenstored: what only the owner (or a privileged domain) may do
PERM_LETTERS = {"n": XS_PERM_NONE, "r": XS_PERM_READ, "w": XS_PERM_WRITE, "b": XS_PERM_READ | XS_PERM_WRITE}


class Perm(NamedTuple):
    """One entry of a node's permission list: `access` ("n", "r", "w" or "b") for `domid`."""

    domid: int
    access: str

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @property
    def bits(self) -> int:
        return PERM_LETTERS[self.access]

    @classmethod
    def parse(cls, text: str) -> Perm:
        """Read a <perm-as-string> such as "r1"; decimal only, and a real 16-bit domid."""
        domid = text[1:]
        if text[:1] not in PERM_LETTERS or not domid.isascii() or not domid.isdigit() or int(domid) > 0xFFFF:
            raise XenstoreError("EINVAL", f"bad permission {text!r}")
        return cls(int(domid), text[0])


def decode(raw: bytes) -> str:
    """Bytes from the wire as text; invalid UTF-8 survives (paths reject it, tokens echo it back)."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def join(strings: Iterable[str | bytes]) -> bytes:
    """Strings, each followed by a NUL: the payload shape `<foo>|*` of xenstore.txt."""
    return b"".join((encode(s) if isinstance(s, str) else s) + b"\0" for s in strings)


def encode_perms(perms: Iterable[Perm]) -> bytes:
    return join(str(p) for p in perms)


def decode_perms(strings: Sequence[str]) -> list[Perm]:
    return [Perm.parse(s) for s in strings]


@dataclass(frozen=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def strings(self) -> list[str]:
        """The NUL-terminated strings of the payload; bytes after the last NUL are ignored (as get_strings)."""
        return [decode(s) for s in self.payload.split(b"\0")[:-1]]

    def args(self, count: int, exact: bool = False) -> list[str]:
        """The first `count` strings; fewer (or, if `exact`, more) is EINVAL."""
        strings = self.strings()
        if len(strings) < count or (exact and len(strings) != count):
            raise XenstoreError("EINVAL", f"{self.name}: {len(strings)} strings, expected {count}")
        return strings[:count]

    def onearg(self) -> str:
        """The payload must be exactly one string and its NUL (xenstored's onearg)."""
        if not self.payload.endswith(b"\0") or b"\0" in self.payload[:-1]:
            raise XenstoreError("EINVAL", f"{self.name}: expected one string")
        return decode(self.payload[:-1])


def request(type: int, payload: bytes = b"", req_id: int = 0, tx_id: int = 0) -> bytes:
    """Encode a client request (tests and tools speak as clients)."""
    return Message(type, req_id, tx_id, payload).encode()


def reply(msg: Message, payload: bytes) -> bytes:
    """A reply echoes the request's type, req_id and tx_id."""
    return Message(msg.type, msg.req_id, msg.tx_id, payload).encode()


def error_reply(msg: Message, name: str) -> bytes:
    """ERROR copies only req_id and tx_id; the errno name is sent as a string, not a number."""
    return Message(XS_ERROR, msg.req_id, msg.tx_id, join([name])).encode()


def watch_event(path: str, token: str) -> bytes | None:
    """An unsolicited WATCH_EVENT (req_id and tx_id 0), or None if too long to send (xenstored drops it)."""
    payload = join([path, token])
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        return None
    return Message(XS_WATCH_EVENT, 0, 0, payload).encode()


class MessageReader:
    """Incremental parser: call `wanted()`, read at most that many bytes, `feed()` them."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int, int] | None = None

    def wanted(self) -> int:
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[3] - len(self._buf)

    def feed(self, data: bytes) -> Message | None:
        if len(data) > self.wanted():
            raise WireError("read past the end of a message")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER.size:
                return None
            header: tuple[int, int, int, int] = HEADER.unpack(self._buf)
            if header[3] > XENSTORE_PAYLOAD_MAX:
                raise WireError(f"payload of {header[3]} bytes is larger than {XENSTORE_PAYLOAD_MAX}")
            self._header = header
            self._buf.clear()
        if len(self._buf) < self._header[3]:
            return None
        msg = Message(self._header[0], self._header[1], self._header[2], bytes(self._buf))
        self._header, self._buf = None, bytearray()
        return msg

    def feed_all(self, data: bytes) -> list[Message]:
        """Feed a run of bytes that may hold several messages (for clients reading what a socket had)."""
        out = []
        while data:
            n = self.wanted()
            msg = self.feed(data[:n])
            data = data[n:]
            if msg is not None:
                out.append(msg)
        return out
