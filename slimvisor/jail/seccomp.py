"""seccomp allowlists, compiled once with libseccomp (pyseccomp) into classic BPF.

The jailed child only loads the compiled bytes (slimvisor.jail.linux.install_seccomp), so no
library is called between the clone and the exec. A system call outside the list kills the whole
process (SECCOMP_RET_KILL_PROCESS); the engine's parent sees it die of SIGSYS.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterable

from slimvisor.jail import linux

# No new namespaces from inside a jail, by clone or unshare: they are how an unprivileged process
# gets capabilities (CLONE_NEWUSER) and reaches kernel code that is otherwise root's alone.
NEW_NAMESPACES = (linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWUSER
                  | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWCGROUP)  # fmt: skip


# The engine is its PID namespace's init, and signals an init sends itself are dropped: abort()
# (kill(getpid(), SIGABRT) in a loop, as UML's uml_abort does after a panic) would spin forever.
# Such a call is made the process's death instead. (pid argument position, signal argument position)
_SELF_SIGNAL = {"kill": (0, 1), "tkill": (0, 1), "tgkill": (0, 2)}
INIT_PID = 1


def compile_allowlist(allowed: Iterable[str]) -> bytes:
    """A filter that allows `allowed`, clone without new namespaces, answers clone3 with ENOSYS
    (libc then falls back to clone, whose flags a filter can see), makes an init's self-abort its
    death, and kills on anything else."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.KILL_PROCESS)
    allowed = set(allowed)
    for name in sorted(allowed - {"clone", "clone3", *_SELF_SIGNAL}):
        f.add_rule(sc.ALLOW, name)
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, NEW_NAMESPACES, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for name, (pid_arg, sig_arg) in _SELF_SIGNAL.items():
        if name in allowed:  # allowed unless aimed at the init itself with SIGABRT (rules are OR'd)
            f.add_rule(sc.ALLOW, name, sc.Arg(pid_arg, sc.NE, INIT_PID))
            f.add_rule(sc.ALLOW, name, sc.Arg(sig_arg, sc.NE, signal.SIGABRT))
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb") as out:
            f.export_bpf(out)
        program = b""
        while chunk := os.read(r, 65536):
            program += chunk
    finally:
        os.close(r)
    return program
