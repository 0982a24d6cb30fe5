"""seccomp allowlists, compiled with libseccomp (pyseccomp) into classic BPF.

The jailed child only loads the compiled bytes (slimvisor.jail.linux.install_seccomp), so no
library is called between the clone and the exec. A system call outside the list kills the whole
process (SECCOMP_RET_KILL_PROCESS); the engine's parent sees it die of SIGSYS.

Loading libseccomp costs about 35 ms (ctypes.util.find_library runs ldconfig), more than the whole
jail: `cached_allowlist` keeps each compiled program in RUN/seccomp, a root-only directory, keyed
by a hash of what went into it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from slimvisor.jail import linux
from slimvisor.runtime.paths import runtime_base

# No new namespaces from inside a jail, by clone or unshare: they are how an unprivileged process
# gets capabilities (CLONE_NEWUSER) and reaches kernel code that is otherwise root's alone.
NEW_NAMESPACES = (linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWUSER
                  | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWCGROUP)  # fmt: skip


# The engine is its PID namespace's init, and signals an init sends itself are dropped: abort()
# (kill(getpid(), SIGABRT) in a loop, as UML's uml_abort does after a panic) would spin forever.
# Such a call is made the process's death instead. (pid argument position, signal argument position)
_SELF_SIGNAL = {"kill": (0, 1), "tkill": (0, 1), "tgkill": (0, 2)}
INIT_PID = 1


@dataclass(frozen=True)
class Policy:
    """What a filter does outside its allowlist, and which clone flags it refuses."""

    name: str
    deny_errno: int | None  # None: kill the process; else fail the call with this errno
    forbidden_clone_flags: int


# An engine: anything else is the process's death; no namespaces of its own.
ENGINE = Policy("engine", None, NEW_NAMESPACES)
# A dom0 process (supervisor, backend, switch): anything else fails with EPERM, so an unforeseen
# call fails one operation (logged) instead of taking every domain the process serves down with
# it. It builds jails, so it may clone into new namespaces, but never a user namespace.
DOM0 = Policy("dom0", errno.EPERM, linux.CLONE_NEWUSER)


# The calls a running UML makes by the million (ptrace and wait4 for every guest system call):
# tested first. (Counts from scripts/uml-syscalls.py over a boot and a disk workload.)
HOT = {"ptrace", "wait4", "mmap", "munmap", "read", "epoll_wait", "kill", "rt_sigaction", "rt_sigreturn"}


def compile_allowlist(allowed: Iterable[str], policy: Policy = ENGINE, absent: Iterable[str] = ()) -> bytes:
    """A filter that allows `allowed`; clone without the policy's forbidden flags; answers clone3
    with ENOSYS (libc then falls back to clone, whose flags a filter can see), and `absent` too
    (calls a program probes for and does without, as QEMU io_uring); makes an init's self-abort
    its death; and applies the policy to anything else."""
    import pyseccomp as sc

    deny = sc.KILL_PROCESS if policy.deny_errno is None else sc.ERRNO(policy.deny_errno)
    f = sc.SyscallFilter(defaction=deny)
    f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)  # a binary tree, not a linear list: every call UML makes pays it
    allowed = set(allowed)
    for name in HOT & allowed:
        f.syscall_priority(name, 255)
    for name in sorted(allowed - {"clone", "clone3", *_SELF_SIGNAL}):
        f.add_rule(sc.ALLOW, name)
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, policy.forbidden_clone_flags, 0))
    for name in sorted({"clone3", *absent} - allowed):
        f.add_rule(sc.ERRNO(errno.ENOSYS), name)
    for name, (pid_arg, sig_arg) in _SELF_SIGNAL.items():
        if name in allowed:  # allowed unless aimed at the init itself with SIGABRT (rules are OR'd)
            f.add_rule(sc.ALLOW, name, sc.Arg(pid_arg, sc.NE, INIT_PID))
            f.add_rule(sc.ALLOW, name, sc.Arg(sig_arg, sc.NE, signal.SIGABRT))
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as out:
        f.export_bpf(out)
        out.flush()
        out.seek(0)
        return out.read()


def cached_allowlist(allowed: Iterable[str], policy: Policy = ENGINE, absent: Iterable[str] = ()) -> bytes:
    """compile_allowlist, through a file cache (written atomically: a half-written program is never read)."""
    names, missing = sorted(set(allowed)), sorted(set(absent))
    key = hashlib.sha256(repr((names, missing, policy, platform.machine(), _RULES_VERSION)).encode()).hexdigest()[:24]
    cache = runtime_base() / "seccomp"
    path = cache / f"{policy.name}-{key}.bpf"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    program = compile_allowlist(names, policy, missing)
    cache.mkdir(mode=0o700, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}"
    tmp.write_bytes(program)
    tmp.rename(path)
    return program


_RULES_VERSION = 2  # bump when compile_allowlist's fixed rules change, so cached programs are rebuilt


def confine(allowed: Iterable[str]) -> None:
    """Put this dom0 process (all its threads) under a DOM0 filter, once it has set itself up."""
    program = cached_allowlist(allowed, DOM0)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.install_seccomp(program, all_threads=True)


# The host system calls of slimvisor's dom0 Python processes once they are set up: the
# interpreter, the event loop, vhost-user devices (memfd mappings, eventfds, SCM_RIGHTS), disks,
# control sockets, logging, subprocesses, cgroup files and (the supervisor) building jails and
# reading /proc. Measured over the whole test suite with a logging filter (scripts/uml-syscalls.py
# shows how). Not here, so EPERM: ptrace, bpf, perf_event_open, keyctl/add_key, kexec_*,
# init_module, reboot, swapon, userfaultfd, io_uring_*, open_by_handle_at, unshare, and clone
# into a user namespace. A process's filters stack onto the children it forks, so a supervisor,
# which starts engines after it confined itself, also admits what its engine needs (ptrace
# among them); the engine's own filter then narrows that down again.
DOM0_SYSCALLS = (
    "accept", "accept4", "access", "arch_prctl", "bind", "brk", "capget", "capset", "chdir", "chmod", "chown",
    "clock_getres", "clock_gettime", "clock_nanosleep", "clone", "close", "close_range", "connect",
    "copy_file_range", "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_pwait",
    "epoll_wait", "eventfd2", "execve", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64", "fallocate",
    "fchdir", "fchmod", "fchmodat", "fchown", "fchownat", "fcntl", "fdatasync", "flock", "fstat", "fstatfs", "fsync",
    "ftruncate", "futex", "getcwd", "getdents64", "getegid", "geteuid", "getgid", "getgroups", "getitimer",
    "getpeername", "getpgid", "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid",
    "getresuid", "getrlimit", "getrusage", "getsid", "getsockname", "getsockopt", "gettid", "gettimeofday",
    "getuid", "ioctl", "kill", "link", "linkat", "listen", "lseek", "lstat", "madvise", "membarrier",
    "memfd_create", "mkdir", "mkdirat", "mknod", "mknodat", "mmap", "mount", "mprotect", "mremap", "munmap",
    "nanosleep", "newfstatat", "open", "openat", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2",
    "pivot_root", "poll", "ppoll", "prctl", "pread64", "preadv", "preadv2", "prlimit64", "pselect6", "pwrite64",
    "pwritev", "pwritev2", "read", "readlink", "readlinkat", "readv", "recvfrom", "recvmmsg", "recvmsg", "rename",
    "renameat", "renameat2", "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "sched_getaffinity", "sched_setaffinity", "sched_yield",
    "seccomp", "select", "sendfile", "sendmmsg", "sendmsg", "sendto", "set_robust_list", "set_tid_address",
    "setgroups", "sethostname", "setitimer", "setns", "setpgid", "setpriority", "setresgid", "setresuid",
    "setsid", "setsockopt", "shutdown", "sigaltstack", "socket", "socketpair", "splice", "stat", "statfs", "statx",
    "symlink", "sysinfo", "tgkill", "time", "timerfd_create", "timerfd_settime", "times", "tkill", "truncate",
    "umask", "umount2", "uname", "unlink", "unlinkat", "utimensat", "vfork", "wait4", "waitid", "write", "writev",
)  # fmt: skip
