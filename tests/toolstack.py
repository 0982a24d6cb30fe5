"""Test harness for the toolstack: a slimvisord of the test's own, driven through the CLI as a user would.

Each `Toolstack` has private run, state and log trees (SLIMVISOR_RUN_DIR & co.), so its daemon,
domains and xenstore never meet the system's or another test's. `close()` destroys what is left
and stops the daemon; `leftovers()` lists anything that survived.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from slimvisor.domain.expect import ConsoleSession


class Toolstack:
    def __init__(self) -> None:
        # Short: Unix socket paths below it must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="sv", dir="/run"))
        self.env = {
            "SLIMVISOR_RUN_DIR": str(self.root / "run"),
            "SLIMVISOR_STATE_DIR": str(self.root / "state"),
            "SLIMVISOR_LOG_DIR": str(self.root / "log"),
        }
        self.uids: dict[str, int] = {}  # the jail uid each domain of this toolstack was last listed with

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def sv(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """`slimvisor ARGS...`; with `check`, a non-zero exit fails the test showing stderr."""
        proc = subprocess.run(
            [sys.executable, "-m", "slimvisor", *args], capture_output=True, text=True, timeout=timeout,
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
        return ConsoleSession([sys.executable, "-m", "slimvisor", "console", name], self.env)

    def config(self, path: Path, name: str, rootfs: Path, *extra: str, memory: int = 64) -> Path:
        """An xl.cfg for a busybox domain on `rootfs`."""
        lines = [f'name = "{name}"', f"memory = {memory}", f"disk = ['{rootfs},raw,xvda,rw']", *extra]
        path.write_text("\n".join(lines) + "\n")
        return path

    def daemon_pid(self) -> int:
        return int(json.loads(self.sv("info", "--json").stdout)["pid"])

    def cgroups(self) -> list[str]:
        """The domain cgroups of this toolstack (its own parent group, see host.cgroup.default_parent)."""
        from slimvisor.host.cgroup import cgroups_available, default_parent, list_groups

        return list_groups(default_parent(str(self.run_dir))) if cgroups_available() else []

    def leftovers(self, names: list[str]) -> list[str]:
        """Processes, run directories, sockets and cgroups any of the `names` domains left."""
        found = []
        uids = {self.uids[n] for n in names if n in self.uids}
        for p in psutil.process_iter(["pid", "cmdline", "uids"]):
            cmd = " ".join(p.info["cmdline"] or [])
            jailed = p.info["uids"] is not None and p.info["uids"].real in uids  # a domain's engine
            if str(self.run_dir) in cmd or any(f"slimvisor-supervisor {n}" == cmd for n in names) or jailed:
                found.append(f"process {p.info['pid']}: {cmd[:200]}")
        domains = self.run_dir / "domains"
        if domains.exists():
            found += [f"run dir {d}" for d in domains.iterdir()]
        found += [f"cgroup {g}" for g in self.cgroups() if g in names]
        return found

    def close(self) -> None:
        """Destroy every domain, stop the daemon; the trees go too."""
        sock = self.run_dir / "slimvisord.sock"
        if sock.exists():
            listed = self.sv("list", "--json", check=False)
            if listed.returncode == 0:
                for d in json.loads(listed.stdout):
                    if d["domid"] != 0:
                        self.sv("destroy", d["name"], check=False)
            for p in psutil.process_iter(["pid", "cmdline"]):
                if p.info["cmdline"] and p.info["cmdline"][0] == "slimvisord":
                    env = _environ(p)
                    if env.get("SLIMVISOR_RUN_DIR") == str(self.run_dir):
                        os.kill(p.pid, signal.SIGTERM)
                        psutil.wait_procs([p], timeout=10)
        from slimvisor.host.cgroup import cgroups_available, default_parent, remove_parent

        if cgroups_available():
            remove_parent(default_parent(str(self.run_dir)))
        shutil.rmtree(self.root, ignore_errors=True)


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except psutil.Error:
        return {}
