"""Per-domain cgroups and CPU pinning: the host side of ``xl sched-credit`` and ``xl vcpu-pin``.

A PV domain is a User-Mode Linux process tree plus a Python backend.  Putting all of them in
one cgroup gives us what Xen's credit scheduler gives a domain -- a *weight* (relative share of
CPU under contention) and a *cap* (hard ceiling in percent of one CPU) -- plus accounting for a
``top`` and a reliable way to take the whole tree down (UML re-parents and ignores
``PR_SET_PDEATHSIG``, so killing "our children" is not enough; killing the cgroup is).

The host layout is probed, never assumed (see :func:`probe`):

* cgroup v2 with the ``cpu`` controller (pure v2, or a hybrid whose v2 mount has it):
  ``<v2 root>/slimvisor.slice/<name>``, with ``+cpu`` (and ``+memory`` when offered) enabled in
  the ``subtree_control`` of the root and of the slice.
* otherwise cgroup v1 with a ``cpu`` hierarchy: ``<cpu>/slimvisor/<name>`` and the same path in
  ``cpuacct`` when mounted separately.  The v1 ``memory`` group is nested under the cgroup *this
  process* is in (``<memory>/<own>/slimvisor/<name>``) so a memory limit imposed on the toolstack
  (container, session) keeps covering its domains instead of being escaped by a move to the root.

Xen -> cgroup mappings (documented because they are lossy):

* weight (Xen 1..65535, default 256): v2 ``cpu.weight = clamp(round(w * 100 / 256), 1, 10000)``
  (256 -> 100, the v2 default); v1 ``cpu.shares = w * 4`` (256 -> 1024, the v1 default, exact).
  :meth:`DomainCgroup.weight` maps back, so on v2 it returns the nearest Xen weight (exact for
  multiples of 64 up to 25600).
* cap (percent of one CPU, 0 = none): ``quota = cap * period / 100`` with period 100 ms;
  v2 ``cpu.max = "quota period"`` or ``"max period"``; v1 ``cpu.cfs_quota_us`` (-1 = none).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from slimvisor.runtime.errors import SlimvisorError

__all__ = [
    "CgroupError",
    "CgroupHost",
    "DomainCgroup",
    "affinity",
    "cgroups_available",
    "cgroups_status",
    "list_groups",
    "parent_dirs",
    "pin",
    "probe",
]

DEFAULT_PARENT = "slimvisor"


def default_parent(run_dir: str | None = None) -> str:
    """The group all of one toolstack's domains sit under: one per run tree, so the domains of a
    second toolstack (a test's own daemon, SLIMVISOR_RUN_DIR) never meet the system's."""
    run_dir = run_dir or os.environ.get("SLIMVISOR_RUN_DIR")
    if not run_dir:
        return DEFAULT_PARENT
    return f"{DEFAULT_PARENT}-{hashlib.sha256(run_dir.encode()).hexdigest()[:10]}"
WEIGHT_MIN, WEIGHT_MAX, WEIGHT_DEFAULT = 1, 65535, 256
PERIOD_US = 100_000
_V2_WEIGHT_MAX = 10_000


class CgroupError(SlimvisorError):
    """A cgroup operation failed or cgroups are unusable here; the message names the path and why."""


@dataclass(frozen=True)
class CgroupHost:
    """What :func:`probe` found: which cgroup version we drive and the controller roots.

    ``cpu`` is the hierarchy that defines a group's identity (its processes, its existence);
    ``cpuacct``/``memory`` are extra v1 hierarchies (None when absent, or same as ``cpu`` on v2).
    ``memory_base`` is the directory under which v1 memory groups are nested (our own cgroup).
    """

    version: int
    cpu: Path
    cpuacct: Path | None
    memory: Path | None
    memory_base: Path | None
    pids: Path | None = None

    def describe(self) -> str:
        extra = [n for n, p in (("cpuacct", self.cpuacct), ("memory", self.memory)) if p is not None]
        return f"cgroup v{self.version} at {self.cpu}" + (f" (+{', '.join(extra)})" if extra else "")


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mountpoint, fstype, options) of every cgroup/cgroup2 mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                mnt = fields[1].replace("\\040", " ")
                out.append((mnt, fields[2], set(fields[3].split(","))))
    return out


def _own_cgroup(controller: str) -> str:
    """This process's path inside the v1 hierarchy carrying ``controller`` (from /proc/self/cgroup)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller in ctrls.split(","):
                return path
    return "/"


def probe() -> CgroupHost:
    """Find a writable cgroup hierarchy with the cpu controller; raise CgroupError saying why not.

    Order: a cgroup2 mount whose ``cgroup.controllers`` offers ``cpu`` (pure v2 hosts), then a v1
    mount carrying ``cpu`` (hybrid hosts whose v2 mount has no cpu, like a hugetlb-only unified).
    """
    mounts = _mounts()
    seen: list[str] = []
    for mnt, fstype, opts in mounts:
        if fstype != "cgroup2":
            continue
        try:
            ctrls = Path(mnt, "cgroup.controllers").read_text().split()
        except OSError as e:
            seen.append(f"{mnt}: {e.strerror}")
            continue
        if "cpu" not in ctrls:
            seen.append(f"cgroup2 at {mnt} lacks the cpu controller (has: {' '.join(ctrls) or 'none'})")
            continue
        _check_writable(mnt, opts)
        root = Path(mnt)
        mem = root if "memory" in ctrls else None
        return CgroupHost(2, root, root, mem, mem, root if "pids" in ctrls else None)
    v1 = {c: Path(mnt) for mnt, fstype, opts in mounts if fstype == "cgroup" for c in opts}
    if "cpu" in v1:
        cpu = v1["cpu"]
        _check_writable(str(cpu), next(o for m, _, o in mounts if Path(m) == cpu))
        acct = v1.get("cpuacct")
        mem = v1.get("memory")
        mem_base = mem / _own_cgroup("memory").lstrip("/") if mem is not None else None
        if mem is not None and not os.access(mem, os.W_OK):
            mem = mem_base = None
        pids = v1.get("pids")
        if pids is not None and not os.access(pids, os.W_OK):
            pids = None
        return CgroupHost(1, cpu, acct if acct != cpu else None, mem, mem_base, pids if pids != cpu else None)
    seen.append("no cgroup v1 hierarchy with the cpu controller" if mounts else "no cgroup filesystem mounted")
    raise CgroupError("; ".join(seen))


def _check_writable(mnt: str, opts: set[str]) -> None:
    if "ro" in opts or not os.access(mnt, os.W_OK):
        raise CgroupError(f"{mnt}: cgroup filesystem is read-only or not writable by uid {os.getuid()}")


def cgroups_status() -> tuple[bool, str]:
    """(True, description) when domains can get cgroups, else (False, why) -- for clean degradation.

    Callers that schedule should report ``f"not supported on this host: {why}"`` on False.
    """
    try:
        return True, probe().describe()
    except (CgroupError, OSError) as e:
        return False, str(e)


def cgroups_available() -> bool:
    """Whether domains can get cgroups here (see :func:`cgroups_status` for the reason if not)."""
    return cgroups_status()[0]


def _write(path: Path, value: str) -> None:
    """Write one value with a single write(2) so the kernel's error surfaces here, naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError(f"{path}: cannot write {value!r}: {e.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"{path}: cannot read: {e.strerror}") from None


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"bad cgroup name {name!r}: must be a single non-empty path component")


def _check_weight(weight: int) -> None:
    if not WEIGHT_MIN <= weight <= WEIGHT_MAX:
        raise ValueError(f"weight {weight} out of range {WEIGHT_MIN}..{WEIGHT_MAX} (Xen credit; default 256)")


def _check_cap(cap: int) -> None:
    limit = 100 * (os.cpu_count() or 1)
    if not 0 <= cap <= limit:
        raise ValueError(f"cap {cap} out of range 0..{limit} (percent of one CPU, 0 = no cap, {os.cpu_count()} CPUs)")


class DomainCgroup:
    """One domain's cgroup (one directory per hierarchy in use). Build with create() or open()."""

    def __init__(self, host: CgroupHost, name: str, parent: str | None = None) -> None:
        parent = parent or default_parent()
        _check_name(name)
        _check_name(parent)
        self.host, self.name, self.parent = host, name, parent
        pdir = parent + ".slice" if host.version == 2 else parent
        self.path = host.cpu / pdir / name
        """The identity directory (cpu hierarchy); its cgroup.procs lists the domain's processes."""
        self.acct_path = host.cpuacct / pdir / name if host.cpuacct is not None else None
        self.mem_path = host.memory_base / pdir / name if host.memory_base is not None else None
        self.pids_path = host.pids / pdir / name if host.pids is not None else None

    def _dirs(self) -> list[Path]:
        paths = (self.path, self.acct_path, self.mem_path, self.pids_path)
        return list(dict.fromkeys(p for p in paths if p is not None))

    @classmethod
    def create(cls, name: str, parent: str | None = None, host: CgroupHost | None = None) -> DomainCgroup:
        """Make (or re-use) the domain's group, enabling the controllers the parent must delegate."""
        self = cls(host or probe(), name, parent)
        if self.host.version == 2:
            want = ["cpu"] + [c for c in ("memory", "pids") if getattr(self.host, c) is not None]
            root = self.host.cpu
            _enable(root, want)
            _mkdir(self.path.parent)
            _enable(self.path.parent, want)
            _mkdir(self.path)
        else:
            for d in self._dirs():
                _mkdir(d.parent)
                _mkdir(d)
        return self

    @classmethod
    def open(cls, name: str, parent: str | None = None, host: CgroupHost | None = None) -> DomainCgroup:
        """Attach to an existing group (a restarted daemon re-finding its domains); CgroupError if absent."""
        self = cls(host or probe(), name, parent)
        if not self.path.is_dir():
            raise CgroupError(f"{self.path}: no cgroup for domain {name!r}")
        if self.host.version == 1 and self.mem_path is not None and not self.mem_path.is_dir():
            # We may run in another memory cgroup than the daemon that created it: ask a member.
            self.mem_path = self._member_memory_dir()
        for attr in ("acct_path", "mem_path", "pids_path"):
            p = getattr(self, attr)
            if p is not None and not p.is_dir():
                setattr(self, attr, None)
        return self

    def _member_memory_dir(self) -> Path | None:
        assert self.host.memory is not None
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                    _, ctrls, path = line.split(":", 2)
                    if "memory" in ctrls.split(","):
                        return self.host.memory / path.lstrip("/")
        return None

    def __repr__(self) -> str:
        return f"DomainCgroup({self.name!r}, {self.path})"

    # -- membership ---------------------------------------------------------------------------

    def add(self, pid: int) -> None:
        """Move a whole process (all its threads: cgroup.procs moves the thread group) into the group.

        Children forked afterwards start in the group, so add the domain's root process early.
        """
        for d in self._dirs():
            _write(d / "cgroup.procs", str(pid))

    def procs_files(self) -> list[Path]:
        """The cgroup.procs of every hierarchy: a process writes "0" to each to join the group
        itself (a jailed engine, whose own pid in its namespace means nothing here)."""
        return [d / "cgroup.procs" for d in self._dirs()]

    # -- limits -------------------------------------------------------------------------------

    def set_limits(self, memory_bytes: int, tasks: int) -> dict[str, int]:
        """Bound the group's memory and its number of tasks where the host has the controller;
        returns what was set (pids.max; memory.max or memory.limit_in_bytes)."""
        done: dict[str, int] = {}
        if self.pids_path is not None:
            _write(self.pids_path / "pids.max", str(tasks))
            done["pids.max"] = tasks
        if self.mem_path is not None:
            knob = "memory.max" if self.host.version == 2 else "memory.limit_in_bytes"
            _write(self.mem_path / knob, str(memory_bytes))
            done[knob] = memory_bytes
        return done

    def pids(self) -> list[int]:
        """Processes (thread-group ids) currently in the group."""
        return sorted({int(x) for x in _read(self.path / "cgroup.procs").split()})

    # -- scheduling ---------------------------------------------------------------------------

    def set_weight(self, weight: int) -> None:
        """Set the Xen credit weight (1..65535, 256 = default); see the module doc for the mapping."""
        _check_weight(weight)
        if self.host.version == 2:
            _write(self.path / "cpu.weight", str(min(max(round(weight * 100 / 256), 1), _V2_WEIGHT_MAX)))
        else:
            _write(self.path / "cpu.shares", str(weight * 4))

    def weight(self) -> int:
        """The Xen weight equivalent to what the kernel file holds now (not a cached value)."""
        if self.host.version == 2:
            return max(WEIGHT_MIN, min(WEIGHT_MAX, round(int(_read(self.path / "cpu.weight")) * 256 / 100)))
        return max(WEIGHT_MIN, min(WEIGHT_MAX, round(int(_read(self.path / "cpu.shares")) / 4)))

    def set_cap(self, cap: int) -> None:
        """Cap CPU at ``cap`` percent of one CPU (200 = two CPUs' worth); 0 removes the cap."""
        _check_cap(cap)
        quota = cap * PERIOD_US // 100
        if self.host.version == 2:
            _write(self.path / "cpu.max", f"{quota if cap else 'max'} {PERIOD_US}")
        else:
            # Quota must be valid for the period being set: lift it first, then set period, then quota.
            _write(self.path / "cpu.cfs_quota_us", "-1")
            _write(self.path / "cpu.cfs_period_us", str(PERIOD_US))
            if cap:
                _write(self.path / "cpu.cfs_quota_us", str(quota))

    def cap(self) -> int:
        """The cap in percent of one CPU read back from the kernel; 0 = uncapped."""
        if self.host.version == 2:
            quota, period = _read(self.path / "cpu.max").split()
        else:
            quota = _read(self.path / "cpu.cfs_quota_us").strip()
            period = _read(self.path / "cpu.cfs_period_us").strip()
        if quota in ("max", "-1"):
            return 0
        return max(1, round(int(quota) * 100 / int(period)))

    def pin(self, cpus: set[int]) -> None:
        """Pin every thread of every process now in the group (see :func:`pin`)."""
        pin(self.pids(), cpus)

    # -- accounting ---------------------------------------------------------------------------

    def cpu_usage_ns(self) -> int | None:
        """Total CPU time consumed by the group (including exited members); None if not accounted."""
        if self.host.version == 2:
            for line in _read(self.path / "cpu.stat").splitlines():
                key, _, val = line.partition(" ")
                if key == "usage_usec":
                    return int(val) * 1000
            return None
        if self.acct_path is not None:
            return int(_read(self.acct_path / "cpuacct.usage"))
        return None

    def memory_bytes(self) -> int | None:
        """Memory charged to the group (memory.current / memory.usage_in_bytes); None if unavailable."""
        if self.mem_path is None:
            return None
        f = "memory.current" if self.host.version == 2 else "memory.usage_in_bytes"
        try:
            return int(_read(self.mem_path / f))
        except CgroupError:
            return None

    # -- teardown -----------------------------------------------------------------------------

    def destroy(self, timeout: float = 10.0) -> None:
        """SIGKILL everything in the group until it is empty, then remove its directories.

        Repeats the kill so processes forked mid-teardown die too; uses v2 ``cgroup.kill`` when
        the kernel has it.  Refuses to kill the calling process.  Idempotent: a missing group is fine.
        """
        if not self.path.is_dir():
            self._rmdirs(time.monotonic() + timeout)
            return
        deadline = time.monotonic() + timeout
        kill_file = self.path / "cgroup.kill"
        while True:
            pids = self.pids()
            if not pids:
                break
            if os.getpid() in pids:
                raise CgroupError(f"{self.path}: refusing to destroy a group containing the caller ({os.getpid()})")
            if kill_file.exists():
                _write(kill_file, "1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path}: processes {pids} survived SIGKILL for {timeout}s")
            time.sleep(0.02)
        self._rmdirs(deadline)

    def _rmdirs(self, deadline: float) -> None:
        for d in self._dirs():
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY: killed tasks not yet through exit; retry until the deadline.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"{d}: cannot remove: {e.strerror}") from None
                    time.sleep(0.02)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        raise CgroupError(f"{path}: cannot create cgroup: {e.strerror}") from None


