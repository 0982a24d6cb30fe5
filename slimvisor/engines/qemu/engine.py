"""QEMU as an engine (slimvisor.engines.base): its command line, its jail, its QMP events."""

from __future__ import annotations

import functools
import logging
import os
import re
import resource
import select
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimvisor.engines.base import LINUX_PANIC_LINE, EngineError, EngineEvent, Identity, Unsupported
from slimvisor.engines.qemu import accel, kernel
from slimvisor.engines.qemu.qmp import Qmp, QmpError
from slimvisor.jail import Bind, Jailed, JailSpec, jail_root, spawn
from slimvisor.jail.spawn import shared_libraries
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_VSOCK

if TYPE_CHECKING:
    from slimvisor.model.spec import DomainSpec

log = logging.getLogger("slimvisor.qemu")

QEMU = "/usr/bin/qemu-system-x86_64"
# Where Debian's QEMU looks for firmware and option ROMs (its --firmwarepath) and its loadable
# modules (accelerators, some devices): seen read-only in the jail.
DATA_DIRS = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu", "/usr/lib/x86_64-linux-gnu/qemu")
MAX_VCPUS = 64
JAIL_KERNEL, JAIL_INITRD, JAIL_QMP = "/boot/kernel", "/boot/initrd", "/sock/qmp"

# Bounds on one domain's QEMU (docs/security.md). Its guest RAM is a memfd (counted in the domain's
# memory cgroup, and by RLIMIT_FSIZE, which also bounds a memfd's size); the rest is QEMU itself.
MAX_TASKS = 1024
MAX_FILES = 1024
TMP_BYTES = 16 << 20
ENGINE_OVERHEAD = 256 << 20  # QEMU's own memory beyond guest RAM: its code, TCG's translation cache, I/O buffers
QMP_CONNECT_TIMEOUT = 30.0  # QEMU connects to its monitor before it starts the guest
# Migration: QEMU 7.2 caps it at 32 MiB/s unless told; here it is limited by the link (a Unix socket,
# ssh, a file) alone. The fd's name in QEMU (getfd).
MIGRATION_BANDWIDTH = 1 << 40
MIGRATION_FD = "migration"


def qemu_binary() -> str | None:
    return QEMU if os.path.exists(QEMU) else shutil.which("qemu-system-x86_64")


