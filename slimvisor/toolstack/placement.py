"""Where a pool places a domain: the host with the most unreserved memory that can run it.

Sans-IO: the hosts (as registered in etcd) and what the pool's domains reserve on each go in, a
host comes out, or `NoRoom` saying why each host was passed over. Unreserved memory is the host's
memory less the memory of the pool's domains on it: that is what the pool accounts for (as XAPI does),
not the moment's free memory, which moves with caches and other hosts' work. A host must also report
at least the domain's memory as available now. Ties go to the first name, so a placement is
reproducible; `cluster up` adds each node it placed to `reserved` before the next, which spreads
nodes of equal hosts round-robin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from slimvisor.runtime.errors import SlimvisorError


class NoRoom(SlimvisorError):
    """No member can take the domain; the message names each host and why."""


class Host(Protocol):
    name: str
    memory_mib: int
    free_memory_mib: int
    engines: list[str]
    leaving: bool


def choose(hosts: Iterable[Host], reserved: Mapping[str, int], memory_mib: int, kind: str,
           exclude: Iterable[str] = ()) -> Host:  # fmt: skip
    """The host for a domain of `memory_mib` MiB and type `kind` ("pv", "pvh", "hvm")."""
    passed: list[str] = []
    best: Host | None = None
    excluded = set(exclude)
    for host in sorted(hosts, key=lambda h: h.name):
        unreserved = host.memory_mib - reserved.get(host.name, 0)
        if host.name in excluded:
            passed.append(f"{host.name}: excluded")
        elif host.leaving:
            passed.append(f"{host.name}: leaving the pool")
        elif kind not in host.engines:
            passed.append(f"{host.name}: cannot run {kind} domains")
        elif unreserved < memory_mib:
            passed.append(f"{host.name}: {unreserved} MiB unreserved")
        elif host.free_memory_mib < memory_mib:
            passed.append(f"{host.name}: {host.free_memory_mib} MiB available")
        elif best is None or unreserved > best.memory_mib - reserved.get(best.name, 0):
            best = host
    if best is None:
        raise NoRoom(f"no pool member can run a {memory_mib} MiB {kind} domain"
                     + (f" ({'; '.join(passed)})" if passed else " (the pool has no members)"))
    return best
