"""Test harness for the toolstack: a slimvisord of the test's own, driven through the CLI as a user would.

Each `Toolstack` has private run, state and log trees (SLIMVISOR_RUN_DIR & co.), so its daemon,
domains and xenstore never meet the system's or another test's. `close()` destroys what is left,
stops the daemon with `slimvisor daemon stop` and fails if any process of the tree survived;
`leftovers()` lists anything a domain left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from slimvisor.host import procs
from slimvisor.host.procs import ProcessId
from slimvisor.testing.expect import ConsoleSession
from tests import leaks


class Toolstack:
    def __init__(self) -> None:
        # Short: Unix socket paths below it must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="sv", dir="/run"))
        self.env = {
            "SLIMVISOR_RUN_DIR": str(self.root / "run"),
            "SLIMVISOR_STATE_DIR": str(self.root / "state"),
            "SLIMVISOR_LOG_DIR": str(self.root / "log"),
        }
        self.seen: set[ProcessId] = set()  # processes of this toolstack, recorded with their start time
        self.uids: dict[str, int] = {}  # the jail uid each domain was last listed with
        self.settle = leaks.SETTLE_S  # how long close() lets a process of the tree finish exiting
        leaks.record_paths(f"{self.root}/")
        leaks.record_cgroups(self.cgroup_dirs())

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def command(self, *args: str) -> list[str]:
        """The argv of `slimvisor ARGS...` (tests/poolhosts.py runs it inside a host's netns)."""
        return [sys.executable, "-m", "slimvisor", *args]

    def sv(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """`slimvisor ARGS...`; with `check`, a non-zero exit fails the test showing stderr."""
        proc = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **self.env}, input=input, cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"slimvisor {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}"
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.sv(*args, "--json").stdout)

    def domains(self) -> dict[str, dict[str, Any]]:
        """`slimvisor list --json` without Domain-0, by name."""
        rows = {d["name"]: d for d in self.json("list") if d["domid"] != 0}
        self.uids |= {name: d["uid"] for name, d in rows.items() if d.get("uid") is not None}
        return rows

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any] | None:
        """Wait until `name` is in one of `states` (or gone, for state "gone"); returns its row."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.domains().get(name)
            if (row is None and "gone" in states) or (row is not None and row["state"] in states):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not reach {states} in {timeout} s: {row}")
            time.sleep(0.2)

    def console(self, name: str) -> ConsoleSession:
        """`slimvisor console NAME` on pipes: expect/send as on `slimvisor run`."""
        return ConsoleSession(self.command("console", name), self.env)

    def config(self, path: Path, name: str, rootfs: Path, *extra: str, memory: int = 64,
               disks: tuple[Path, ...] = ()) -> Path:  # fmt: skip
        """An xl.cfg for a busybox domain on `rootfs` (xvda), with raw `disks` as xvdb, xvdc, ..."""
        listed = "".join(f", '{d},raw,xvd{chr(ord('b') + i)},rw'" for i, d in enumerate(disks))
        lines = [f'name = "{name}"', f"memory = {memory}", f"disk = ['{rootfs},raw,xvda,rw'{listed}]", *extra]
        path.write_text("\n".join(lines) + "\n")
        return path

    def daemon_pid(self) -> int:
        pid = int(json.loads(self.sv("info", "--json").stdout)["pid"])
        leaks.record_pid(pid, self.seen)
        return pid

    def domain_info(self, name: str) -> dict[str, Any]:
        """The API's `domain-info` (no CLI command shows it): the pids of the domain's supervisor and
        processes as the toolstack knows them, which are recorded for the teardown checks too."""
        from slimvisor.toolstack.api import Client

        with Client(self.run_dir / "slimvisord.sock", autostart=False, timeout=60) as client:
            info = client.call("domain-info", domain=name)
        for pid in [info["supervisor"], *info["pids"]]:
            leaks.record_pid(int(pid), self.seen)
        return info

    def cgroups(self) -> list[str]:
        """The domain cgroups of this toolstack (its own parent group, see host.cgroup.default_parent)."""
        from slimvisor.host.cgroup import cgroups_available, default_parent, list_groups

        return list_groups(default_parent(str(self.run_dir))) if cgroups_available() else []

    def cgroup_dirs(self, name: str | None = None) -> list[Path]:
        """Where this toolstack's domain cgroups live (or domain `name`'s): their processes are its."""
        from slimvisor.host.cgroup import default_parent, parent_dirs

        return [d / name if name else d for d in parent_dirs(default_parent(str(self.run_dir)))]

    def record_daemon(self) -> ProcessId | None:
        """The daemon running now, found as anyone finds it: by the pid in its lock file."""
        from slimvisor.toolstack import daemonctl

        pid = daemonctl.daemon_pid(self.run_dir)
        return None if pid is None else leaks.record_pid(pid, self.seen)

    def record_pids(self) -> None:
        """The daemon's, the supervisors' and the domains' pids, as the toolstack itself reports them:
        what teardown checks by pid, besides what lies under the run tree."""
        from slimvisor.domain.supervisor import Record
        from slimvisor.toolstack.api import ApiError, Client

        self.record_daemon()
        for state in (self.run_dir / "domains").glob("*/state.json"):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                leaks.record_pid(Record.load(state).supervisor_pid, self.seen)
        sock = self.run_dir / "slimvisord.sock"
        with contextlib.suppress(ApiError, OSError, ValueError), Client(sock, autostart=False, timeout=30) as client:
            for d in client.call("list")["domains"][1:]:
                with contextlib.suppress(ApiError):
                    info = client.call("domain-info", domain=d["name"])
                    for pid in [info["supervisor"], *info["pids"]]:
                        leaks.record_pid(int(pid), self.seen)

    def leftovers(self, names: list[str]) -> list[str]:
        """Processes, run directories, sockets and cgroups any of the `names` domains left.

        A domain's processes are those with something under its run directory (UML's working
        directory, the backends' sockets) or its logs (the supervisor's), in its cgroup, or their
        children: never told by command line, which a jailed UML need not show.
        """
        paths = [f"{self.run_dir}/domains/{n}/" for n in names] + [f"{self.log_dir}/{n}." for n in names]
        cgroups = [d for n in names for d in self.cgroup_dirs(n)]
        found = [f"process {line}" for line in leaks.describe(procs.members(paths, (), cgroups))]
        uids = {self.uids[n] for n in names if n in self.uids}  # a jailed engine runs as its domain's uid
        jailed = [p for p in psutil.process_iter() if process_uid(p) in uids]
        found += [f"process {p.pid} runs as the jail uid of one of {names}" for p in jailed]
        domains = self.run_dir / "domains"
        if domains.exists():
            found += [f"run dir {d}" for d in domains.iterdir()]
        found += [f"cgroup {g}" for g in self.cgroups() if g in names]
        return found

    def close(self) -> None:
        """Destroy every domain, stop the daemon as anyone would (`slimvisor daemon stop`), then fail
        if any process of this run tree is still running (it is killed first); the trees go either way.
        Once closed, closing again does nothing (a pool's test closes its hosts while etcd still runs)."""
        if not self.root.exists():
            return
        problems: list[str] = []
        try:
            domains = self.run_dir / "domains"
            if (self.run_dir / "slimvisord.sock").exists() or (domains.exists() and any(domains.iterdir())):
                listed = self.sv("list", "--json", check=False)  # a killed daemon is started again: it re-attaches
                self.record_pids()
                if listed.returncode == 0:
                    for d in json.loads(listed.stdout):
                        if d["domid"] != 0:
                            self.sv("destroy", d["name"], check=False)
            daemon = self.record_daemon()
            stopped = self.sv("daemon", "stop", check=False)
            if stopped.returncode != 0:
                problems.append(f"slimvisor daemon stop: exit {stopped.returncode}: {stopped.stderr.strip()}")
            elif daemon is not None and procs.alive(daemon):
                problems.append(f"slimvisord (pid {daemon[0]}) still runs after `slimvisor daemon stop`")
            left = leaks.survivors([f"{self.root}/"], self.seen, self.cgroup_dirs(), self.settle)
            if left:
                problems += leaks.describe(left)
                procs.kill(left)
        finally:
            from slimvisor.host.cgroup import cgroups_available, default_parent, remove_parent

            if cgroups_available():
                try:
                    remove_parent(default_parent(str(self.run_dir)))
                except OSError as e:
                    problems.append(f"its cgroups: {e}")
            shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise AssertionError(f"the toolstack of {self.root} left something behind its teardown:\n"
                                 + "\n".join(problems))  # fmt: skip


def process_uid(p: psutil.Process) -> int | None:
    """A process's real uid, None once it is gone (a jailed engine is known by its domain's uid)."""
    try:
        return p.uids().real
    except psutil.Error:
        return None