class QemuEngine:
    """HVM (q35, SeaBIOS; direct kernel boot or a disk) or PVH (microvm, the kernel's PVH entry)."""

    overhead = ENGINE_OVERHEAD
    # QEMU's virtio-balloon, driven over QMP; and QEMU's virtio-rng (its getrandom), because QEMU 7.2's
    # vhost-user-rng cannot migrate (QEMU marks it unmigratable) and a stateless device gains nothing
    # from a backend of ours.
    own_devices = frozenset({"balloon", "rng"})
    program = "QEMU"
    shutdown_via = "the ACPI power button"

    def __init__(self, kind: str) -> None:
        self.name = kind

    def check(self, spec: DomainSpec) -> None:
        from slimvisor.jail.spawn import JailError, check_binary
        from slimvisor.model.spec import SpecError

        binary = qemu_binary()
        if binary is None:
            raise SpecError(f"type={self.name} needs QEMU: apt-get install qemu-system-x86")
        try:
            check_binary(binary)
        except JailError as e:
            raise SpecError(f"{e}: it runs in every HVM domain's jail, so only root may change it") from None
        if not 1 <= spec.vcpus <= MAX_VCPUS:
            raise SpecError(f"vcpus={spec.vcpus}: from 1 to {MAX_VCPUS}")
        if spec.channels:
            raise SpecError(f"channel: type={self.name} domains have no virtio-console channels yet (QEMU 7.2 has no "
                            "vhost-user console device)")  # fmt: skip
        if not spec.kernel:
            if self.name == "pvh":
                raise SpecError("type=pvh needs a kernel")
            if not spec.disks:
                raise SpecError("type=hvm without a kernel boots from its first disk: give a disk")
            return
        if not os.path.isfile(spec.kernel):
            raise SpecError(f"kernel {spec.kernel}: no such file")
        if self.name == "hvm":  # the setup header is all direct boot needs
            if not kernel.is_bzimage(spec.kernel):
                raise SpecError(f"kernel {spec.kernel}: HVM direct boot takes a bzImage (an ELF vmlinux with the PVH "
                                'note boots as type="pvh")')  # fmt: skip
            return
        try:
            kernel.pvh_kernel(spec.kernel, kernel_cache())
        except kernel.KernelError as e:
            hint = ', or use type="hvm"' if str(e) == kernel.NO_PVH_NOTE else ""
            raise SpecError(f"kernel {spec.kernel}: {e}{hint}") from None

    def check_migratable(self, spec: DomainSpec) -> None:
        """QEMU migrates its own devices and vhost-user disks and NICs whose backend logs the pages it
        writes (slimvisor's do); QEMU 7.2 refuses the rest, so they are refused here, before anything moves."""
        if spec.vsock is not None:
            raise Unsupported("the domain has a vsock device (which also carries the guest's xenstore link), and QEMU "
                              "7.2 cannot migrate vhost-user-vsock (it marks it unmigratable): give the domain "
                              "xen_platform_pci=0 (no xenstore link) and no vsock to make it migratable")  # fmt: skip
        for i, disk in enumerate(spec.disks):
            if disk.backend != "blk":
                raise Unsupported(f"disk {i} ({disk.path}) is served by qemu-storage-daemon ({disk.format}), "
                                  "which holds its image until it exits: migration takes raw and overlay disks")

    def why_not_live(self, spec: DomainSpec) -> str | None:
        """Under TCG, QEMU 7.2 loses guest writes in live migrations: measured with plain QEMU and its
        own devices, no slimvisor code in the path, a third to all of the busy guests crashed after
        the move (q35 and microvm, one or more vCPUs, one TCG thread or several, any CPU model);
        copied stopped, none did. So under TCG a domain is copied stopped; under KVM, whose dirty
        log is the kernel's, it moves live."""
        if host_accel().name != "tcg":
            return None
        return ("QEMU 7.2 loses guest writes in live migrations under TCG (its own devices too): the domain is "
                "copied stopped instead (its downtime is the whole copy)")

    def start(self, spec: DomainSpec, rundir: Path, devices: list[tuple[Path, int]], initrd: str | None,
              who: Identity, stdin: int, stdout: int, paused: bool = False,
              incoming: bool = False) -> QemuInstance:  # fmt: skip
        return QemuInstance(self, spec, rundir, devices, initrd, who, stdin, stdout, paused, incoming)


HVM = QemuEngine("hvm")
PVH = QemuEngine("pvh")


def kernel_cache() -> Path:
    """Where PVH kernels extracted from bzImages are kept (root's cache: they run in every jail)."""
    from slimvisor.images.cache import cache_dir

    return cache_dir() / "pvh-kernels"


@functools.lru_cache(maxsize=1)
def host_accel() -> accel.Accel:
    return accel.choose()


def kernel_cmdline(spec: DomainSpec, acc: accel.Accel, engine: str) -> str:
    """The guest's own words, after the serial console (the last console= is the kernel's /dev/console)."""
    words = ["console=ttyS0"]
    if engine == "pvh" and acc.name == "tcg" and (tsc := accel.tcg_boot_args()):
        words.append(tsc)
    if spec.root:
        words.append(f"root={spec.root}")
    return " ".join([*words, *spec.cmdline.split()])


