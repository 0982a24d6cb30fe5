"""The few Linux system calls the jail needs that Python 3.11's os module lacks, over ctypes.

Constants are named as in the kernel's uapi headers (linux/sched.h, linux/mount.h, linux/prctl.h).
"""

from __future__ import annotations

import ctypes
import os
import signal

# include/uapi/linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000

# include/uapi/linux/mount.h
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

SYS_clone = 56  # arch/x86/entry/syscalls/syscall_64.tbl
SYS_pivot_root = 155
SYS_seccomp = 317

# include/uapi/linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
# Held across the clone: PyDLL keeps the GIL, so no other thread of ours runs mid-clone.
_pyclone = ctypes.PyDLL(None, use_errno=True).syscall
_pyclone.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def clone(flags: int) -> int:
    """fork() into new namespaces: 0 in the child, the child's pid in the parent.

    Unlike unshare(CLONE_NEWPID) (which moves only later children), the child itself becomes PID 1
    of its namespace, so the engine we exec there is the namespace's init: when it dies, the
    kernel kills everything else in it. Python's fork hooks run around the raw clone, as os.fork's do.
    """
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = _pyclone(ctypes.c_long(SYS_clone), ctypes.c_ulong(flags | signal.SIGCHLD), None, None, None, None)
    err = ctypes.get_errno()
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


def _enc(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = _enc
    _check(_libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def umount_detach(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_pivot_root, new_root.encode(), put_old.encode()), "pivot_root")


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, len(data)), "sethostname")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl {option}")


def install_seccomp(program: bytes, all_threads: bool = False) -> None:
    """Load a classic-BPF seccomp program (struct sock_filter[]); needs PR_SET_NO_NEW_PRIVS first.
    `all_threads`: every thread of the process at once (SECCOMP_FILTER_FLAG_TSYNC), not the caller's alone."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_TSYNC if all_threads else 0
    result = _libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER), ctypes.c_ulong(flags),
                           ctypes.byref(prog))  # fmt: skip
    if result > 0:  # TSYNC: the id of a thread that could not be synchronised
        raise OSError(f"seccomp: thread {result} could not take the filter")
    _check(result, "seccomp")


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())
