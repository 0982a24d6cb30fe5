"""The PV engine: a domain is a User-Mode Linux process tree.

UML is mainline Linux built to run as host processes, so it needs no VMX/SVM. This module turns a
`DomainSpec` into a linux.uml command line, starts it in a jail of its own (slimvisor.jail), and decodes
what UML reports on its mconsole notify socket (arch/um/include/shared/mconsole.h): one
MCONSOLE_SOCKET message per boot (a reboot re-execs UML and boots again), MCONSOLE_PANIC on panic.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

from slimvisor.engines.base import LINUX_PANIC_LINE, EngineError, EngineEvent, Identity, Unsupported
from slimvisor.engines.uml.mconsole import MCONSOLE_MAGIC, MCONSOLE_VERSION
from slimvisor.jail import Bind, Jailed, JailSpec, jail_root, spawn
from slimvisor.jail.spawn import shared_libraries

if TYPE_CHECKING:
    from slimvisor.model.spec import DomainSpec

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


# UML options that act on the host (arch/um: every __uml_setup, `linux.uml --help`): a guest's
# command line never carries them, or a domain config could open host files, sockets or devices.
# (`debug` is UML's too, but a no-op there, and the generic kernel's loglevel switch: allowed.)
HOST_OPTIONS = re.compile(
    r"(mem|iomem|initrd|umid|uml_dir|mconsole|con\d*|ssl\d*|ssl-non-raw|ubd.*|udb.*|fake_ide|eth\d+|vec\d+(:.*)?"
    r"|hostfs|xterm|virtio_uml\..*|nosysemu|noreboot|stderr|dsync|tmpdir|time-travel.*|seccomp|aio|noaio"
    r"|mode|skas\d*|ncpus|nosmp|-.*)",
    re.IGNORECASE,
)


def host_options(cmdline: str) -> list[str]:
    """The words of a kernel command line that UML's host side would take."""
    return [w for w in cmdline.split() if HOST_OPTIONS.fullmatch(w.split("=", 1)[0]) is not None]


def refusal(what: str, word: str) -> str:
    return (f"{what}: {word!r} is a User-Mode Linux host option; a domain's command line cannot set it "
            "(slimvisor sets what the host side needs)")  # fmt: skip


def is_uml_kernel(path: str) -> bool:
    """A User-Mode Linux binary: an ELF executable that carries UML's own help text.

    The answer is kept per (path, size, mtime, inode): a daemon creating many domains from one
    kernel reads its megabytes once, and a replaced file is read again.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _is_uml_kernel(path, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _is_uml_kernel(path: str, size: int, mtime_ns: int, inode: int) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return False
            needle, tail = b"User Mode Linux", b""
            while chunk := f.read(1 << 20):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle) :]
    except OSError:
        return False
    return False


def check(spec: DomainSpec) -> None:
    """What UML needs of a spec on this host: a UML kernel only root may change, no host options."""
    from slimvisor.jail.spawn import JailError, check_binary
    from slimvisor.model.spec import SpecError

    if spec.vcpus != 1:
        raise SpecError(f"vcpus={spec.vcpus}: PV domains (User-Mode Linux) have exactly one vCPU; "
                        "type=\"pvh\" or \"hvm\" domains have more")  # fmt: skip
    if not os.path.isfile(spec.kernel):
        raise SpecError(f"kernel {spec.kernel}: no such file")
    if not os.access(spec.kernel, os.X_OK):
        raise SpecError(f"kernel {spec.kernel}: not executable")
    if not is_uml_kernel(spec.kernel):
        raise SpecError(f"kernel {spec.kernel}: not a User-Mode Linux kernel (PV domains run linux.uml)")
    try:
        check_binary(spec.kernel)
    except JailError as e:
        raise SpecError(f"kernel {e}: it runs in every domain's jail, so only root may change it") from None
    for what, text in (("cmdline", spec.cmdline), ("root", spec.root or "")):
        if bad := host_options(text):
            raise SpecError(refusal(what, bad[0]))


# Where things are inside a UML jail.
JAIL_INITRD = "/boot/initrd"
JAIL_NOTIFY = "/sock/notify"
JAIL_UML_DIR = "/tmp"


def uml_argv(spec: DomainSpec, devices: list[str], virtio_ids: list[int], initrd: bool) -> list[str]:
    """The linux.uml command line inside its jail: console on fds 0 and 1, `devices` the jail paths
    of its vhost-user sockets. The guest's own words come last and carry no host option (spec.check)."""
    argv = [
        spec.kernel,
        f"mem={spec.ram_mib}M",
        f"umid={spec.name}",
        f"uml_dir={JAIL_UML_DIR}",
        f"mconsole=notify:{JAIL_NOTIFY}",
        "con=null",
        "con0=fd:0,fd:1",
        "ssl=null",
    ]
    if initrd:
        argv.append(f"initrd={JAIL_INITRD}")
    if spec.root:
        argv.append(f"root={spec.root}")
    argv += [f"virtio_uml.device={sock}:{virtio_id}" for sock, virtio_id in zip(devices, virtio_ids, strict=True)]
    return argv + [XEN_CONSOLES.get(word, word) for word in spec.cmdline.split()]


