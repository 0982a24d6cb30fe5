"""Density: K 64 MiB busybox PV domains started at once through slimvisord, against K bare linux.uml.

Paths, each booting K domains at once, every domain on its own copy of the busybox root disk:
  slimvisor  K `create` requests pipelined to a private slimvisord (xl.cfg: memory=64, one raw disk);
             each domain is a supervisor, a backend process (Python vhost-user blk, vsock, balloon)
             and linux.uml
  bare       K `linux.uml mem=64M ubda=DISK` processes (UML's in-kernel ubd, the anchor of bench/blk.py)
Reported per K (medians over interleaved rounds, the two paths alternating which goes first):
  - time until all K guests printed "slimvisor: HOST is up" (and the median domain), ratio slimvisor/bare;
  - dom0 memory per domain: (daemon + supervisors + backends) PSS / K, also USS and RSS;
  - the UML processes' PSS per domain on both paths, and the host's used memory (MemTotal -
    MemAvailable) per domain, for context.
--find-max then raises K for slimvisor until a domain fails to come up, all-up takes longer than
--max-boot-s, or the next step would pass --mem-ceiling-gib of host memory (bounded in steps and time).

    python3 bench/density.py [--k 10,25,50,100] [--rounds 3] [--find-max] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from blk import UML, UP  # bench/blk.py: the bare anchor's kernel and the guest's line at init
from rich.console import Console
from rich.table import Table

from slimvisor.images.cache import busybox_assets
from slimvisor.toolstack import daemonctl
from slimvisor.toolstack.api import ApiError, Client

MIB = 1 << 20
GIB = 1 << 30
ENDED = re.compile(rb"\[slimvisor: [^:\]]+: ([^\]]*)\]")  # the supervisor's notes: on_crash=..., powered off
_PR_SET_PDEATHSIG = 1
console = Console(stderr=True)


# -- measuring ------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int] | None:
    """/proc/PID/smaps_rollup in bytes, or None when the process is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


@dataclass
class Mem:
    """Memory of a set of processes, in bytes (USS = Private_Clean + Private_Dirty, as psutil)."""

    procs: int = 0
    rss: int = 0
    pss: int = 0
    uss: int = 0
    pss_anon: int = 0
    pss_file: int = 0
    pss_shmem: int = 0
    cpu_s: float = 0.0  # user + system CPU time so far, with reaped children's

    def add_pid(self, pid: int) -> None:
        m = smaps_rollup(pid)
        if m is None:
            return
        with contextlib.suppress(psutil.Error):
            c = psutil.Process(pid).cpu_times()
            self.cpu_s += c.user + c.system + c.children_user + c.children_system
        self.procs += 1
        self.rss += m.get("Rss", 0)
        self.pss += m.get("Pss", 0)
        self.uss += m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
        self.pss_anon += m.get("Pss_Anon", 0)
        self.pss_file += m.get("Pss_File", 0)
        self.pss_shmem += m.get("Pss_Shmem", 0)

    def __add__(self, other: Mem) -> Mem:
        return Mem(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))


