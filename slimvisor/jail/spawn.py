"""Start one engine process in a jail of its own.

What the child does between clone and exec, in this order (each step needs the ones before):
join the domain's cgroups; make every mount private; mount a small tmpfs on the jail's (empty)
host directory, in the child's own mount namespace only; bind the engine binary, its libraries and
the files it may use into it read-only; make the device nodes it needs and a size-limited /tmp;
pivot_root into it and detach the old root (hostfs or any other path lookup then finds only the
jail); set its hostname, resource limits; drop every capability from the bounding set, all
supplementary groups, then become the domain's uid and gid; PR_SET_NO_NEW_PRIVS; ask for SIGKILL
when the parent dies (after the uid change, which would clear it); load the seccomp filter; exec.
The engine is its PID namespace's init, so whatever kills it kills all of its processes.

A failing step is reported through a close-on-exec pipe, so `spawn` raises with the step's
message or returns once the engine was exec'd.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import socket
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from slimvisor.jail import linux
from slimvisor.runtime.errors import SlimvisorError


class JailError(SlimvisorError, RuntimeError):
    """A jail could not be set up; the message says which step failed and why."""


@dataclass(frozen=True)
class Bind:
    """A host file, socket or directory that the jail sees at `target`, read-only.

    A socket on a read-only mount can still be connected to (and datagrams sent to it)."""

    source: str
    target: str
    writable: bool = False  # a disk image its engine writes (a block device keeps its device node usable)


# Device nodes an engine may have (Documentation/admin-guide/devices.txt, major 1).
DEVICES = {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9)}
NAMESPACES = linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWNET
ROOT_TMPFS = "size=1m,nr_inodes=512,mode=0755"  # only mount points and device nodes live there


def jail_root(rundir: Path) -> Path:
    """The host directory a domain's jails mount their root on (each in its own namespace only)."""
    return rundir / "jail"


@dataclass
class JailSpec:
    name: str  # the hostname inside, and the name in messages
    uid: int
    gid: int
    root: Path  # an empty host directory; the jail's root is mounted on it in the jail's namespace only
    binds: list[Bind]
    tmp_bytes: int  # the writable /tmp (an engine's memory file lives there, so guest RAM is bounded)
    rlimits: dict[int, int] = field(default_factory=dict)  # resource.RLIMIT_*: soft = hard
    cgroup_procs: list[Path] = field(default_factory=list)  # cgroup.procs files joined first
    seccomp: bytes | None = None  # a classic-BPF program (slimvisor.jail.seccomp)
    devices: tuple[str, ...] = ("null", "zero", "random", "urandom")