# A Xen PV guest's console is hvc0 (xvc0 in old kernels); UML's is its first line, tty0 (con0).
XEN_CONSOLES = {"console=hvc0": "console=tty0", "console=xvc0": "console=tty0"}


# Bounds on one domain's engine (docs/security.md): tasks (host processes and threads: UML runs each
# guest address space as a host process), open files, and the /tmp that holds its memory file.
MAX_TASKS = 1024
MAX_FILES = 1024
TMP_SLACK = 16 << 20  # beyond guest RAM, for UML's pid file and mconsole socket
# UML's memory file also spans the "exec-shield gap" between its text and its memory (520 MiB for
# Debian's 6.1), which it leaves sparse: the tmpfs size bounds the space, this bounds the file size.
EXEC_SHIELD_GAP = 2 << 30


def tmp_bytes(spec: DomainSpec) -> int:
    return (spec.ram_mib << 20) + TMP_SLACK


def _give(path: Path, who: Identity) -> None:
    """Only the domain's uid (and root) may connect to a socket of its jail."""
    os.chown(path, who.uid, who.gid)
    os.chmod(path, 0o600)


# What UML prints when the guest asks to reboot (a panic: LINUX_PANIC_LINE; its mconsole reports that too).
REBOOT_LINE = b"reboot: Restarting system"


class UmlEngine:
    """The PV engine (slimvisor.engines.base.Engine): User-Mode Linux driven through its mconsole."""

    name = "uml"
    overhead = 128 << 20  # UML's text, page tables and the stubs its guest processes run in
    own_devices: frozenset[str] = frozenset()
    program = "UML"
    shutdown_via = "ctrl-alt-del"

    def check(self, spec: DomainSpec) -> None:
        check(spec)

    def check_migratable(self, spec: DomainSpec) -> None:
        raise Unsupported(NOT_MIGRATABLE)

    def why_not_live(self, spec: DomainSpec) -> str | None:
        return NOT_MIGRATABLE

    def start(self, spec: DomainSpec, rundir: Path, devices: list[tuple[Path, int]], initrd: str | None,
              who: Identity, stdin: int, stdout: int, paused: bool = False,
              incoming: bool = False) -> UmlProcess:  # fmt: skip
        """`paused` is the caller's to do: UML stops through its mconsole, once that is up."""
        if incoming:
            raise Unsupported(NOT_MIGRATABLE)
        return UmlProcess(spec, rundir, devices, initrd, who, stdin, stdout)


UML = UmlEngine()
NOT_MIGRATABLE = (
    "PV domains (User-Mode Linux) cannot be saved or migrated: UML's guest processes are host processes it "
    "ptraces, and a checkpointer (CRIU) cannot dump traced tasks; run the domain as type=\"pvh\" or \"hvm\""
)