def tree(pid: int) -> list[int]:
    """A process and all its descendants (UML's helpers and its guest's address-space processes)."""
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def host_used() -> int:
    """MemTotal - MemAvailable, bytes: what the host cannot give to a new process now."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class UpWatch:
    """Follows the console logs of K domains; notes when each reached init, or ended."""

    def __init__(self, logs: dict[str, Path]) -> None:
        self.logs = logs
        self.pos = dict.fromkeys(logs, 0)
        self.tail = dict.fromkeys(logs, b"")
        self.up: dict[str, float] = {}
        self.ended: dict[str, str] = {}
        self.rx = re.compile(UP.encode())

    def poll(self, t0: float) -> None:
        now = time.monotonic() - t0
        for name, path in self.logs.items():
            if name in self.up or name in self.ended:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(self.pos[name])
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            self.pos[name] += len(data)
            text = self.tail[name] + data
            self.tail[name] = text[-512:]
            if self.rx.search(text):
                self.up[name] = now
            elif m := ENDED.search(text):
                self.ended[name] = m.group(1).decode(errors="replace")

    def done(self) -> bool:
        return len(self.up) + len(self.ended) == len(self.logs)


@dataclass
class Run:
    path: str  # "slimvisor" or "bare"
    k: int
    up: int = 0
    t_all_up: float | None = None  # None: not all came up
    t_median_up: float | None = None
    t_creates: float | None = None  # slimvisor: until the daemon answered every create
    mem: dict[str, Mem] = field(default_factory=dict)  # daemon, supervisors, backends, uml
    host_used_delta: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def dom0(self) -> Mem:
        return self.mem.get("daemon", Mem()) + self.mem.get("supervisors", Mem()) + self.mem.get("backends", Mem())


@dataclass
class Limits:
    boot_s: float  # give up on the run (a domain not up) after this long
    ceiling: int  # host used memory, bytes, that a run may not pass
    settle_s: float  # after all are up, before measuring memory


class CeilingReached(Exception):
    pass


def wait_up(watch: UpWatch, t0: float, limits: Limits, tick: Callable[[], None] = lambda: None,
            exited: Callable[[], dict[str, str]] = dict) -> None:  # fmt: skip
    """Poll until every domain is up or ended, the time limit passes, or host memory passes the ceiling."""
    while True:
        tick()
        watch.poll(t0)
        for name, why in exited().items():
            if name not in watch.up:
                watch.ended.setdefault(name, why)
        if watch.done() or time.monotonic() - t0 > limits.boot_s:
            return
        if host_used() > limits.ceiling:
            raise CeilingReached(f"host used memory passed {limits.ceiling / GIB:.1f} GiB")
        time.sleep(0.05)


def finish(run: Run, watch: UpWatch, baseline: int) -> None:
    run.up = len(watch.up)
    if watch.up:
        run.t_median_up = statistics.median(watch.up.values())
    if run.up == run.k:
        run.t_all_up = max(watch.up.values())
    run.host_used_delta = host_used() - baseline
    for name in watch.logs:
        if name not in watch.up:
            run.failures.append(f"{name}: {watch.ended.get(name, 'not up in time')}")


# -- disks ------------------------------------------------------------------------------------------
@dataclass
class Disks:
    """How each domain gets its own root disk: "copy" (a sparse copy each) or "overlay" (copy-on-write
    over one shared base: slimvisor's overlay format on the slimvisor path, UML's ubd COW file on bare)."""

    mode: str
    base: Path  # the busybox root disk (copy mode) or a private copy of it that overlays read

    def make(self, path: str, names: list[str], where: Path) -> dict[str, str]:
        """Per domain: the disk's xl.cfg target,format (slimvisor) or ubd spec (bare); written before the clock."""
        out = {}
        for name in names:
            if self.mode == "copy":
                dst = where / f"{name}.ext4"
                subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(self.base), str(dst)], check=True)
                out[name] = f"{dst},raw" if path == "slimvisor" else str(dst)
            elif path == "slimvisor":
                from slimvisor.storage import create_overlay

                create_overlay(str(where / f"{name}.ovl"), str(self.base))
                out[name] = f"{where / name}.ovl,overlay"
            else:
                out[name] = f"{where / name}.cow,{self.base}"  # UML creates the COW file at boot
        os.sync()
        return out


# -- the slimvisor path -----------------------------------------------------------------------------
def xlcfg(name: str, disk: str) -> str:
    return f'name = "{name}"\nmemory = 64\ndisk = [ "{disk},xvda,rw" ]\nextra = "quiet"\n'


