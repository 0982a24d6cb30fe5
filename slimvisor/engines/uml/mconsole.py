"""A client for UML's management console (arch/um/drivers/mconsole_kern.c, mconsole.h).

Requests are datagrams on the Unix socket UML announces at boot: `version`, `halt`, `reboot`,
`cad` (ctrl-alt-del: the guest's own shutdown path), `stop`/`go` (pause), `sysrq X`, `proc PATH`.
"""

from __future__ import annotations

import socket
import struct

from slimvisor.runtime.errors import SlimvisorError

# arch/um/include/shared/mconsole.h
MCONSOLE_MAGIC = 0xCAFEBABE
MCONSOLE_VERSION = 2
MCONSOLE_MAX_DATA = 512
_REQUEST = struct.Struct(f"<III{MCONSOLE_MAX_DATA}s")  # magic, version, len, data
_REPLY = struct.Struct(f"<III{MCONSOLE_MAX_DATA}s")  # err, more, len, data


class McError(SlimvisorError):
    """UML refused a request or did not answer."""


def send(client: socket.socket, sock_path: str, command: str, timeout: float = 5.0) -> str:
    """Send one mconsole command from `client` (a bound datagram socket UML can answer to);
    return UML's (possibly multi-part) answer."""
    data = command.encode()
    if len(data) >= MCONSOLE_MAX_DATA:
        raise McError(f"mconsole command too long: {command[:40]!r}...")
    client.settimeout(timeout)
    client.sendto(_REQUEST.pack(MCONSOLE_MAGIC, MCONSOLE_VERSION, len(data), data), sock_path)
    parts = []
    while True:
        try:
            packet = client.recv(_REPLY.size)
        except TimeoutError as e:
            raise McError(f"no answer from UML to {command!r}") from e
        if len(packet) < 12:
            raise McError("short mconsole reply")
        err, more, length = struct.unpack_from("<III", packet)
        parts.append(packet[12 : 12 + min(length, MCONSOLE_MAX_DATA)].split(b"\0", 1)[0])
        if not more:
            break
    text = b"".join(parts).decode(errors="replace")
    if err:
        raise McError(f"UML refused {command!r}: {text}")
    return text