def qemu_argv(engine: str, spec: DomainSpec, devices: list[tuple[str, int]], boot_kernel: str | None,
              initrd: bool, paused: bool, acc: accel.Accel, incoming: bool = False) -> list[str]:  # fmt: skip
    """QEMU's command line inside its jail; `devices` are (jail path of the vhost-user socket, virtio id).
    `incoming`: the same machine, waiting (paused) for a migration's state (migrate-incoming)."""
    mem = f"{spec.ram_mib}M"
    machine = "microvm,acpi=on,pcie=on,memory-backend=mem" if engine == "pvh" else "q35,memory-backend=mem"
    argv = [
        QEMU, "-name", spec.name, "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-action", "panic=exit-failure", *acc.args(),
        "-machine", machine, "-smp", str(spec.vcpus), "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
        "-chardev", f"socket,id=qmp,path={JAIL_QMP}", "-mon", "chardev=qmp,mode=control",
        "-device", "pvpanic" if engine == "hvm" else "pvpanic-pci",
    ]  # fmt: skip
    if paused or incoming:
        argv.append("-S")
    if incoming:
        argv += ["-incoming", "defer"]
    if boot_kernel is not None:
        argv += ["-kernel", boot_kernel, "-append", kernel_cmdline(spec, acc, engine)]
        if initrd:
            argv += ["-initrd", JAIL_INITRD]
    nets = iter(enumerate(spec.nets))
    disks = 0
    for i, (path, virtio_id) in enumerate(devices):
        argv += ["-chardev", f"socket,id=vu{i},path={path}"]
        if virtio_id == VIRTIO_ID_BLOCK:
            # The first disk is the one SeaBIOS boots (xl's boot="c").
            boot = ",bootindex=1" if disks == 0 and boot_kernel is None else ""
            argv += ["-device", f"vhost-user-blk-pci,chardev=vu{i},num-queues=1{boot}"]
            disks += 1
        elif virtio_id == VIRTIO_ID_NET:
            index, net = next(nets)
            mac = ":".join(f"{b:02x}" for b in net.mac_for(spec.name, index))
            # vectors=0: QEMU 7.2's vhost-user net with MSI-X under TCG crashes (FIELD-NOTES); no option ROM
            argv += ["-netdev", f"vhost-user,id=net{index},chardev=vu{i}",
                     "-device", f"virtio-net-pci,netdev=net{index},mac={mac},vectors=0,romfile="]  # fmt: skip
        elif virtio_id == VIRTIO_ID_VSOCK:
            argv += ["-device", f"vhost-user-vsock-pci,chardev=vu{i}"]
        else:
            raise EngineError(f"virtio device {virtio_id} has no QEMU front-end here")
    if spec.rng:
        argv += ["-object", "rng-builtin,id=rng0", "-device", "virtio-rng-pci,rng=rng0"]
    if spec.balloon:
        deflate = ",deflate-on-oom=on" if spec.balloon_deflate_on_oom else ""
        argv += ["-device", f"virtio-balloon-pci,id=balloon0{deflate}"]
    return argv


def _give(path: Path, who: Identity) -> None:
    os.chown(path, who.uid, who.gid)
    os.chmod(path, 0o600)


