"""The PV engine: a domain is a User-Mode Linux process tree.

UML is mainline Linux built to run as host processes, so it needs no VMX/SVM. This module turns a
`DomainSpec` into a linux.uml command line, starts it in its own process group, and decodes
what UML reports on its mconsole notify socket (arch/um/include/shared/mconsole.h): one
MCONSOLE_SOCKET message per boot (a reboot re-execs UML and boots again), MCONSOLE_PANIC on panic.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from slimvisor.domain.spec import DomainSpec

# arch/um/include/shared/mconsole.h
MCONSOLE_MAGIC = 0xCAFEBABE
MCONSOLE_VERSION = 2
_NOTIFY = struct.Struct("<IIii")  # magic, version, type, len; then data[len]


class McNotify(IntEnum):
    MCONSOLE_SOCKET = 0
    MCONSOLE_PANIC = 1
    MCONSOLE_HANG = 2
    MCONSOLE_USER_NOTIFY = 3


@dataclass(frozen=True)
class Notification:
    kind: McNotify
    data: str


def parse_notification(packet: bytes) -> Notification | None:
    """One mconsole notify datagram, or None when it is not one (never trust the sender)."""
    if len(packet) < _NOTIFY.size:
        return None
    magic, version, kind, length = _NOTIFY.unpack_from(packet)
    if magic != MCONSOLE_MAGIC or version != MCONSOLE_VERSION or kind not in McNotify._value2member_map_:
        return None
    data = packet[_NOTIFY.size : _NOTIFY.size + max(0, length)]
    return Notification(McNotify(kind), data.split(b"\0", 1)[0].decode(errors="replace"))


def uml_argv(spec: DomainSpec, rundir: Path, devices: list[tuple[Path, int]], initrd: str | None) -> list[str]:
    """The linux.uml command line for a domain whose console is on fds 0 and 1."""
    argv = [
        spec.kernel,
        f"mem={spec.memory_mib}M",
        f"umid={spec.name}",
        f"uml_dir={rundir}",
        f"mconsole=notify:{rundir / 'notify.sock'}",
        "con=null",
        "con0=fd:0,fd:1",
        "ssl=null",
    ]
    if initrd:
        argv.append(f"initrd={initrd}")
    if spec.root:
        argv.append(f"root={spec.root}")
    argv += [f"virtio_uml.device={sock}:{virtio_id}" for sock, virtio_id in devices]
    return argv + spec.cmdline.split()


_PR_SET_PDEATHSIG = 1


def _child_setup(then: Callable[[], None] | None = None) -> None:
    """In the child before exec: no core files, die with slimvisor, then the caller's `then`."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if then is not None:
        then()


class UmlProcess:
    """One running linux.uml and its helper processes (one process group)."""

    def __init__(self, argv: list[str], rundir: Path, stdin: int, stdout: int,
                 in_child: Callable[[], None] | None = None) -> None:  # fmt: skip
        """`in_child` runs in the child before exec (e.g. joining the domain's cgroup, so that no
        process UML forks early escapes it)."""
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(rundir / "notify.sock"))
        self.notify.setblocking(False)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": "/dev/shm"}
        self.proc = subprocess.Popen(
            argv, stdin=stdin, stdout=stdout, stderr=stdout, env=env, cwd=rundir,
            start_new_session=True, preexec_fn=lambda: _child_setup(in_child), close_fds=True,
        )  # fmt: skip
        self.pidfd = os.pidfd_open(self.proc.pid)

    def notifications(self) -> list[Notification]:
        out: list[Notification] = []
        while True:
            try:
                packet = self.notify.recv(4096)
            except BlockingIOError:
                return out
            n = parse_notification(packet)
            if n is not None:
                out.append(n)

    def kill(self) -> None:
        """Kill the whole UML process tree and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        os.close(self.pidfd)
        self.notify.close()
