"""Jails: every domain's engine process runs in one (its own uid, namespaces, root, seccomp, limits).

The model is Firecracker's jailer, done in Python: `spawn` clones the engine into new mount, PID,
IPC, UTS and network namespaces, pivots into a root that holds only what the engine needs, drops
to the domain's own uid with no capabilities, installs a seccomp allowlist and execs. Engine-
neutral: an engine says what its process needs in a `JailSpec`.
"""

from slimvisor.jail.spawn import Bind, Jailed, JailError, JailSpec, jail_root, spawn
from slimvisor.jail.uids import UidLease, uid_range

__all__ = ["Bind", "JailError", "JailSpec", "Jailed", "UidLease", "jail_root", "spawn", "uid_range"]