@contextlib.contextmanager
def private_toolstack(top: Path) -> Iterator[None]:
    """SLIMVISOR_{RUN,STATE,LOG}_DIR under `top` for this process and the daemon it starts."""
    keys = {"SLIMVISOR_RUN_DIR": top / "run", "SLIMVISOR_STATE_DIR": top / "state", "SLIMVISOR_LOG_DIR": top / "log"}
    saved = {k: os.environ.get(k) for k in (*keys, "SLIMVISOR_SOCKET")}
    os.environ.pop("SLIMVISOR_SOCKET", None)
    os.environ.update({k: str(v) for k, v in keys.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kill_leftovers(top: Path, names: list[str]) -> int:
    """Kill what of this run outlived it: the processes of its run tree (slimvisor.host.procs: by the
    files, sockets, working directories and cgroups they hold there, never by their blank or jailed
    command lines), then remove its cgroups."""
    from slimvisor.host import procs
    from slimvisor.host.cgroup import default_parent, parent_dirs

    parent = default_parent(str(top / "run"))
    killed: set[int] = set()
    for _ in range(10):  # again, until none: a UML killed mid-fork may leave a fresh orphan helper
        pids = procs.members([f"{top}/"], cgroups=parent_dirs(parent))
        if not pids:
            break
        procs.kill(pids)
        killed.update(pids)
    with contextlib.suppress(Exception):  # the per-run-tree cgroups (slimvisor.host.cgroup)
        from slimvisor.host.cgroup import DomainCgroup, probe, remove_parent

        host = probe()
        for name in names:
            with contextlib.suppress(Exception):
                DomainCgroup.open(name, parent=parent, host=host).destroy()
        with contextlib.suppress(OSError):
            remove_parent(parent, host)  # in every hierarchy (pids too)
    return len(killed)


def run_slimvisor(k: int, initrd: Path, disk: Disks, limits: Limits, work: Path, prefix: str) -> Run:
    del initrd  # the daemon boots a root disk with the cached busybox initrd (boot_initrd) by itself
    run = Run("slimvisor", k)
    top = Path(tempfile.mkdtemp(prefix="svb-", dir="/run"))
    names = [f"{prefix}{i}" for i in range(k)]
    disks_dir = work / "disks"
    disks_dir.mkdir()
    client: Client | None = None
    daemon_pid = 0
    created: set[str] = set()
    try:
        with private_toolstack(top):
            disks = disk.make("slimvisor", names, disks_dir)
            client = Client(top / "run" / "slimvisord.sock", timeout=300)
            daemon_pid = int(client.call("info")["pid"])
            watch = UpWatch({n: top / "log" / f"{n}.console.log" for n in names})
            pending: dict[int, str] = {}
            baseline = host_used()
            t0 = time.monotonic()
            for name in names:
                req = client.send("create", config=xlcfg(name, disks[name]), filename=f"{name}.cfg", cwd="/")
                pending[req] = name
            cl = client

            def replies() -> None:
                while pending and (b"\n" in cl.buf or select.select([cl.sock], [], [], 0)[0]):
                    msg, fds = cl.receive()
                    for fd in fds:
                        os.close(fd)
                    name = pending.pop(msg.get("id", -1), None)
                    if name is None:
                        continue
                    if "error" in msg:
                        watch.ended[name] = f"create failed: {msg['error'].get('message')}"
                    else:
                        created.add(name)
                    if not pending:
                        run.t_creates = time.monotonic() - t0

            wait_up(watch, t0, limits, tick=replies)
            while pending and time.monotonic() - t0 < limits.boot_s + 60:  # the answers to the rest
                replies()
                time.sleep(0.05)
            if watch.done() and watch.up:
                time.sleep(limits.settle_s)
            finish(run, watch, baseline)
            run.mem = {"daemon": Mem(), "supervisors": Mem(), "backends": Mem(), "uml": Mem()}
            run.mem["daemon"].add_pid(daemon_pid)
            for name in sorted(created):
                try:
                    info = client.call("domain-info", domain=name)
                except ApiError as e:
                    run.failures.append(f"{name}: domain-info: {e.message}")
                    continue
                run.mem["supervisors"].add_pid(int(info["supervisor"]))
                pids = [int(p) for p in info["pids"]]
                if pids:
                    for pid in tree(pids[0]):
                        run.mem["uml"].add_pid(pid)
                for pid in pids[1:]:
                    run.mem["backends"].add_pid(pid)
    finally:
        _stop_toolstack(client, top, names)
        shutil.rmtree(disks_dir, ignore_errors=True)
    return run


def _stop_toolstack(client: Client | None, top: Path, names: list[str]) -> None:
    """Destroy every domain through the API, stop the daemon (`slimvisor daemon stop`'s way: by the pid
    in its lock file), then kill whatever is left."""
    with signals_held():
        if client is not None:
            with contextlib.suppress(Exception):
                client.sock.settimeout(30)
                for name in names:  # also the ones whose create answer never came
                    with contextlib.suppress(ApiError):
                        client.call("destroy", domain=name)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and len(client.call("list")["domains"]) > 1:
                    time.sleep(0.2)
            client.close()
        try:
            daemonctl.stop(top / "run", top / "run" / "slimvisord.sock", timeout=15)
        except (TimeoutError, OSError) as e:
            console.print(f"[yellow]slimvisord did not stop: {e}[/yellow]")
        if left := _kill_leftovers(top, names):
            console.print(f"[yellow]killed {left} processes the toolstack left behind[/yellow]")
        shutil.rmtree(top, ignore_errors=True)


# -- the bare path ----------------------------------------------------------------------------------
def _bare_child() -> None:
    """Before exec: no core files, and die with the benchmark (as slimvisor's engine does)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def bare_argv(initrd: Path, disk: str, name: str, uml_dir: Path) -> list[str]:
    """bench/blk.py's bare anchor (initrd, root=/dev/ubda), with 64 MiB and a umid of its own."""
    return [UML, "mem=64M", f"umid={name}", f"initrd={initrd}", "root=/dev/ubda", f"ubda={disk}", "con=null",
            "con0=fd:0,fd:1", f"uml_dir={uml_dir}", "quiet"]  # fmt: skip


def run_bare(k: int, initrd: Path, disk: Disks, limits: Limits, work: Path, prefix: str) -> Run:
    run = Run("bare", k)
    top = Path(tempfile.mkdtemp(prefix="svb-bare-", dir="/run"))
    names = [f"{prefix}{i}" for i in range(k)]
    disks_dir = work / "disks"
    disks_dir.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stdin_w: list[int] = []  # held open: a console at EOF would end the guest's shell, and the domain
    try:
        disks = disk.make("bare", names, disks_dir)
        watch = UpWatch({n: top / f"{n}.console.log" for n in names})
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": "/dev/shm"}  # as slimvisor's engine
        baseline = host_used()
        t0 = time.monotonic()
        for name in names:
            r, w = os.pipe()
            stdin_w.append(w)
            with open(top / f"{name}.console.log", "wb") as log:
                try:
                    procs[name] = subprocess.Popen(
                        bare_argv(initrd, disks[name], name, top), stdin=r, stdout=log, stderr=subprocess.STDOUT,
                        env=env, cwd=top, start_new_session=True, preexec_fn=_bare_child, close_fds=True,
                    )  # fmt: skip
                finally:
                    os.close(r)

        def exited() -> dict[str, str]:
            return {n: f"linux.uml exited ({p.returncode})" for n, p in procs.items() if p.poll() is not None}

        wait_up(watch, t0, limits, exited=exited)
        if watch.done() and watch.up:
            time.sleep(limits.settle_s)
        finish(run, watch, baseline)
        run.mem = {"uml": Mem()}
        for p in procs.values():
            for pid in tree(p.pid):
                run.mem["uml"].add_pid(pid)
    finally:
        with signals_held():
            for p in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            for p in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            for w in stdin_w:
                os.close(w)
            shutil.rmtree(top, ignore_errors=True)
            shutil.rmtree(disks_dir, ignore_errors=True)
    return run


# -- running it all ---------------------------------------------------------------------------------
@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Clean-up that Ctrl-C cannot cut short: SIGINT/SIGTERM wait until it is done."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Bench:
    def __init__(self, initrd: Path, disk: Disks, limits: Limits, work: Path) -> None:
        self.initrd, self.disk, self.limits, self.work = initrd, disk, limits, work
        self.runs: list[Run] = []
        self.serial = 0

    def one(self, path: str, k: int) -> Run:
        self.serial += 1
        prefix = f"d{os.getpid() % 10000}r{self.serial}x"  # unique names: cgroups, umids, logs
        fn = run_slimvisor if path == "slimvisor" else run_bare
        console.print(f"{path} K={k} ...", end=" ")
        try:
            run = fn(k, self.initrd, self.disk, self.limits, self.work, prefix)
        except CeilingReached as e:
            run = Run(path, k, failures=[str(e)])
        self.runs.append(run)
        up = f"{run.t_all_up:.2f} s" if run.t_all_up is not None else f"[red]{run.up}/{k} up[/red]"
        extra = f", dom0 PSS {run.dom0.pss / k / MIB:.2f} MiB/dom" if path == "slimvisor" else ""
        console.print(f"all up {up}{extra}, host {run.host_used_delta / k / MIB:.1f} MiB/dom")
        for f in run.failures[:3]:
            console.print(f"  [red]{f}[/red]")
        return run


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run], ks: list[int]) -> list[dict[str, Any]]:
    """Medians per K and path over the rounds in which every domain came up; memory in MiB."""
    out = []
    for k in ks:
        row: dict[str, Any] = {"k": k}
        for path in ("slimvisor", "bare"):
            rs = [r for r in runs if r.k == k and r.path == path]
            ok = [r for r in rs if r.t_all_up is not None]
            row[path] = {
                "rounds": len(rs), "all_up_rounds": len(ok), "up": [r.up for r in rs],
                "t_all_up_s": med([r.t_all_up for r in ok if r.t_all_up is not None]),
                "t_median_up_s": med([r.t_median_up for r in ok if r.t_median_up is not None]),
                "t_creates_s": med([r.t_creates for r in ok if r.t_creates is not None]),
                "uml_pss_mib": med([r.mem["uml"].pss / k / MIB for r in ok if "uml" in r.mem]),
                "host_used_mib": med([r.host_used_delta / k / MIB for r in ok]),
                "uml_cpu_s": med([r.mem["uml"].cpu_s / k for r in ok if "uml" in r.mem]),
            }  # fmt: skip
            if path == "slimvisor":
                for what in ("pss", "uss", "rss", "pss_anon", "pss_file", "pss_shmem"):
                    row[path][f"dom0_{what}_mib"] = med([getattr(r.dom0, what) / k / MIB for r in ok])
                row[path]["dom0_cpu_s"] = med([r.dom0.cpu_s / k for r in ok])
                row[path]["dom0_pss_own_mib"] = med([(r.dom0.pss - r.dom0.pss_shmem) / k / MIB for r in ok])
                for part in ("daemon", "supervisors", "backends"):
                    n = 1 if part == "daemon" else k  # the daemon in total; the others per domain
                    for what in ("pss", "uss", "rss", "pss_anon", "pss_file", "pss_shmem"):
                        row[path][f"{part}_{what}_mib"] = med([getattr(r.mem[part], what) / n / MIB for r in ok])
        sv, bare = row["slimvisor"]["t_all_up_s"], row["bare"]["t_all_up_s"]
        row["ratio_all_up"] = sv / bare if sv and bare else None
        out.append(row)
    return out


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _table(title: str, columns: list[str]) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right")
    return t