class Jailed:
    """A jailed engine process: the init of its PID namespace, a direct child of ours."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    def path(self, inner: str) -> str:
        """The host path of a file inside the jail (through /proc/PID/root; root only)."""
        return f"/proc/{self.pid}/root{inner}"

    def netns_socket(self, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A Unix socket in the jail's network namespace, where abstract addresses are the jail's own:
        an engine that answers to the sender's address can reach it there and nowhere else."""
        own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        theirs = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(theirs, linux.CLONE_NEWNET)
            try:
                return socket.socket(socket.AF_UNIX, kind)
            finally:
                linux.setns(own, linux.CLONE_NEWNET)
        finally:
            os.close(own)
            os.close(theirs)

    def wait(self) -> int:
        """Reap; a Popen-style code (negative: killed by that signal)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the namespace's init (the kernel kills the rest of it) and reap."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()

    def close(self) -> None:
        self.kill()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def check_binary(path: str) -> None:
    """The engine binary must be root's and writable by nobody else: anyone who could replace it
    would run code in every domain's jail (and, before exec, as root)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise JailError(f"{path}: {e.strerror}") from None
    if st.st_uid != 0:
        raise JailError(f"{path}: owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise JailError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def shared_libraries(binary: str) -> list[str]:
    """The files the dynamic loader maps for `binary` (its interpreter included), as host paths."""
    st = os.stat(binary)
    return list(_shared_libraries(binary, st.st_ino, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _shared_libraries(binary: str, inode: int, mtime_ns: int) -> tuple[str, ...]:
    interp = elf_interpreter(binary)
    if interp is None:
        return ()  # static
    # The loader's own answer (what ldd prints, without ldd's shell around it).
    out = subprocess.run([interp, "--list", binary], capture_output=True, text=True, check=False).stdout
    found: list[str] = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
        if path.startswith("/"):
            found.append(path)
    return tuple(found)


def elf_interpreter(binary: str) -> str | None:
    """The program interpreter (PT_INTERP) of a 64-bit little-endian ELF file, None if it has none."""
    with open(binary, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # ELFCLASS64, ELFDATA2LSB
            raise JailError(f"{binary}: not a 64-bit little-endian ELF file")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type == PT_INTERP:
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


PT_INTERP = 3  # the ELF specification, "Program Header"


def spawn(spec: JailSpec, argv: list[str], env: dict[str, str], stdin: int, stdout: int) -> Jailed:
    """Start argv[0] (a host path that `spec.binds` makes visible in the jail) in the jail."""
    check_binary(argv[0])
    if not spec.root.is_dir() or any(spec.root.iterdir()):
        raise JailError(f"jail root {spec.root}: not an empty directory")
    for bind in spec.binds:
        if not os.path.isabs(bind.target) or ".." in bind.target.split("/"):
            raise JailError(f"jail target {bind.target!r}: not a plain absolute path")
        if not os.path.exists(bind.source):
            raise JailError(f"{bind.source}: no such file (to be seen in the jail as {bind.target})")
    plan = _Plan.make(spec, argv, env)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    life_r, life_w = os.pipe2(os.O_CLOEXEC)  # the child checks we still live after asking for PDEATHSIG
    try:
        pid = linux.clone(NAMESPACES)
    except BaseException:
        for fd in (err_r, err_w, life_r, life_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - runs in the child
        status = 127
        try:
            os.close(err_r)
            os.close(life_w)
            plan.run(stdin, stdout, life_r, err_w)
        except BaseException as e:
            with contextlib.suppress(BaseException):
                os.write(err_w, f"{e}".encode(errors="replace")[:4000])
        finally:
            os._exit(status)
    os.close(err_w)
    os.close(life_r)
    try:
        message = b""
        while chunk := os.read(err_r, 4096):  # EOF: exec closed the pipe (or the child died)
            message += chunk
    finally:
        os.close(err_r)
        os.close(life_w)
    jailed = Jailed(pid)
    if message:
        jailed.close()
        raise JailError(f"jail of {spec.name}: {message.decode(errors='replace')}")
    return jailed


@dataclass
class _Plan:
    """Everything the child needs, computed before the clone (the child only makes system calls)."""

    spec: JailSpec
    argv: list[str]
    env: dict[str, str]
    kinds: dict[str, bool]  # bind target -> is a directory
    block_devices: frozenset[str]  # bind targets that are block devices (their node must stay usable)
    last_cap: int

    @classmethod
    def make(cls, spec: JailSpec, argv: list[str], env: dict[str, str]) -> _Plan:
        kinds = {b.target: os.path.isdir(b.source) for b in spec.binds}
        devs = frozenset(b.target for b in spec.binds if b.writable and stat.S_ISBLK(os.stat(b.source).st_mode))
        return cls(spec, argv, env, kinds, devs, linux.last_cap())

    def run(self, stdin: int, stdout: int, life_r: int, err_w: int) -> None:  # pragma: no cover - child
        spec = self.spec
        for fd, target in ((stdin, 0), (stdout, 1), (stdout, 2)):
            if fd != target:
                os.dup2(fd, target)
        for procs in spec.cgroup_procs:
            with open(procs, "w") as f:
                f.write("0")  # "0": the writing process (our pid here is 1, in our namespace)
        root = str(spec.root)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing we mount leaks to the host
        linux.mount("jail", root, "tmpfs", linux.MS_NOSUID, ROOT_TMPFS)
        for bind in spec.binds:
            self._bind(root, bind)
        os.mkdir(f"{root}/dev", 0o755)
        for name in spec.devices:
            major, minor = DEVICES[name]
            os.mknod(f"{root}/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(f"{root}/dev/{name}", 0o666)  # past the umask
        os.mkdir(f"{root}/tmp", 0o700)
        linux.mount("tmp", f"{root}/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                    f"size={spec.tmp_bytes},mode=0700,uid={spec.uid},gid={spec.gid}")  # fmt: skip
        os.chdir(root)
        linux.pivot_root(".", ".")  # the old root is stacked on the new one: detach it
        linux.umount_detach(".")
        os.chdir("/")
        linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID, ROOT_TMPFS)
        linux.sethostname(spec.name)
        for which, limit in spec.rlimits.items():
            resource.setrlimit(which, (limit, limit))
        for cap in range(self.last_cap + 1):
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)  # with all three uids non-zero, every capability goes
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.set_blocking(life_r, False)
        with contextlib.suppress(BlockingIOError):
            if os.read(life_r, 1) == b"":  # our parent died before PDEATHSIG was armed
                os._exit(1)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 16)
        if spec.seccomp is not None:
            linux.install_seccomp(spec.seccomp)
        os.execve(self.argv[0], self.argv, self.env)

    def _bind(self, root: str, bind: Bind) -> None:  # pragma: no cover - child
        target = root + bind.target
        parent = os.path.dirname(target)
        os.makedirs(parent, 0o755, exist_ok=True)
        if self.kinds[bind.target]:
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        linux.mount(bind.source, target, None, linux.MS_BIND)
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID
        flags |= 0 if bind.writable else linux.MS_RDONLY
        flags |= 0 if bind.target in self.block_devices else linux.MS_NODEV
        linux.mount(None, target, None, flags)
