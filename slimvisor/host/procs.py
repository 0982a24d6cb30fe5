"""Which processes belong to a run tree: for teardowns that must leave nothing running behind them.

Command lines and environments cannot tell. slimvisord and the supervisors rename themselves, and
setproctitle overwrites the memory that /proc/PID/cmdline and /proc/PID/environ read. A domain's
UML may also run jailed, under another uid and in namespaces of its own. So a process belongs to
a tree when:
- it was recorded (a pid the daemon or a supervisor reported, with its start time, so a reused pid
  is not mistaken for it);
- it descends from a member;
- it sits in one of the tree's cgroups;
- or it has something under one of the tree's paths: its working directory, an open file (also
  one deleted since), or a Unix socket bound there.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterable
from pathlib import Path

ProcessId = tuple[int, int]  # (pid, start time in clock ticks since boot): one process, never a reused pid


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from /proc/PID/stat, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[0].decode(), int(fields[1]), int(fields[19])


def process_id(pid: int) -> ProcessId | None:
    """The identity of live process `pid`, to record now and recognize later; None when it is gone."""
    st = _stat(pid)
    return None if st is None or st[0] in "ZX" else (pid, st[2])


def alive(proc: ProcessId) -> bool:
    """Whether the recorded process still runs (a zombie has finished)."""
    return process_id(proc[0]) == proc


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path.startswith(p) or path == p.rstrip("/") for p in prefixes)


def _unix_sockets(prefixes: tuple[str, ...], pids: Iterable[int]) -> dict[str, str]:
    """"socket:[INODE]" -> path, for the Unix sockets bound under the prefixes.

    Each network namespace has its own table (/proc/PID/net/unix shows PID's): a daemon started in
    another one (a test's netns "host") holds sockets this process's /proc/net/unix never lists,
    so the table of every namespace among `pids` is read, once per namespace.
    """
    tables: dict[int, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            tables.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, f"/proc/{pid}/net/unix")
    out: dict[str, str] = {}
    for table in tables.values():
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split(maxsplit=7)
                if len(fields) == 8 and _under(fields[7].rstrip("\n"), prefixes):
                    out[f"socket:[{fields[6]}]"] = fields[7].rstrip("\n")
    return out


def _cgroup_pids(cgroups: Iterable[Path]) -> dict[int, str]:
    out: dict[int, str] = {}
    for top in cgroups:
        for directory, _, _ in os.walk(top):
            with contextlib.suppress(OSError, ValueError):
                for pid in Path(directory, "cgroup.procs").read_text().split():
                    out[int(pid)] = directory
    return out


def _holds(pid: int, prefixes: tuple[str, ...], sockets: dict[str, str]) -> str | None:
    """What of the tree process `pid` has: its working directory, an open file or a bound socket."""
    with contextlib.suppress(OSError):
        cwd = os.readlink(f"/proc/{pid}/cwd")
        if _under(cwd, prefixes):
            return f"cwd {cwd}"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target in sockets:
                return f"socket {sockets[target]}"
            if _under(target, prefixes):
                return f"open file {target}"
    return None


def members(paths: Iterable[str], recorded: Iterable[ProcessId] = (), cgroups: Iterable[Path] = ()) -> dict[int, str]:
    """The live processes of a tree, pid -> why; never the caller itself.

    `paths` are prefixes: "DIR/" covers DIR and everything below it, "DIR/name" every path that
    starts so (RUN/t123x covers the run dirs RUN/t123x0-ab12 and RUN/t123x1-cd34).
    """
    prefixes = tuple(str(p) for p in paths)
    in_cgroup = _cgroup_pids(cgroups)
    me = os.getpid()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[0] not in "ZX":
            parents[int(entry)] = st[1]
    sockets = _unix_sockets(prefixes, [me, *parents]) if prefixes else {}
    found: dict[int, str] = {pid: "recorded" for pid, start in recorded if pid != me and alive((pid, start))}
    for pid in parents:
        if pid == me or pid in found:
            continue
        if pid in in_cgroup:
            found[pid] = f"in cgroup {in_cgroup[pid]}"
        elif prefixes and (why := _holds(pid, prefixes, sockets)) is not None:
            found[pid] = why
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    queue = list(found)
    while queue:
        parent = queue.pop()
        for child in children.get(parent, []):
            if child != me and child not in found:
                found[child] = f"child of {parent}"
                queue.append(child)
    return found


def title(pid: int) -> str:
    """A process's command line, to show a person (never to decide what a process is)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200] or "?"
    except OSError:
        return "?"


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every one of `pids` has exited (pidfds, no polling); returns those still running."""
    deadline = time.monotonic() + timeout
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        pending = set(fds)
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                pending.discard(fd)
        return sorted(fds[fd] for fd in pending)
    finally:
        for fd in fds:
            os.close(fd)


def kill(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL each process (and the process group it leads, as UML's); returns those still running after."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return wait_gone(pids, timeout)