def report(rows: list[dict[str, Any]], rounds: int, disk: str, max_found: dict[str, Any] | None) -> None:
    out = Console(width=max(Console().width, 150))
    t = _table(f"K 64 MiB busybox domains started at once ({disk} root disks): time until all reached init "
               f"({rounds} interleaved rounds, medians of the rounds where all came up)",
               ["K", "rounds all up sv / bare", "all up: slimvisor (s)", "bare linux.uml (s)", "slimvisor / bare",
                "median domain up sv / bare (s)", "creates answered (s)", "CPU s/dom: UML sv / bare",
                "dom0"])  # fmt: skip
    for r in rows:
        sv, bare = r["slimvisor"], r["bare"]
        t.add_row(str(r["k"]), f"{sv['all_up_rounds']}/{sv['rounds']} / {bare['all_up_rounds']}/{bare['rounds']}",
                  _f(sv["t_all_up_s"]), _f(bare["t_all_up_s"]), _f(r["ratio_all_up"]) + "x",
                  f"{_f(sv['t_median_up_s'])} / {_f(bare['t_median_up_s'])}", _f(sv["t_creates_s"]),
                  f"{_f(sv['uml_cpu_s'])} / {_f(bare['uml_cpu_s'])}", _f(sv["dom0_cpu_s"]))  # fmt: skip
    out.print(t)
    m = _table("Memory per domain (MiB): dom0 = slimvisord + supervisors + backends; guest RAM = the backends' "
               "share of the UML memory they map (shmem)",
               ["K", "dom0 PSS", "dom0 PSS w/o guest RAM", "dom0 USS", "dom0 RSS", "UML PSS sv / bare",
                "host used sv / bare", "host used sv - bare"])  # fmt: skip
    for r in rows:
        sv, bare = r["slimvisor"], r["bare"]
        hs, hb = sv["host_used_mib"], bare["host_used_mib"]
        m.add_row(str(r["k"]), _f(sv["dom0_pss_mib"]), _f(sv["dom0_pss_own_mib"]), _f(sv["dom0_uss_mib"]),
                  _f(sv["dom0_rss_mib"]), f"{_f(sv['uml_pss_mib'], '.1f')} / {_f(bare['uml_pss_mib'], '.1f')}",
                  f"{_f(hs, '.1f')} / {_f(hb, '.1f')}", _f(hs - hb if hs is not None and hb is not None else None,
                                                            "+.1f"))  # fmt: skip
    out.print(m)
    b = _table("Where dom0's memory goes (MiB): slimvisord in total, a supervisor and a backend each (average)",
               ["K", "daemon PSS", "USS", "supervisor PSS", "USS", "anon", "file", "backend PSS", "USS", "anon",
                "file", "guest RAM"])  # fmt: skip
    for r in rows:
        sv = r["slimvisor"]
        keys = ["daemon_pss", "daemon_uss", *(f"{part}_{what}" for part in ("supervisors", "backends")
                                              for what in ("pss", "uss", "pss_anon", "pss_file"))]  # fmt: skip
        b.add_row(str(r["k"]), *(_f(sv.get(f"{key}_mib")) for key in [*keys, "backends_pss_shmem"]))
    out.print(b)
    if max_found is not None:
        out.print(f"largest K found (slimvisor, all up within {max_found['max_boot_s']:.0f} s): "
                  f"[bold]{max_found['largest_k']}[/bold]; stopped: {max_found['stopped']}")  # fmt: skip


