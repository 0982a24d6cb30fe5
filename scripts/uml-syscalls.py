#!/usr/bin/env python3
"""Which host system calls a User-Mode Linux process tree makes, with the arguments that matter.

    uml_syscalls.py [--details] [--json OUT] -- /usr/bin/linux.uml mem=128M ubd0=... con0=fd:0,fd:1
    printf 'cmds\npoweroff\n' | uml_syscalls.py --details -- slimvisor run --disk rootfs.ext4 ...
    uml_syscalls.py --names -- ... > allowlist.txt; uml_syscalls.py --allow allowlist.txt -- linux.uml ...

COMMAND runs in the foreground with this tool's stdin, stdout and stderr, and the tool exits with
its status. It may be linux.uml itself or anything that starts it (slimvisor): every task of
COMMAND's process tree whose name (comm) is --comm (default linux.uml) is traced from its exec to
its exit: UML's main thread, its helper threads and processes, the processes it forks to probe the
host at boot, and the stub processes in which guest userspace runs. At the end the tool prints the
sorted system call names with their counts; --details adds the calls of each kind of task, the
arguments a seccomp rule could test (clone flags, socket domains and types, ioctl requests, fcntl
commands, prctl options, mmap/mprotect protections, ptrace requests, ...) and the calls that failed.

How it collects: ftrace (as root; tracefs is mounted on /sys/kernel/tracing if it is not). A trace
instance of its own records raw_syscalls:sys_enter (number, six raw arguments) and the failing
raw_syscalls:sys_exit (ret < 0), both filtered in the kernel to comm == --comm, and
sched_process_fork/exec/exit. The kernel records only COMMAND's tree: the child writes its pid to
the instance's set_event_pid before its exec, and options/event-fork adds every task forked
below it. The tool streams trace_pipe while COMMAND runs. It counts a task's events only while the
task belongs to the tree by the fork events it saw (the kernel drops a pid from set_event_pid when
the task is freed, after the pid may have gone to another process: such events are "foreign"),
and it warns when the ring buffer dropped events (then the set may be incomplete: raise
--buffer-mb, or give the workload fewer system calls a second).

Why not seccomp's SECCOMP_RET_LOG alone: without an audit daemon its records (type=1326) reach the
kernel log through printk_ratelimit(), about ten per five seconds, the rest dropped, and they carry
no arguments. The tracepoint sees what a filter sees: sys_enter fires after seccomp let a call
through, and, as seccomp, not for the guest's own system calls, which PTRACE_SYSEMU stops and
skips before either (kernel/entry/common.c, syscall_trace_enter). --allow FILE then checks a
candidate allowlist: COMMAND (give linux.uml itself: the filter covers all of COMMAND) runs under a
libseccomp filter that allows FILE's names and logs every other call, and the tool lists the
type=1326 records of the traced tasks found in /dev/kmsg (those made as the launcher, between the
filter and the exec, are marked so).

The exec into linux.uml is made by its launcher, under the launcher's comm, so sys_enter cannot
see it; it is counted as one execve per sched_process_exec, as a filter loaded before that exec
must allow it. A re-exec by a running UML (its reboot) is an ordinary traced execve.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
FORK = re.compile(r"pid=(\d+) child_comm=.* child_pid=(\d+)")
EXEC = re.compile(r"filename=(.*) pid=(\d+) old_pid=(\d+)")


# --- system call names, from Debian's libseccomp2 ---------------------------------------------

_seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
_seccomp.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
_seccomp.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
_seccomp.seccomp_syscall_resolve_name.restype = ctypes.c_int
_seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
_seccomp.seccomp_init.restype = ctypes.c_void_p
_seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
_seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
_seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
SCMP_ARCH_NATIVE = 0
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_LOG = 0x7FFC0000
_names: dict[int, str] = {}
KERNEL_ERRNO = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND", 516: "ERESTART_RESTARTBLOCK"}


def syscall_name(nr: int) -> str:
    """The native architecture's name for system call `nr` (or `syscall_NR` if it has none)."""
    if nr not in _names:
        p = _seccomp.seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr)
        if p:
            _names[nr] = ctypes.string_at(p).decode()
            _libc.free(p)
        else:
            _names[nr] = f"syscall_{nr}"
    return _names[nr]


def install_log_filter(allowed: Iterable[str]) -> None:
    """Load a filter that allows `allowed` and SECCOMP_RET_LOGs every other call (sets no_new_privs)."""
    ctx = _seccomp.seccomp_init(SCMP_ACT_LOG)
    if not ctx:
        raise OSError("seccomp_init failed")
    for name in allowed:
        nr = _seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            raise ValueError(f"unknown system call {name!r}")
        if (rc := _seccomp.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0)) < 0:
            raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")
    if (rc := _seccomp.seccomp_load(ctx)) < 0:
        raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


# --- argument decoding: the arguments a seccomp rule could test -------------------------------


