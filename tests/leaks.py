"""What the test suite started, so that none of it outlives its test or the suite.

Harnesses record here the run trees they create and the pids they are given. A teardown, and
tests/conftest.py once the whole suite has run, look for the processes of those trees with
slimvisor.host.procs: by recorded pid, descent, cgroup, and files, sockets or working directories
under the trees, never by command line or environment (slimvisord's are blank).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from slimvisor.host import procs
from slimvisor.host.procs import ProcessId

SETTLE_S = 15.0  # how long a process found at teardown may take to finish exiting (killed UML, a supervisor)


@dataclass
class Started:
    paths: list[str] = field(default_factory=list)  # prefixes, as slimvisor.host.procs.members takes them
    processes: set[ProcessId] = field(default_factory=set)
    cgroups: list[Path] = field(default_factory=list)


STARTED = Started()


def record_paths(*prefixes: str) -> None:
    STARTED.paths.extend(p for p in prefixes if p not in STARTED.paths)


def record_cgroups(dirs: Iterable[Path]) -> None:
    STARTED.cgroups.extend(d for d in dirs if d not in STARTED.cgroups)


def record_pid(pid: int, into: set[ProcessId] | None = None) -> ProcessId | None:
    """Remember process `pid` (with its start time: a reused pid is not it) for the session, and `into`."""
    ident = procs.process_id(pid)
    if ident is not None:
        STARTED.processes.add(ident)
        if into is not None:
            into.add(ident)
    return ident


def survivors(paths: Iterable[str], recorded: Iterable[ProcessId] = (), cgroups: Iterable[Path] = (),
              settle: float = SETTLE_S) -> dict[int, str]:  # fmt: skip
    """The processes of the trees that are still running once those found have had `settle` s to exit."""
    paths, recorded, cgroups = list(paths), list(recorded), list(cgroups)
    deadline = time.monotonic() + settle
    found = procs.members(paths, recorded, cgroups)
    while found and time.monotonic() < deadline:
        procs.wait_gone(found, deadline - time.monotonic())
        found = procs.members(paths, recorded, cgroups)  # also what an exiting process forked meanwhile
    return found


def describe(found: dict[int, str]) -> list[str]:
    return [f"pid {pid} ({procs.title(pid)}): {why}" for pid, why in sorted(found.items())]