def find_max(bench: Bench, start: int, step: int, steps: int, max_boot_s: float, deadline: float) -> dict[str, Any]:
    """Raise K for slimvisor until something gives; never past the memory ceiling (projected first)."""
    largest, k, stopped, tried = 0, start, f"{steps} steps done", []
    measured = [r.host_used_delta / r.k for r in bench.runs if r.path == "slimvisor" and r.up == r.k]
    per_dom = 1.2 * max(measured) if measured else 96 * MIB  # unmeasured: all guest RAM touched, and a third more
    for _ in range(steps):
        if time.monotonic() > deadline:
            stopped = "time budget (--max-minutes) spent"
            break
        projected = host_used() + k * per_dom
        if projected > bench.limits.ceiling:
            stopped = f"K={k} would need ~{projected / GIB:.1f} GiB (ceiling {bench.limits.ceiling / GIB:.0f} GiB)"
            break
        run = bench.one("slimvisor", k)
        tried.append({"k": k, "t_all_up_s": run.t_all_up, "up": run.up, "failures": run.failures[:10]})
        if run.t_all_up is None or run.t_all_up > max_boot_s:
            stopped = (f"K={k}: {run.up}/{k} up" if run.t_all_up is None else
                       f"K={k}: all up took {run.t_all_up:.1f} s > {max_boot_s:.0f} s")  # fmt: skip
            break
        largest = k
        per_dom = max(per_dom, 1.2 * run.host_used_delta / k)
        k += step
    return {"largest_k": largest, "stopped": stopped, "max_boot_s": max_boot_s, "tried": tried}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="10,25,50,100", help="comma-separated K values [%(default)s]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--boot-timeout", type=float, default=300.0, help="a run gives up after this [%(default)s s]")
    ap.add_argument("--disk", choices=("copy", "overlay"), default="copy",
                    help="per-domain root disk: a sparse copy, or copy-on-write over one base [%(default)s]")
    ap.add_argument("--settle", type=float, default=2.0, help="wait after all are up, before measuring memory")
    ap.add_argument("--mem-ceiling-gib", type=float, default=20.0, help="host used memory never to pass")
    ap.add_argument("--find-max", action="store_true", help="then raise K for slimvisor until it fails")
    ap.add_argument("--max-start", type=int, default=0, help="--find-max: first K [largest --k + step]")
    ap.add_argument("--max-step", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--max-boot-s", type=float, default=120.0, help="--find-max: all up within this")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="--find-max: time budget")
    ap.add_argument("--json", type=Path, help="write runs and summary here ('-': stdout)")
    args = ap.parse_args()
    ks = [int(x) for x in args.k.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, _sigterm)
    initrd, rootfs = busybox_assets()
    limits = Limits(args.boot_timeout, int(args.mem_ceiling_gib * GIB), args.settle)
    max_found = None
    with tempfile.TemporaryDirectory(prefix="svbench-density-", dir="/var/tmp") as w:
        base = rootfs
        if args.disk == "overlay":  # a base of our own: nothing else may write it while overlays read it
            base = Path(w) / "base.ext4"
            shutil.copyfile(rootfs, base)
        bench = Bench(initrd, Disks(args.disk, base), limits, Path(w))
        try:
            for rnd in range(args.rounds):
                console.print(f"[bold]round {rnd + 1}/{args.rounds}[/bold]")
                for i, k in enumerate(ks):
                    order = ["slimvisor", "bare"] if (rnd + i) % 2 == 0 else ["bare", "slimvisor"]
                    for path in order:
                        bench.one(path, k)
            if args.find_max:
                start = args.max_start or max(ks) + args.max_step
                max_found = find_max(bench, start, args.max_step, args.max_steps, args.max_boot_s,
                                     time.monotonic() + 60 * args.max_minutes)  # fmt: skip
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: reporting what ran[/yellow]")
    rows = summarize(bench.runs, ks)
    done = max((sum(1 for r in bench.runs if (r.path, r.k) == (p, k)) for p in ("slimvisor", "bare") for k in ks),
               default=0)  # fmt: skip  # rounds that ran (fewer when interrupted)
    report(rows, done, args.disk, max_found)
    if args.json:
        doc = {"disk": args.disk, "summary": rows, "find_max": max_found, "runs": [asdict(r) for r in bench.runs],
               "host": {"cpus": os.cpu_count(), "mem_total_mib": psutil.virtual_memory().total // MIB}}  # fmt: skip
        text = json.dumps(doc, indent=1)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
