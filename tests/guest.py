"""Test harness: drive `slimvisor run` as a user would, through its console, and check leftovers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import psutil

from slimvisor.host.procs import members
from slimvisor.testing.expect import ConsoleSession
from tests.leaks import describe

RUN_BASE = Path("/run/slimvisor")


class Console(ConsoleSession):
    """`slimvisor run --name NAME ARGS...` with its console on pipes."""

    def __init__(self, *args: str, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        super().__init__([sys.executable, "-m", "slimvisor", "run", "--name", name, *args], env)

    def backend_pids(self) -> list[int]:
        """The runner's forked backend: its child that is not UML."""
        return [p.pid for p in psutil.Process(self.proc.pid).children() if not p.name().startswith("linux")]

    def uml_pid(self) -> int:
        for p in psutil.Process(self.proc.pid).children():
            if p.name().startswith("linux"):
                return p.pid
        raise AssertionError("no UML process")


def poweroff(*cons: ConsoleSession) -> None:
    """Power the guests off from their consoles; each must exit 0 (killed either way)."""
    for con in cons:
        if con.proc.poll() is None:
            con.send("poweroff")
    for con in cons:
        try:
            assert con.wait(60) == 0
        finally:
            con.kill()


def balloon_features(con: ConsoleSession) -> str:
    """The feature bits the guest's balloon driver negotiated, bit 0 first (Linux's sysfs)."""
    return con.run("cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/features").split()[-1]


def leftovers(name: str) -> list[str]:
    """Anything a domain called `name` may have left: processes, run dirs, sockets.

    Its processes are those with something in its run dirs (the runner's and backend's sockets), in
    its cgroup (named after its run dir; the jailed UML is there), and their children.
    """
    from slimvisor.host.cgroup import parent_dirs

    cgroups = [group for parent in parent_dirs() for group in parent.glob(f"{name}-*")]
    found = [f"process {line}" for line in describe(members([f"{RUN_BASE}/{name}-"], (), cgroups))]
    if RUN_BASE.exists():
        found += [f"run dir {d}" for d in RUN_BASE.glob(f"{name}-*")]
    return found


def copy_image(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    return dest