def _enable(group: Path, controllers: list[str]) -> None:
    """Delegate controllers to the group's children (v2 subtree_control) unless already enabled."""
    have = _read(group / "cgroup.subtree_control").split()
    missing = [c for c in controllers if c not in have]
    if missing:
        _write(group / "cgroup.subtree_control", " ".join("+" + c for c in missing))


def _parent_dirs(parent: str, host: CgroupHost) -> list[Path]:
    name = parent + ".slice" if host.version == 2 else parent
    bases = (host.cpu, host.cpuacct, host.memory_base, host.pids)
    return list(dict.fromkeys(b / name for b in bases if b is not None))


def parent_dirs(parent: str | None = None) -> list[Path]:
    """The directories of a toolstack's parent group, one per hierarchy (none where cgroups are unusable):
    every process of its domains sits below them."""
    try:
        return _parent_dirs(parent or default_parent(), probe())
    except (CgroupError, OSError):
        return []


def list_groups(parent: str | None = None, host: CgroupHost | None = None) -> list[str]:
    """Names of the existing domain groups under ``parent`` (empty if none or none created yet)."""
    host = host or probe()
    base = _parent_dirs(parent or default_parent(), host)[0]
    try:
        return sorted(p.name for p in base.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CgroupError(f"{base}: cannot list: {e.strerror}") from None


def remove_parent(parent: str | None = None, host: CgroupHost | None = None) -> None:
    """Remove the toolstack's parent group once no domain group is left in it (a test daemon's end)."""
    host = host or probe()
    for d in _parent_dirs(parent or default_parent(), host):
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()


# -- CPU pinning (xl vcpu-pin) ------------------------------------------------------------------


def _format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Restrict every thread of each process to ``cpus`` (sched_setaffinity on /proc/PID/task/*).

    Affinity is per thread and only inherited at creation, so pinning just the pid would leave
    UML's existing threads free.  Everything is validated before anything is changed.
    """
    pids = list(pids)
    _check_cpus(cpus)
    tasks: list[Path] = []
    for pid in pids:
        tdir = Path(f"/proc/{pid}/task")
        try:
            tasks.extend(tdir / t for t in os.listdir(tdir))
        except FileNotFoundError:
            raise ValueError(f"no such process {pid}") from None
    for t in tasks:
        # A thread may have exited since listing; that is not an error.
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(t.name), cpus)


def pin_thread(tid: int, cpus: set[int]) -> None:
    """Restrict one thread (a QEMU vCPU) to ``cpus``, checked as :func:`pin` checks them."""
    _check_cpus(cpus)
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        os.sched_setaffinity(tid, cpus)


def _check_cpus(cpus: set[int]) -> None:
    allowed = os.sched_getaffinity(0)
    if not cpus:
        raise ValueError("empty CPU set")
    bad = set(cpus) - allowed
    if bad:
        raise ValueError(
            f"cpu {_format_cpus(bad)} not available on this host "
            f"(usable: {_format_cpus(allowed)}; {os.cpu_count()} CPUs)"
        )


def affinity(pid: int) -> set[int]:
    """The CPUs the process's main thread may run on."""
    try:
        return set(os.sched_getaffinity(pid))
    except ProcessLookupError:
        raise ValueError(f"no such process {pid}") from None