class UmlProcess:
    """One running linux.uml in its jail, with its helper processes (one PID namespace): an
    engine Instance (slimvisor.engines.base)."""

    def __init__(self, spec: DomainSpec, rundir: Path, devices: list[tuple[Path, int]], initrd: str | None,
                 who: Identity, stdin: int, stdout: int) -> None:  # fmt: skip
        self.name = spec.name
        notify = rundir / "notify.sock"
        notify.unlink(missing_ok=True)  # left by a previous incarnation that was killed
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.notify.bind(str(notify))
            self.notify.setblocking(False)
            binds = [Bind(p, p) for p in (spec.kernel, *shared_libraries(spec.kernel))]
            binds.append(Bind(str(notify), JAIL_NOTIFY))
            _give(notify, who)
            inner: list[str] = []
            for sock, _ in devices:
                _give(sock, who)
                inner.append(f"/sock/{len(inner)}-{sock.name}")
                binds.append(Bind(str(sock), inner[-1]))
            if initrd:
                binds.append(Bind(initrd, JAIL_INITRD))
            root = jail_root(rundir)
            root.mkdir(mode=0o700, exist_ok=True)
            jail = JailSpec(
                name=spec.name, uid=who.uid, gid=who.gid, root=root, binds=binds, tmp_bytes=tmp_bytes(spec),
                rlimits={resource.RLIMIT_CORE: 0, resource.RLIMIT_NPROC: MAX_TASKS, resource.RLIMIT_NOFILE: MAX_FILES,
                         resource.RLIMIT_FSIZE: tmp_bytes(spec) + EXEC_SHIELD_GAP},
                cgroup_procs=list(who.cgroup_procs), seccomp=uml_filter(),
            )  # fmt: skip
            argv = uml_argv(spec, inner, [vid for _, vid in devices], initrd is not None)
            self.jail: Jailed = spawn(jail, argv, {"PATH": "/nonexistent", "TMPDIR": JAIL_UML_DIR}, stdin, stdout)
        except BaseException:
            self.notify.close()
            raise
        self.pid = self.jail.pid
        self.pidfd = self.jail.pidfd
        self.tail = b""  # the end of console output, to spot panic and reboot lines across reads

    # -- the Instance interface ------------------------------------------------------------------
    def event_fd(self) -> int:
        return self.notify.fileno()

    def events(self) -> list[tuple[EngineEvent, str]]:
        kinds = {McNotify.MCONSOLE_SOCKET: EngineEvent.STARTED, McNotify.MCONSOLE_PANIC: EngineEvent.PANICKED}
        return [(kinds[n.kind], n.data) for n in self.notifications() if n.kind in kinds]

    def console_seen(self, data: bytes) -> list[tuple[EngineEvent, str]]:
        self.tail = (self.tail + data)[-4096:]
        out = []
        if m := LINUX_PANIC_LINE.search(self.tail):
            out.append((EngineEvent.PANICKED, m.group(1).decode(errors="replace").strip()))
        if REBOOT_LINE in self.tail:
            out.append((EngineEvent.REBOOT_REQUESTED, ""))
        return out

    def pause(self, timeout: float = 5.0) -> None:
        try:
            self._request("stop", timeout)
        except EngineError as e:
            # An earlier stop whose answer came too late (UML handles it from a work queue, slow
            # early in boot) did stop it: a retry must not leave it stopped yet "running".
            if "Already stopped" not in str(e):
                raise

    def resume(self) -> None:
        self._request("go")

    def request_shutdown(self) -> None:
        self._request("cad")

    def vcpu_threads(self) -> list[int]:
        """UML's one vCPU runs in its main process and guest processes in children of it."""
        import psutil

        try:
            return [self.pid, *(c.pid for c in psutil.Process(self.pid).children(recursive=True))]
        except psutil.Error:
            return [self.pid]

    def set_memory_target(self, nbytes: int) -> None:
        raise Unsupported("UML has no balloon of its own: slimvisor's balloon device serves it")

    def migrate_out(self, fd: int, live: bool, downtime_ms: int, failed: Callable[[str], None]) -> None:
        raise Unsupported(NOT_MIGRATABLE)

    def migrate_in(self, fd: int, failed: Callable[[str], None]) -> None:
        raise Unsupported(NOT_MIGRATABLE)

    def migration_progress(self, done: Callable[[dict[str, object]], None]) -> None:
        raise Unsupported(NOT_MIGRATABLE)

    def cancel_migration(self) -> None:
        raise Unsupported(NOT_MIGRATABLE)

    def _request(self, command: str, timeout: float = 5.0) -> None:
        from slimvisor.engines.uml import mconsole

        try:
            self.mconsole(command, timeout)
        except (mconsole.McError, OSError) as e:
            raise EngineError(f"mconsole {command}: {e}") from e

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

    def mconsole(self, command: str, timeout: float = 5.0) -> str:
        """One mconsole request. UML answers to the sender's address, resolved in its own namespaces:
        the client socket is made in the jail's network namespace and bound to an abstract address."""
        from slimvisor.engines.uml import mconsole

        with self.jail.netns_socket() as client:
            client.bind("")  # autobind: an abstract address, reachable only from inside that namespace
            return mconsole.send(client, self.jail.path(f"{JAIL_UML_DIR}/{self.name}/mconsole"), command, timeout)

    def wait(self) -> int:
        return self.jail.wait()

    def close(self) -> None:
        """Kill the whole UML process tree (its PID namespace: the kernel kills the rest) and reap it."""
        self.jail.close()
        self.notify.close()


# The host system calls of UML 6.1 (Debian's linux.uml) and of every process it forks: its helpers,
# its boot-time probes and the stubs in which guest userspace runs. Measured with ftrace
# (scripts/uml-syscalls.py) over boot, vhost-user disk/net/rng/balloon/vsock/console I/O, a stress
# run, mconsole, reboot, poweroff and panic: these 58 names, and no other, in every run. Guest
# system calls never reach the filter: PTRACE_SYSEMU stops and skips them before seccomp runs.
# getppid only appears because UML's boot check rewrites a probe's getpid into it under ptrace.
UML_SYSCALLS = (
    "access", "arch_prctl", "bind", "brk", "clone", "close", "connect", "epoll_create", "epoll_ctl", "epoll_wait",
    "eventfd2", "execve", "exit_group", "fcntl", "fsync", "getdents64", "getpid", "getppid", "getrandom", "ioctl",
    "kill", "lseek", "madvise", "mkdir", "mmap", "modify_ldt", "mprotect", "munmap", "newfstatat", "openat", "poll",
    "pread64", "prlimit64", "ptrace", "read", "recvfrom", "rmdir", "rseq", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "rt_sigsuspend", "sendmsg", "sendto", "set_robust_list", "set_tid_address", "setsid",
    "sigaltstack", "socket", "socketpair", "statfs", "timer_create", "timer_gettime", "timer_settime", "uname",
    "unlink", "wait4", "write",
    # Not seen here but allowed: the clock calls go through the vDSO on this host, and become real
    # system calls on a host whose clocksource has no vDSO support; exit ends a clone()d helper.
    "clock_gettime", "gettimeofday", "time", "exit",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def uml_filter() -> bytes:
    from slimvisor.jail.seccomp import cached_allowlist

    return cached_allowlist(UML_SYSCALLS)
