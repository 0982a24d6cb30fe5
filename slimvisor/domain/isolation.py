"""What keeps one domain apart from dom0 and from the others for its whole life: a uid of its own
(leased, slimvisor.jail.uids) and a cgroup that bounds its memory and tasks. Every incarnation's
engine runs in a fresh jail (slimvisor.jail) as that uid, inside that cgroup.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from slimvisor.engines.base import Identity
from slimvisor.engines.uml import MAX_TASKS
from slimvisor.jail import UidLease
from slimvisor.model import units

log = logging.getLogger("slimvisor.isolation")

ENGINE_OVERHEAD = 128 * units.MiB  # memory an engine needs beyond guest RAM, unless it says (Engine.overhead)


class Isolation:
    def __init__(self, name: str, memory_mib: int, cgroup_name: str | None = None,
                 overhead: int = ENGINE_OVERHEAD) -> None:  # fmt: skip
        self.lease = UidLease.acquire(name)
        self.limits: dict[str, int] = {}
        try:
            self.cgroup = make_cgroup(cgroup_name or name)
            if self.cgroup is not None:
                self.limits = self.cgroup.set_limits(memory_limit(memory_mib, overhead), MAX_TASKS)
        except BaseException:
            self.lease.release()
            raise

    @property
    def uid(self) -> int:
        return self.lease.uid

    def identity(self) -> Identity:
        procs = tuple(self.cgroup.procs_files()) if self.cgroup is not None else ()
        return Identity(self.lease.uid, self.lease.gid, procs)

    def close(self) -> None:
        """Kill what is left in the cgroup, remove it, give the uid back (in that order)."""
        if self.cgroup is not None:
            with contextlib.suppress(Exception):
                self.cgroup.destroy()
            self.cgroup = None
        self.lease.release()


def memory_limit(memory_mib: int, overhead: int = ENGINE_OVERHEAD) -> int:
    return memory_mib * units.MiB + overhead


def make_cgroup(name: str) -> Any:
    """The domain's cgroup, or None where this host has no usable cpu controller (then said so on use)."""
    try:
        from slimvisor.host.cgroup import DomainCgroup, cgroups_available

        if not cgroups_available():
            return None
        with contextlib.suppress(Exception):
            DomainCgroup.open(name).destroy()  # left from a supervisor that was killed
        return DomainCgroup.create(name)
    except Exception as e:
        log.warning("%s: no cgroup: %s", name, e)
        return None