class QemuInstance:
    """One QEMU in its jail (an engine Instance): events and requests over QMP."""

    def __init__(self, engine: QemuEngine, spec: DomainSpec, rundir: Path, devices: list[tuple[Path, int]],
                 initrd: str | None, who: Identity, stdin: int, stdout: int, paused: bool,
                 incoming: bool = False) -> None:  # fmt: skip
        self.name = spec.name
        self.tail = b""
        self.balloon, self.memory = spec.balloon, spec.ram_mib << 20
        binary = qemu_binary()
        assert binary is not None  # check() said so
        qmp_path = rundir / "qmp.sock"
        qmp_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.jail: Jailed | None = None
        try:
            listener.bind(str(qmp_path))
            listener.listen(1)
            _give(qmp_path, who)
            binds = [Bind(p, p) for p in (binary, *shared_libraries(binary))]
            binds += [Bind(d, d) for d in DATA_DIRS if os.path.isdir(d)]
            binds.append(Bind(str(qmp_path), JAIL_QMP))
            inner: list[tuple[str, int]] = []
            for sock, virtio_id in devices:
                _give(sock, who)
                inner.append((f"/sock/{len(inner)}-{sock.name}", virtio_id))
                binds.append(Bind(str(sock), inner[-1][0]))
            boot_kernel = None
            if spec.kernel:
                source = spec.kernel
                if engine.name == "pvh":
                    source = str(kernel.pvh_kernel(spec.kernel, kernel_cache()))
                binds.append(Bind(source, JAIL_KERNEL))
                boot_kernel = JAIL_KERNEL
                if initrd:
                    binds.append(Bind(initrd, JAIL_INITRD))
            root = jail_root(rundir)
            root.mkdir(mode=0o700, exist_ok=True)
            ram = spec.ram_mib << 20
            jail = JailSpec(
                name=spec.name, uid=who.uid, gid=who.gid, root=root, binds=binds, tmp_bytes=TMP_BYTES,
                rlimits={resource.RLIMIT_CORE: 0, resource.RLIMIT_NPROC: MAX_TASKS, resource.RLIMIT_NOFILE: MAX_FILES,
                         resource.RLIMIT_FSIZE: ram + TMP_BYTES},
                cgroup_procs=list(who.cgroup_procs), seccomp=qemu_filter(),
            )  # fmt: skip
            argv = qemu_argv(engine.name, spec, inner, boot_kernel, bool(initrd and boot_kernel), paused, host_accel(),
                             incoming)  # fmt: skip
            argv[0] = binary
            self.jail = spawn(jail, argv, {"PATH": "/nonexistent"}, stdin, stdout)
            self.pid, self.pidfd = self.jail.pid, self.jail.pidfd
            self.qmp = Qmp(self._accept(listener))
        except BaseException:
            if self.jail is not None:
                self.jail.close()
            raise
        finally:
            listener.close()
            qmp_path.unlink(missing_ok=True)
        self.started = False

    def _accept(self, listener: socket.socket) -> socket.socket:
        """QEMU's monitor connection, made while it creates its chardevs, before any device (so no
        vhost-user device of ours is waited for yet); or why it never came (QEMU exited: its
        message is on the console)."""
        assert self.jail is not None
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([listener.fileno(), self.pidfd], [], [], left)
            if listener.fileno() in ready:
                conn, _ = listener.accept()
                return conn
            if self.pidfd in ready:
                rc = self.jail.wait()
                how = f"signal {-rc}" if rc < 0 else f"status {rc}"
                raise EngineError(f"QEMU exited ({how}) before it started the guest")
        raise EngineError(f"QEMU did not connect its monitor within {QMP_CONNECT_TIMEOUT:.0f} s")

    # -- the Instance interface ------------------------------------------------------------------
    def event_fd(self) -> int:
        return self.qmp.fileno()

    def events(self) -> list[tuple[EngineEvent, str]]:
        try:
            raw = self.qmp.collect()
        except QmpError as e:  # a monitor that breaks the protocol cannot be driven: end the domain (a crash)
            log.warning("%s: %s: killing QEMU", self.name, e)
            assert self.jail is not None
            self.jail.kill()
            return []
        out = [e for event in raw for e in _translate(event)]
        if self.qmp.ready and not self.started:
            self.started = True
            out.insert(0, (EngineEvent.STARTED, ""))
        return out

    def console_seen(self, data: bytes) -> list[tuple[EngineEvent, str]]:
        """A panic that pvpanic could not report (its driver not loaded) still shows on the console."""
        self.tail = (self.tail + data)[-4096:]
        if m := LINUX_PANIC_LINE.search(self.tail):
            self.tail = b""
            return [(EngineEvent.PANICKED, m.group(1).decode(errors="replace").strip())]
        return []

    def pause(self, timeout: float = 5.0) -> None:
        self.qmp.send("stop")

    def resume(self) -> None:
        self.qmp.send("cont")

    def request_shutdown(self) -> None:
        """The ACPI power button (xl shutdown's fallback for HVM guests without PV drivers)."""
        self._execute("system_powerdown")

    def set_memory_target(self, nbytes: int) -> None:
        if not self.balloon:
            raise EngineError("this domain has no balloon (start it with --balloon)")
        if not 0 < nbytes <= self.memory:
            raise EngineError(f"the memory target must be from 1 byte to the domain's {self.memory >> 20} MiB")
        self._execute("balloon", {"value": nbytes})

    def vcpu_threads(self) -> list[int]:
        """The host tasks of QEMU's vCPU threads (QMP names them in QEMU's PID namespace: translated)."""
        cpus = self._execute("query-cpus-fast")
        inner = [int(c["thread-id"]) for c in cpus]
        return [host_tid(self.pid, tid) for tid in inner]

    # -- migration (docs/devel/migration in QEMU's tree; qapi/migration.json) ------------------------
    # Asynchronous, every command: while QEMU migrates, its migration thread talks vhost-user to the
    # devices this process serves (dirty logging, GET_VRING_BASE at the stop) while holding QEMU's
    # lock, so waiting here for any answer could deadlock both.
    def _prepare_migration(self, fd: int, failed: Callable[[str], None]) -> Callable[[Any, str | None], None]:
        def check(_: Any, error: str | None) -> None:
            if error is not None:
                failed(error)

        self.qmp.call("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}, check)
        self.qmp.call("getfd", {"fdname": MIGRATION_FD}, check, fd=fd)
        return check

    def migrate_out(self, fd: int, live: bool, downtime_ms: int, failed: Callable[[str], None]) -> None:
        check = self._prepare_migration(fd, failed)
        self.qmp.call("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH, "downtime-limit": downtime_ms},
                      check)  # fmt: skip
        if not live:
            self.qmp.send("stop")
        self.qmp.call("migrate", {"uri": f"fd:{MIGRATION_FD}"}, check)

    def migrate_in(self, fd: int, failed: Callable[[str], None]) -> None:
        check = self._prepare_migration(fd, failed)
        self.qmp.call("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"}, check)

    def migration_progress(self, done: Callable[[dict[str, object]], None]) -> None:
        def answer(ret: Any, error: str | None) -> None:
            done(_progress(ret) if error is None and isinstance(ret, dict) else {})

        self.qmp.call("query-migrate", None, answer)

    def cancel_migration(self) -> None:
        self.qmp.send("migrate_cancel")

    def wait(self) -> int:
        assert self.jail is not None
        return self.jail.wait()

    def close(self) -> None:
        if self.jail is not None:
            self.jail.close()
        if hasattr(self, "qmp"):
            self.qmp.close()

    def _execute(self, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        return self.qmp.execute(command, args, timeout)


def _translate(event: dict[str, Any]) -> list[tuple[EngineEvent, str]]:
    """QMP events (qapi/run-state.json) as engine events. With -no-reboot a guest reset is a
    SHUTDOWN whose reason is guest-reset, and QEMU then exits."""
    name, data = event.get("event"), event.get("data") or {}
    if name == "SHUTDOWN" and data.get("reason") == "guest-reset":
        return [(EngineEvent.REBOOT_REQUESTED, "")]
    if name == "MIGRATION" and isinstance(data.get("status"), str):
        return [(EngineEvent.MIGRATION, data["status"])]
    if name == "GUEST_PANICKED":
        info = data.get("info") or {}
        return [(EngineEvent.PANICKED, str(info.get("message") or "reported through pvpanic"))]
    return []


def _progress(ret: dict[str, Any]) -> dict[str, object]:
    """query-migrate's answer (MigrationInfo) as slimvisor reports it: figures only, checked."""
    ram: dict[str, Any] = ret["ram"] if isinstance(ret.get("ram"), dict) else {}
    out: dict[str, object] = {"status": str(ret.get("status", ""))}
    for key, source in (("bytes_sent", ram.get("transferred")), ("bytes_remaining", ram.get("remaining")),
                        ("bytes_total", ram.get("total")), ("dirty_pages_rate", ram.get("dirty-pages-rate")),
                        ("iterations", ram.get("dirty-sync-count")),
                        ("expected_downtime_ms", ret.get("expected-downtime")),
                        ("downtime_ms", ret.get("downtime")), ("total_time_ms", ret.get("total-time")),
                        ("setup_time_ms", ret.get("setup-time"))):  # fmt: skip
        if isinstance(source, int) and not isinstance(source, bool):
            out[key] = source
    if isinstance(ret.get("error-desc"), str):
        out["error"] = ret["error-desc"][:500]
    return out


_NSPID = re.compile(r"^NSpid:\s+(.*)$", re.MULTILINE)


def host_tid(pid: int, inner_tid: int) -> int:
    """The host id of the task whose id in `pid`'s PID namespace is `inner_tid` (/proc/*/status NSpid)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        if (m := _NSPID.search(status)) and m.group(1).split()[-1] == str(inner_tid):
            return int(task)
    raise EngineError(f"vCPU thread {inner_tid} of QEMU {pid} not found")


# The host system calls of Debian's QEMU 7.2 (qemu-system-x86_64 under TCG), measured with ftrace
# (scripts/uml-syscalls.py --comm qemu-system-x86) over HVM and PVH boots with a disk, rng and
# balloon, disk I/O, a reboot and a poweroff: these 55 names.
QEMU_SYSCALLS = (
    "access", "arch_prctl", "brk", "clock_nanosleep", "close", "connect", "eventfd2", "execve", "exit",
    "exit_group", "fcntl", "fstatfs", "ftruncate", "futex", "get_mempolicy", "getpeername", "getrandom",
    "getsockname", "gettid", "ioctl", "lseek", "madvise", "memfd_create", "mmap", "mprotect", "munmap",
    "newfstatat", "openat", "poll", "ppoll", "prctl", "pread64", "prlimit64", "read", "readlink", "readv",
    "recvmsg", "rseq", "rt_sigaction", "rt_sigprocmask", "sched_getaffinity", "seccomp", "sendmsg",
    "set_mempolicy", "set_robust_list", "set_tid_address", "setsockopt", "signalfd4", "socket", "socketpair",
    "statfs", "sysinfo", "write", "writev", "clone",
    # Not seen in those runs, allowed: returning from signal handlers and restarted calls; the clock
    # outside the vDSO; a balloon's discarded pages in a shared memfd (fallocate PUNCH_HOLE); KVM's
    # vCPU kicks (tgkill to its own threads); pipes and timers some devices make.
    "rt_sigreturn", "restart_syscall", "clock_gettime", "gettimeofday", "time", "fallocate", "tgkill", "getpid",
    "pipe2", "dup", "dup3", "sched_yield", "nanosleep", "timerfd_create", "timerfd_settime", "sendto", "recvfrom",
    "fstat", "uname", "membarrier",
    # The epoll main loop QEMU falls back to without io_uring.
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    # Migration, save and restore (measured as above over slimvisor migrate, save and restore): the
    # stream's socket options and its end.
    "getsockopt", "shutdown",
)  # fmt: skip
# Probed for and done without: io_uring (QEMU's main loop falls back to ppoll) answers ENOSYS, a
# kernel attack surface a domain does not need.
QEMU_ABSENT = ("io_uring_setup", "io_uring_enter", "io_uring_register")


@functools.lru_cache(maxsize=1)
def qemu_filter() -> bytes:
    from slimvisor.jail.seccomp import cached_allowlist

    return cached_allowlist(QEMU_SYSCALLS, absent=QEMU_ABSENT)