def _flags(value: int, names: dict[int, str]) -> str:
    """`value` as NAME|NAME|0xrest (names: bit -> name)."""
    out, seen = [], 0
    for bit, n in names.items():
        if bit and value & bit == bit:
            out.append(n)
            seen |= bit
    rest = value & ~seen
    return "|".join(out + ([hex(rest)] if rest or not out else []))


def _named(value: int, names: dict[int, str]) -> str:
    return names.get(value, hex(value) if value > 9 else str(value))


def _sig(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


CLONE = {0x100: "VM", 0x200: "FS", 0x400: "FILES", 0x800: "SIGHAND", 0x1000: "PIDFD", 0x2000: "PTRACE",
         0x4000: "VFORK", 0x8000: "PARENT", 0x10000: "THREAD", 0x20000: "NEWNS", 0x40000: "SYSVSEM",
         0x80000: "SETTLS", 0x100000: "PARENT_SETTID", 0x200000: "CHILD_CLEARTID", 0x400000: "DETACHED",
         0x800000: "UNTRACED", 0x1000000: "CHILD_SETTID", 0x2000000: "NEWCGROUP", 0x4000000: "NEWUTS",
         0x8000000: "NEWIPC", 0x10000000: "NEWUSER", 0x20000000: "NEWPID", 0x40000000: "NEWNET",
         0x80000000: "IO"}  # fmt: skip
OPEN = {0o1: "WRONLY", 0o2: "RDWR", 0o100: "CREAT", 0o200: "EXCL", 0o400: "NOCTTY", 0o1000: "TRUNC",
        0o2000: "APPEND", 0o4000: "NONBLOCK", 0o4010000: "SYNC", 0o10000: "DSYNC", 0o20000: "ASYNC",
        0o40000: "DIRECT", 0o100000: "LARGEFILE", 0o200000: "DIRECTORY", 0o400000: "NOFOLLOW",
        0o1000000: "NOATIME", 0o2000000: "CLOEXEC", 0o10000000: "PATH", 0o20200000: "TMPFILE"}  # fmt: skip
PROT = {1: "READ", 2: "WRITE", 4: "EXEC", 0x1000000: "GROWSDOWN", 0x2000000: "GROWSUP"}
MAP = {1: "SHARED", 2: "PRIVATE", 0x10: "FIXED", 0x20: "ANONYMOUS", 0x100: "GROWSDOWN", 0x800: "DENYWRITE",
       0x1000: "EXECUTABLE", 0x2000: "LOCKED", 0x4000: "NORESERVE", 0x8000: "POPULATE", 0x10000: "NONBLOCK",
       0x20000: "STACK", 0x40000: "HUGETLB", 0x80000: "SYNC", 0x100000: "FIXED_NOREPLACE"}  # fmt: skip
SOCK_TYPE = {1: "STREAM", 2: "DGRAM", 3: "RAW", 4: "RDM", 5: "SEQPACKET", 10: "PACKET"}
SOCK_FLAGS = {0o4000: "NONBLOCK", 0o2000000: "CLOEXEC"}
AF = {0: "UNSPEC", 1: "UNIX", 2: "INET", 10: "INET6", 16: "NETLINK", 17: "PACKET", 40: "VSOCK"}
FCNTL = {0: "F_DUPFD", 1: "F_GETFD", 2: "F_SETFD", 3: "F_GETFL", 4: "F_SETFL", 5: "F_GETLK", 6: "F_SETLK",
         7: "F_SETLKW", 8: "F_SETOWN", 9: "F_GETOWN", 10: "F_SETSIG", 11: "F_GETSIG", 15: "F_SETOWN_EX",
         16: "F_GETOWN_EX", 36: "F_OFD_GETLK", 37: "F_OFD_SETLK", 38: "F_OFD_SETLKW", 1024: "F_SETLEASE",
         1025: "F_GETLEASE", 1030: "F_DUPFD_CLOEXEC", 1031: "F_SETPIPE_SZ", 1032: "F_GETPIPE_SZ",
         1033: "F_ADD_SEALS", 1034: "F_GET_SEALS"}  # fmt: skip
PRCTL = {1: "PR_SET_PDEATHSIG", 2: "PR_GET_PDEATHSIG", 3: "PR_GET_DUMPABLE", 4: "PR_SET_DUMPABLE",
         15: "PR_SET_NAME", 16: "PR_GET_NAME", 21: "PR_GET_SECCOMP", 22: "PR_SET_SECCOMP",
         23: "PR_CAPBSET_READ", 24: "PR_CAPBSET_DROP", 29: "PR_SET_TIMERSLACK", 35: "PR_SET_MM",
         36: "PR_SET_CHILD_SUBREAPER", 38: "PR_SET_NO_NEW_PRIVS", 39: "PR_GET_NO_NEW_PRIVS",
         41: "PR_SET_THP_DISABLE", 59: "PR_SET_SYSCALL_USER_DISPATCH", 0x59616D61: "PR_SET_PTRACER",
         0x53564D41: "PR_SET_VMA"}  # fmt: skip
ARCH_PRCTL = {0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS", 0x1004: "ARCH_GET_GS",
              0x1011: "ARCH_GET_CPUID", 0x1012: "ARCH_SET_CPUID", 0x1021: "ARCH_GET_XCOMP_SUPP",
              0x1022: "ARCH_GET_XCOMP_PERM", 0x1023: "ARCH_REQ_XCOMP_PERM", 0x3001: "ARCH_CET_STATUS",
              0x5001: "ARCH_SHSTK_ENABLE", 0x5005: "ARCH_SHSTK_STATUS"}  # fmt: skip
PTRACE = {0: "TRACEME", 1: "PEEKTEXT", 2: "PEEKDATA", 3: "PEEKUSER", 4: "POKETEXT", 5: "POKEDATA",
          6: "POKEUSER", 7: "CONT", 8: "KILL", 9: "SINGLESTEP", 12: "GETREGS", 13: "SETREGS", 14: "GETFPREGS",
          15: "SETFPREGS", 16: "ATTACH", 17: "DETACH", 18: "GETFPXREGS", 19: "SETFPXREGS", 24: "SYSCALL",
          21: "OLDSETOPTIONS", 25: "GET_THREAD_AREA", 26: "SET_THREAD_AREA", 30: "ARCH_PRCTL", 31: "SYSEMU",
          32: "SYSEMU_SINGLESTEP", 0x4200: "SETOPTIONS", 0x4201: "GETEVENTMSG", 0x4202: "GETSIGINFO",
          0x4203: "SETSIGINFO", 0x4204: "GETREGSET", 0x4205: "SETREGSET", 0x4206: "SEIZE",
          0x4207: "INTERRUPT", 0x4208: "LISTEN", 0x420E: "GET_SYSCALL_INFO"}  # fmt: skip
PTRACE_O = {1: "TRACESYSGOOD", 2: "TRACEFORK", 4: "TRACEVFORK", 8: "TRACECLONE", 0x10: "TRACEEXEC",
            0x20: "TRACEVFORKDONE", 0x40: "TRACEEXIT", 0x80: "TRACESECCOMP", 0x100000: "EXITKILL",
            0x200000: "SUSPEND_SECCOMP"}  # fmt: skip
IOCTL = {0x5401: "TCGETS", 0x5402: "TCSETS", 0x5403: "TCSETSW", 0x5404: "TCSETSF", 0x540E: "TIOCSCTTY",
         0x540F: "TIOCGPGRP", 0x5410: "TIOCSPGRP", 0x5411: "TIOCOUTQ", 0x5413: "TIOCGWINSZ",
         0x5414: "TIOCSWINSZ", 0x541B: "FIONREAD", 0x5421: "FIONBIO", 0x5422: "TIOCNOTTY",
         0x5450: "FIONCLEX", 0x5451: "FIOCLEX", 0x5452: "FIOASYNC", 0x80045430: "TIOCGPTN",
         0x40045431: "TIOCSPTLCK", 0x5441: "TIOCGPTPEER", 0x1268: "BLKSSZGET", 0x80081272: "BLKGETSIZE64",
         0x125F: "BLKFLSBUF",
         0x400454CA: "TUNSETIFF", 0x8913: "SIOCGIFFLAGS", 0x8914: "SIOCSIFFLAGS"}  # fmt: skip
MADV = {0: "NORMAL", 1: "RANDOM", 2: "SEQUENTIAL", 3: "WILLNEED", 4: "DONTNEED", 8: "FREE", 9: "REMOVE",
        10: "DONTFORK", 11: "DOFORK", 12: "MERGEABLE", 13: "UNMERGEABLE", 14: "HUGEPAGE", 15: "NOHUGEPAGE",
        16: "DONTDUMP", 17: "DODUMP", 18: "WIPEONFORK", 19: "KEEPONFORK", 20: "COLD", 21: "PAGEOUT",
        22: "POPULATE_READ", 23: "POPULATE_WRITE"}  # fmt: skip
WAIT = {1: "WNOHANG", 2: "WUNTRACED", 8: "WCONTINUED", 0x20000000: "__WNOTHREAD", 0x40000000: "__WALL",
        0x80000000: "__WCLONE"}  # fmt: skip
CLOCK = {0: "REALTIME", 1: "MONOTONIC", 2: "PROCESS_CPUTIME_ID", 3: "THREAD_CPUTIME_ID", 4: "MONOTONIC_RAW",
         5: "REALTIME_COARSE", 6: "MONOTONIC_COARSE", 7: "BOOTTIME"}  # fmt: skip
RLIMIT = {0: "CPU", 1: "FSIZE", 2: "DATA", 3: "STACK", 4: "CORE", 5: "RSS", 6: "NPROC", 7: "NOFILE",
          8: "MEMLOCK", 9: "AS", 10: "LOCKS", 11: "SIGPENDING", 12: "MSGQUEUE", 13: "NICE", 14: "RTPRIO",
          15: "RTTIME"}  # fmt: skip
MSG = {1: "OOB", 2: "PEEK", 0x20: "TRUNC", 0x40: "DONTWAIT", 0x100: "WAITALL", 0x4000: "NOSIGNAL",
       0x40000000: "CMSG_CLOEXEC"}  # fmt: skip
SEEK = {0: "SEEK_SET", 1: "SEEK_CUR", 2: "SEEK_END", 3: "SEEK_DATA", 4: "SEEK_HOLE"}
GRND = {1: "GRND_NONBLOCK", 2: "GRND_RANDOM", 4: "GRND_INSECURE"}
FUTEX = {0: "WAIT", 1: "WAKE", 2: "FD", 3: "REQUEUE", 4: "CMP_REQUEUE", 5: "WAKE_OP", 6: "LOCK_PI",
         7: "UNLOCK_PI", 8: "TRYLOCK_PI", 9: "WAIT_BITSET", 10: "WAKE_BITSET"}  # fmt: skip


def _i(v: int) -> int:
    """A raw (unsigned long) argument as the C int it is."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _open(flags: int) -> str:
    """open(2) flags; O_RDONLY is 0, so it is named only alone."""
    return _flags(flags, OPEN) if flags else "RDONLY"


def _clone(a: Sequence[int]) -> str:
    return _flags(a[0] & ~0xFF, CLONE) + (f" exit_signal={_sig(a[0] & 0xFF)}" if a[0] & 0xFF else "")


def _socket(a: Sequence[int]) -> str:
    kind = SOCK_TYPE.get(a[1] & 0xF, str(a[1] & 0xF))
    flags = _flags(a[1] & ~0xF, SOCK_FLAGS) if a[1] & ~0xF else ""
    return f"AF_{AF.get(a[0], str(a[0]))} SOCK_{kind}{'|' + flags if flags else ''} proto={a[2]}"


def _fcntl(a: Sequence[int]) -> str:
    cmd = _i(a[1])
    name = FCNTL.get(cmd, str(cmd))
    if cmd == 4:
        return f"{name} {_flags(a[2], OPEN)}"
    if cmd == 2:
        return f"{name} {'FD_CLOEXEC' if a[2] == 1 else a[2]}"
    if cmd == 10:
        return f"{name} {_sig(a[2])}"
    if cmd == 8:
        return f"{name} {'pid' if _i(a[2]) > 0 else _i(a[2])}"
    return name


def _prctl(a: Sequence[int]) -> str:
    opt = _i(a[0])
    name = PRCTL.get(opt, str(opt))
    return f"{name} {_sig(a[1])}" if opt == 1 else f"{name} {a[1]:#x}"


def _ptrace(a: Sequence[int]) -> str:
    req = _i(a[0])
    name = PTRACE.get(req, hex(req))
    if req in (0x4200, 21):
        return f"{name} {_flags(a[3], PTRACE_O)}"
    if req in (0x4204, 0x4205):
        return f"{name} NT={a[2]:#x}"
    if req in (3, 6):
        return f"{name} off={a[2]}"
    return name


_PTRACE_WITH_ARGS = {"0", "3", "6", "15", "4200", "4204", "4205", "4206"}  # hex: TRACEME, PEEK/POKEUSER, ...


@functools.cache
def _ptrace_simple(req: str) -> str:
    return _ptrace([int(req, 16), 0, 0, 0])


def _kill(a: Sequence[int]) -> str:
    pid = _i(a[0])
    target = "pid>0" if pid > 0 else ("pgrp" if pid == 0 else ("all" if pid == -1 else "-pgid"))
    return f"{target} {_sig(a[1])}"


def _mmap(a: Sequence[int]) -> str:
    fd = "anon" if _i(a[4]) == -1 or a[3] & 0x20 else "fd"
    return f"prot={_flags(a[2], PROT) if a[2] else 'NONE'} flags={_flags(a[3], MAP)} {fd}"


def _wait4(a: Sequence[int]) -> str:
    pid = _i(a[0])
    return f"pid={'>0' if pid > 0 else pid} {_flags(a[2], WAIT) if a[2] else '0'}"


def _futex(a: Sequence[int]) -> str:
    op = a[1]
    extra = "|PRIVATE" * bool(op & 128) + "|CLOCK_REALTIME" * bool(op & 256)
    return FUTEX.get(op & 127, str(op & 127)) + extra


def _prlimit(a: Sequence[int]) -> str:
    what = "get" if not a[2] else ("set" if not a[3] else "get+set")
    return f"RLIMIT_{RLIMIT.get(a[1], str(a[1]))} {what}{' pid=self' if a[0] == 0 else ''}"


DETAIL: dict[str, Callable[[Sequence[int]], str]] = {
    "clone": _clone,
    "clone3": lambda a: f"struct clone_args size={a[1]}",
    "unshare": lambda a: _flags(a[0], CLONE),
    "setns": lambda a: _flags(a[1], CLONE),
    "mount": lambda a: f"flags={a[3]:#x}",
    "execve": lambda a: "",
    "fork": lambda a: "",
    "vfork": lambda a: "",
    "socket": _socket,
    "socketpair": _socket,
    "setsockopt": lambda a: f"level={a[1]} opt={a[2]}",
    "getsockopt": lambda a: f"level={a[1]} opt={a[2]}",
    "sendmsg": lambda a: _flags(a[2], MSG) if a[2] else "0",
    "recvmsg": lambda a: _flags(a[2], MSG) if a[2] else "0",
    "sendto": lambda a: _flags(a[3], MSG) if a[3] else "0",
    "recvfrom": lambda a: _flags(a[3], MSG) if a[3] else "0",
    "ioctl": lambda a: f"{a[1]:#x} {IOCTL.get(a[1] & 0xFFFFFFFF, '')}".strip(),
    "fcntl": _fcntl,
    "prctl": _prctl,
    "arch_prctl": lambda a: ARCH_PRCTL.get(a[0], hex(a[0])),
    "ptrace": _ptrace,
    "mmap": _mmap,
    "mprotect": lambda a: _flags(a[2], PROT) if a[2] else "PROT_NONE",
    "madvise": lambda a: "MADV_" + MADV.get(a[2], str(a[2])),
    "mremap": lambda a: _flags(a[3], {1: "MAYMOVE", 2: "FIXED", 4: "DONTUNMAP"}) if a[3] else "0",
    "wait4": _wait4,
    "waitid": lambda a: f"idtype={a[0]} {_flags(a[3], WAIT) if a[3] else '0'}",
    "kill": _kill,
    "tkill": lambda a: _sig(a[1]),
    "tgkill": lambda a: _sig(a[2]),
    "rt_sigaction": lambda a: _sig(a[0]) + (" set" if a[1] else " get"),
    "rt_sigprocmask": lambda a: _named(a[0], {0: "SIG_BLOCK", 1: "SIG_UNBLOCK", 2: "SIG_SETMASK"}),
    "timer_create": lambda a: "CLOCK_" + CLOCK.get(a[0], str(_i(a[0]))),
    "timer_settime": lambda a: "TIMER_ABSTIME" if a[1] & 1 else "relative",
    "timerfd_create": lambda a: "CLOCK_" + CLOCK.get(a[0], str(_i(a[0]))),
    "clock_gettime": lambda a: "CLOCK_" + CLOCK.get(a[0], str(_i(a[0]))),
    "clock_nanosleep": lambda a: "CLOCK_" + CLOCK.get(a[0], str(_i(a[0]))),
    "setitimer": lambda a: _named(a[0], {0: "ITIMER_REAL", 1: "ITIMER_VIRTUAL", 2: "ITIMER_PROF"}),
    "prlimit64": _prlimit,
    "epoll_ctl": lambda a: _named(a[1], {1: "EPOLL_CTL_ADD", 2: "EPOLL_CTL_DEL", 3: "EPOLL_CTL_MOD"}),
    "openat": lambda a: ("AT_FDCWD " if _i(a[0]) == -100 else "dirfd ") + _open(a[2]),
    "open": lambda a: _open(a[1]),
    "access": lambda a: _flags(a[1], {4: "R_OK", 2: "W_OK", 1: "X_OK"}) if a[1] else "F_OK",
    "lseek": lambda a: _named(a[2], SEEK),
    "fallocate": lambda a: _flags(a[1], {1: "KEEP_SIZE", 2: "PUNCH_HOLE", 0x10: "ZERO_RANGE"}) if a[1] else "0",
    "getrandom": lambda a: _flags(a[2], GRND) if a[2] else "0",
    "futex": _futex,
    "mkdir": lambda a: f"mode={a[1]:#o}",
    "eventfd2": lambda a: f"flags={a[1]:#x}",
    "pipe2": lambda a: _flags(a[1], OPEN) if a[1] else "0",
    "dup3": lambda a: _flags(a[2], OPEN) if a[2] else "0",
    "memfd_create": lambda a: f"flags={a[1]:#x}",
    "shutdown": lambda a: _named(a[1], {0: "SHUT_RD", 1: "SHUT_WR", 2: "SHUT_RDWR"}),
    "personality": lambda a: f"{a[0]:#x}",
    "modify_ldt": lambda a: _named(a[0], {0: "read", 1: "write (old)", 2: "read_default", 0x11: "write"}),
    "exit_group": lambda a: f"status={_i(a[0])}",
    "exit": lambda a: f"status={_i(a[0])}",
}


# --- the trace --------------------------------------------------------------------------------


@dataclass
class Task:
    """One traced thread or process, and how it came to be."""

    tid: int
    tgid: int = 0
    parent: int = 0
    clone_flags: int | None = None  # flags of the clone/fork that made it, when seen
    made_by_main: bool = False  # its parent was a main thread (else one of the children)
    execs: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    ptraced: bool = False  # a UML thread ptrace()d it: a stub (guest userspace) or a startup probe


@dataclass
class Trace:
    """What the traced tasks did. Tasks are followed from `root` by their fork events: a pid that
    left set_event_pid late (the kernel drops it when the task is freed, after the pid may already
    have been reused) gives events from outside the tree, which are counted in `foreign` only."""

    comm: str
    root: int = 0
    live: dict[int, Task] = field(default_factory=dict)
    ended: list[Task] = field(default_factory=list)
    details: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    first_seen: dict[str, float] = field(default_factory=dict)
    lost: int = 0
    foreign: int = 0
    foreign_sample: list[str] = field(default_factory=list)
    start: float | None = None
    _last_enter: dict[int, tuple[int, str]] = field(default_factory=dict)
    _pending_clone: dict[int, int] = field(default_factory=dict)

    def follow(self, root: int) -> None:
        self.root = root
        self.live[root] = Task(root, tgid=root)

    def feed(self, line: str) -> None:
        """One line of trace_pipe: `comm-PID [CPU] SECONDS: EVENT: BODY` (string ops: the hot path)."""
        head, _, rest = line.partition(": ")
        event, _, body = rest.partition(": ")
        try:
            task = head[: head.rindex(" [")]
            pid = int(task[task.rindex("-") + 1 :])
        except ValueError:
            if m := re.search(r"\[LOST (\d+) EVENTS\]", line):
                self.lost += int(m.group(1))
            return
        t = self.live.get(pid)
        if t is None:
            self.foreign += 1
            if len(self.foreign_sample) < 20:
                self.foreign_sample.append(line.strip())
            return
        if event == "sys_enter":
            nr_s, _, args_s = body[3:].partition(" (")
            nr = int(nr_s)
            name = _names.get(nr) or syscall_name(nr)
            calls = t.calls
            if name not in calls and name not in self.first_seen:
                self._first(name, head)
            calls[name] += 1
            args_s = args_s[:-1]
            self._last_enter[pid] = (nr, args_s)
            if name == "ptrace":  # half the events: no full parse for requests that only have a number
                req, tracee, _ = args_s.split(", ", 2)
                if req not in _PTRACE_WITH_ARGS:
                    if (u := self.live.get(int(tracee, 16))) is not None:
                        u.ptraced = True
                    self.details[name][_ptrace_simple(req)] += 1
                    return
            if name in DETAIL:
                self._details(t, name, [int(x, 16) for x in args_s.split(", ")])
        elif event == "sys_exit":
            nr_s, _, ret_s = body[3:].partition(" = ")
            last = self._last_enter.pop(pid, None)
            if last is not None and last[0] == int(nr_s):
                name = syscall_name(last[0])
                err = -int(ret_s)
                label = errno.errorcode.get(err, KERNEL_ERRNO.get(err, str(err)))
                detail = DETAIL.get(name)
                args = [int(x, 16) for x in last[1].split(", ")]
                self.errors[name][label + (f" ({detail(args)})" if detail else "")] += 1
        elif event == "sched_process_fork":
            if f := FORK.search(body):
                child = int(f[2])
                flags = self._pending_clone.pop(pid, None)
                tgid = t.tgid if flags is not None and flags & 0x10000 else child
                self.live[child] = Task(child, tgid, pid, flags, made_by_main=bool(t.execs))
        elif event == "sched_process_exec":
            if (x := EXEC.search(body)) and os.path.basename(x[1])[:15] == self.comm:
                t.execs.append(x[1])
                if len(t.execs) == 1 and not t.calls:  # the exec into UML, by its launcher
                    self._first("execve", head)
                    t.calls["execve"] += 1
        elif event == "sched_process_exit":
            self.ended.append(self.live.pop(pid))
            self._last_enter.pop(pid, None)
            self._pending_clone.pop(pid, None)

    def _details(self, t: Task, name: str, args: list[int]) -> None:
        if name in ("clone", "fork", "vfork"):
            self._pending_clone[t.tid] = {"clone": args[0], "fork": 0, "vfork": 0x4100}[name]
        elif name == "ptrace" and args[0] not in (0, 0x4206) and (tracee := self.live.get(_i(args[1]))):
            tracee.ptraced = True
        self.details[name][DETAIL[name](args)] += 1

    def _first(self, name: str, head: str) -> None:
        ts = float(head[head.rindex(" ") + 1 :])
        if self.start is None:
            self.start = ts
        self.first_seen.setdefault(name, round(ts - self.start, 6))

    # --- summaries ---

    def uml_tasks(self) -> list[Task]:
        """The tasks that ran as --comm (made a traced call or exec'd it)."""
        return [t for t in [*self.ended, *self.live.values()] if t.calls or t.execs]

    def role(self, t: Task) -> str:
        """main thread; or thread/process, by the clone flags that made it and who made it."""
        if t.execs:
            return "main thread"
        kind = "thread" if t.clone_flags is not None and t.clone_flags & 0x10000 else "process"
        flags = _clone([t.clone_flags]) if t.clone_flags is not None else "flags unseen"
        by = "main thread" if t.made_by_main else "a child"
        return f"{kind} made by {by} with clone({flags}){', ptraced' if t.ptraced else ''}"

    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for t in self.uml_tasks():
            total.update(t.calls)
        return total

    def by_role(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for t in self.uml_tasks():
            out[self.role(t)].update(t.calls)
        return dict(out)

    def to_json(self) -> dict[str, object]:
        roles = Counter(self.role(t) for t in self.uml_tasks())
        return {
            "comm": self.comm,
            "syscalls": dict(sorted(self.counts().items())),
            "first_seen": dict(sorted(self.first_seen.items(), key=lambda kv: kv[1])),
            "tasks_by_role": dict(roles),
            "by_role": {r: dict(sorted(c.items())) for r, c in sorted(self.by_role().items())},
            "details": {n: dict(c.most_common()) for n, c in sorted(self.details.items())},
            "errors": {n: dict(c.most_common()) for n, c in sorted(self.errors.items())},
            "mains": {
                str(t.tid): {"execs": t.execs, "calls": dict(sorted(t.calls.items()))}
                for t in self.uml_tasks()
                if t.execs
            },
            "lost_events": self.lost,
            "foreign_events": self.foreign,
            "foreign_sample": self.foreign_sample,
        }


class Tracer:
    """A private ftrace instance recording one process tree's tasks named `comm`."""

    def __init__(self, comm: str, tracefs: Path = TRACEFS, buffer_mb: int = 256,
                 raw: Path | None = None) -> None:  # fmt: skip
        if not (tracefs / "instances").is_dir():
            tracefs.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], check=True)
        self.dir = tracefs / "instances" / f"uml_syscalls-{os.getpid()}"
        self.dir.mkdir()
        self.trace = Trace(comm[:15])
        self.fd = -1
        self._rest = b""
        self.raw = open(raw, "wb") if raw is not None else None  # noqa: SIM115
        try:
            self._write("buffer_size_kb", str(buffer_mb << 10))  # per CPU
            self._write("trace_options", "noirq-info")
            self._write("options/event-fork", "1")
            self._write("options/overwrite", "0")  # a full buffer drops new events (and says so)
            name = self.trace.comm.replace('"', "")
            self._write("events/raw_syscalls/sys_enter/filter", f'comm == "{name}"')
            self._write("events/raw_syscalls/sys_exit/filter", f'comm == "{name}" && ret < 0')
            for ev in ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit", "sched/sched_process_fork",
                       "sched/sched_process_exec", "sched/sched_process_exit"):  # fmt: skip
                self._write(f"events/{ev}/enable", "1")
            self.fd = os.open(self.dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            self.close()
            raise

    def _write(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value + "\n")

    def follow_me(self) -> None:
        """In the child before exec: trace this process and everything it forks."""
        fd = os.open(self.dir / "set_event_pid", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def drain(self) -> int:
        """Parse what trace_pipe holds now; the number of bytes read."""
        total = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return total
            if not data:
                return total
            total += len(data)
            if self.raw is not None:
                self.raw.write(data)
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()
            for line in lines:
                self.trace.feed(line.decode(errors="replace"))

    def dropped(self) -> int:
        """Events the ring buffer could not keep (a full buffer drops new events: no LOST line)."""
        total = 0
        for stats in (self.dir / "per_cpu").glob("cpu*/stats"):
            with contextlib.suppress(OSError):
                for line in stats.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("overrun", "dropped events"):
                        total += int(value)
        return total

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._write("tracing_on", "0")
        if self.fd >= 0:
            self.drain()
            os.close(self.fd)
            self.fd = -1
        self.trace.lost += self.dropped()
        if self.raw is not None:
            self.raw.close()
        with contextlib.suppress(OSError):
            self._write("events/enable", "0")
        for _ in range(50):  # the instance can be busy for a moment after its last reader
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_traced(argv: Sequence[str], comm: str = "linux.uml", allow: Iterable[str] | None = None,
               tracefs: Path = TRACEFS, buffer_mb: int = 256,
               raw: Path | None = None) -> tuple[int, Trace]:  # fmt: skip
    """Run `argv` to its end with its tasks named `comm` traced; (exit status, trace)."""
    allowed = sorted(set(allow)) if allow is not None else None
    tracer = Tracer(comm, tracefs, buffer_mb, raw)

    def child() -> None:
        tracer.follow_me()
        if allowed is not None:
            install_log_filter(allowed)

    try:
        proc = subprocess.Popen(list(argv), preexec_fn=child)  # this process runs no other thread
        tracer.trace.follow(proc.pid)
        while True:
            try:
                while proc.poll() is None:
                    if not tracer.drain():
                        time.sleep(0.05)
                break
            except KeyboardInterrupt:  # the terminal's ^C reached COMMAND too: let it end
                continue
        time.sleep(0.2)  # the tree's last exits
        tracer.drain()
    finally:
        tracer.close()
    return proc.returncode, tracer.trace


# --- seccomp's own log ------------------------------------------------------------------------

AUDIT_SECCOMP = re.compile(r'audit: type=1326 .*? pid=(\d+) comm="([^"]*)".*? syscall=(\d+) ')


def kmsg_cursor() -> int:
    """An fd on /dev/kmsg positioned after every record so far."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def seccomp_log_since(fd: int, pids: set[int], comm: str) -> tuple[Counter[str], list[str]]:
    """The type=1326 records of `pids` since `fd` was made, by system call (and comm when it is not
    `comm`: the launcher's calls before its exec), and the kernel's notes of records it dropped."""
    seen: Counter[str] = Counter()
    notes: list[str] = []
    while True:
        try:
            rec = os.read(fd, 8192).decode(errors="replace")
        except BlockingIOError:
            break
        except OSError as e:  # EPIPE: records were overwritten before we read them
            notes.append(f"/dev/kmsg: {e}")
            continue
        msg = rec.split(";", 1)[-1]
        if m := AUDIT_SECCOMP.search(msg):
            if int(m[1]) in pids:
                seen[syscall_name(int(m[3])) + ("" if m[2] == comm else f" (as {m[2]}, before the exec)")] += 1
        elif "callbacks suppressed" in msg or "audit_lost" in msg or "backlog limit" in msg:
            notes.append(msg.strip())
    os.close(fd)
    return seen, notes


# --- command line -----------------------------------------------------------------------------


def report(trace: Trace, details: bool, out: Callable[[str], object] = print) -> None:
    """The sorted names with counts; with `details`, roles, arguments, failures and execs too."""
    counts = trace.counts()
    width = max((len(n) for n in counts), default=0)
    for name, n in sorted(counts.items()):
        out(f"{name:<{width}}  {n}")
    if trace.lost:
        out(f"# WARNING: the kernel dropped {trace.lost} trace events; the set may be incomplete")
    if not details:
        return
    roles = Counter(trace.role(t) for t in trace.uml_tasks())
    out("\n# system calls by kind of task [how many tasks]")
    for r, c in sorted(trace.by_role().items()):
        out(f"{r} [{roles[r]}]: {' '.join(sorted(c))}")
    out("\n# arguments")
    for name, c in sorted(trace.details.items()):
        out(f"{name}: " + "; ".join(f"{d} x{n}" if d else f"x{n}" for d, n in c.most_common()))
    if trace.errors:
        out("\n# calls that failed")
        for name, c in sorted(trace.errors.items()):
            out(f"{name}: " + "; ".join(f"{d} x{n}" for d, n in c.most_common()))
    out("")
    for t in trace.uml_tasks():
        if t.execs:
            out(f"# main thread {t.tid}: exec'd {t.execs}; execve {t.calls['execve']}x (the launcher's included)")
    if trace.foreign:
        out(f"# {trace.foreign} events of tasks outside the tree were left out")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comm", default="linux.uml", help="task name to trace (first 15 characters)")
    p.add_argument("--details", action="store_true", help="kinds of task, arguments, failed calls")
    p.add_argument("--names", action="store_true", help="print bare names only (an allowlist)")
    p.add_argument("--json", type=Path, help="write the full result as JSON here")
    p.add_argument("--allow", type=Path, help="run under ALLOW(FILE's names) + LOG(the rest); implies --seccomp-log")
    p.add_argument("--seccomp-log", action="store_true", help="list the traced tasks' type=1326 records (/dev/kmsg)")
    p.add_argument("--buffer-mb", type=int, default=256, help="trace buffer per CPU [%(default)s]")
    p.add_argument("--raw", type=Path, help="also keep the trace's text here")
    p.add_argument("--tracefs", type=Path, default=TRACEFS)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    a = p.parse_args()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not argv:
        p.error("no command")
    allow = a.allow.read_text().split() if a.allow else None
    seccomp_log = a.seccomp_log or allow is not None
    kmsg = kmsg_cursor() if seccomp_log else -1
    rc, trace = run_traced(argv, a.comm, allow, a.tracefs, a.buffer_mb, a.raw)

    def note(line: str) -> None:
        print(line, file=sys.stderr)

    note(f"# {argv[0]} exited with {rc}; {len(trace.uml_tasks())} {trace.comm} tasks traced")
    if a.names:
        print("\n".join(sorted(trace.counts())))
    else:
        report(trace, a.details)
    result = trace.to_json()
    if seccomp_log:
        logged, notes = seccomp_log_since(kmsg, {t.tid for t in trace.uml_tasks()}, trace.comm)
        result["seccomp_logged"] = dict(logged)
        result["seccomp_notes"] = notes
        note(f"# seccomp RET_LOG records of the traced tasks: {dict(logged) or 'none'}")
        for n in notes:
            note(f"#   {n}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
