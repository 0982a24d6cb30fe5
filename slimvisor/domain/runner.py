"""Run one PV domain in the foreground: its backends, its UML engine and its console.

`run_domain` owns every resource it makes (run directory, sockets, backend process, UML process
group, pipes, terminal mode) and releases all of them on every way out: poweroff, reboot with
--no-reboot, panic, a crash of UML or of the backend, the escape key, SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import FrameType

from slimvisor.domain.check import check_spec, fill_defaults
from slimvisor.domain.console import ESCAPE, ConsoleOutput, raw_terminal
from slimvisor.domain.incarnation import Incarnation, exit_status
from slimvisor.domain.isolation import Isolation
from slimvisor.engines import engine_for
from slimvisor.engines.base import Identity
from slimvisor.model.lifecycle import Event
from slimvisor.model.spec import DomainSpec
from slimvisor.runtime.paths import log_dir, runtime_base


class Exit(IntEnum):
    """`slimvisor run` exit statuses, one per way a domain can end."""

    POWEROFF = 0  # also: reboot under --no-reboot, and leaving with the escape key
    ERROR = 1  # bad input or a host-side failure before the domain ran
    PANIC = 3
    CRASH = 4  # UML died without a kernel panic
    BACKEND_CRASH = 5


@dataclass
class Outcome:
    status: int
    reason: str


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def default_log_path(name: str) -> str:
    return str(log_dir() / f"{name}.console.log")


def run_domain(
    spec: DomainSpec,
    *,
    reboot: bool = True,
    log_path: str | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> Outcome:
    """Boot `spec` and serve its console until it ends; returns how it ended."""
    for warning in check_spec(spec):
        print(f"slimvisor: warning: {warning}", file=sys.stderr)
    initrd = fill_defaults(spec)
    rundir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=runtime_base()))
    try:
        isolation = Isolation(spec.name, spec.memory_mib, cgroup_name=rundir.name, overhead=engine_for(spec).overhead)
    except BaseException:
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    console = ConsoleOutput(log_path, stdout_fd)
    try:
        with raw_terminal(stdin_fd) as interactive:
            user = _UserInput(stdin_fd, interactive)
            while True:
                outcome = _boot_once(spec, rundir, initrd, isolation.identity(), console, user)
                if outcome.status != _REBOOTING:
                    break
                if not reboot:
                    outcome = Outcome(Exit.POWEROFF, "domain rebooted; stopped as --no-reboot asks")
                    break
    except _Interrupted as e:
        outcome = Outcome(128 + e.signum, f"stopped by {signal.Signals(e.signum).name}; domain destroyed")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        console.close()
        isolation.close()
        shutil.rmtree(rundir, ignore_errors=True)
    return outcome


_REBOOTING = -1


@dataclass
class _UserInput:
    fd: int
    interactive: bool
    open: bool = True


def _boot_once(spec: DomainSpec, rundir: Path, initrd: str | None, who: Identity, console: ConsoleOutput,
               user: _UserInput) -> Outcome:  # fmt: skip
    """One incarnation of the domain, torn down whatever happens."""
    inc: Incarnation | None = None
    try:
        inc = Incarnation(spec, rundir, initrd, who)
        return _supervise(inc, console, user)
    finally:
        if inc is not None:
            inc.close()


def _supervise(inc: Incarnation, console: ConsoleOutput, user: _UserInput) -> Outcome:
    assert inc.instance is not None
    sel = selectors.DefaultSelector()
    sel.register(inc.instance.pidfd, selectors.EVENT_READ, "engine")
    sel.register(inc.instance.event_fd(), selectors.EVENT_READ, "notify")
    sel.register(inc.out_r, selectors.EVENT_READ, "console")
    if inc.backend is not None:
        sel.register(inc.backend.pidfd, selectors.EVENT_READ, "backend")
    if user.open:
        try:
            sel.register(user.fd, selectors.EVENT_READ, "stdin")
        except (OSError, ValueError):
            user.open = False
    pending = b""  # user input the guest has not taken yet
    try:
        while True:
            for key, _ in sel.select():
                what = key.data
                if what == "stdin":
                    data = os.read(user.fd, 4096)
                    if not data:  # EOF: stop forwarding but keep the guest's console open
                        sel.unregister(user.fd)
                        user.open = False
                        continue
                    if user.interactive and ESCAPE in data:
                        return Outcome(Exit.POWEROFF, "console escape: domain destroyed")
                    pending += data
                    sel.unregister(user.fd)  # read more only once the guest took this
                    sel.register(inc.in_w, selectors.EVENT_WRITE, "guest-input")
                elif what == "guest-input":
                    try:
                        pending = pending[os.write(inc.in_w, pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = b""
                    if not pending:
                        sel.unregister(inc.in_w)
                        sel.register(user.fd, selectors.EVENT_READ, "stdin")
                elif what == "console":
                    try:
                        data = os.read(inc.out_r, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(inc.out_r)
                        continue
                    console.write(data)
                    if inc.saw(data):
                        return Outcome(_REBOOTING, "guest rebooted")
                elif what == "notify":
                    if inc.notified():
                        return Outcome(_REBOOTING, "guest rebooted")
                elif what == "backend":
                    assert inc.backend is not None
                    return Outcome(Exit.BACKEND_CRASH, f"device backend died ({exit_status(inc.backend.wait())})")
                elif what == "engine":
                    rc = inc.instance.wait()
                    inc.drain(console.write)
                    event, reason = inc.exit_reason(rc)
                    if event == Event.REBOOT:
                        return Outcome(_REBOOTING, reason)
                    if event == Event.POWEROFF:
                        return Outcome(Exit.POWEROFF, reason)
                    return Outcome(Exit.PANIC if inc.panic is not None else Exit.CRASH, reason)
    finally:
        sel.close()
