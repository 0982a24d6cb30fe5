"""Run one PV domain in the foreground: its backends, its UML engine and its console.

`run_domain` owns every resource it makes (run directory, sockets, backend process, UML process
group, pipes, terminal mode) and releases all of them on every way out: poweroff, reboot with
--no-reboot, panic, a crash of UML or of the backend, the escape key, SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import FrameType

from slimvisor.domain.check import check_spec, fill_defaults
from slimvisor.domain.console import ESCAPE, ConsoleOutput, ConsolePump, raw_terminal
from slimvisor.domain.incarnation import Incarnation, exit_status
from slimvisor.domain.isolation import Isolation
from slimvisor.engines import engine_for
from slimvisor.engines.base import Identity
from slimvisor.model.lifecycle import Event
from slimvisor.model.spec import DomainSpec
from slimvisor.runtime.loop import EventLoop
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


class _Interrupted(BaseException):
    """A signal, raised as KeyboardInterrupt is: no `except Exception` (a loop callback's guard) swallows it."""

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
        isolation = Isolation(spec.name, spec.ram_mib, cgroup_name=rundir.name, overhead=engine_for(spec).overhead)
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
    """Serve one incarnation's console and events on a loop of its own until it ends."""
    assert inc.instance is not None
    instance = inc.instance
    loop = EventLoop()
    ended: list[Outcome] = []
    errors: list[Exception] = []

    def raising(callback: Callable[[], None]) -> Callable[[], None]:
        """A callback whose error ends the run, as it did before the loop: the loop's own guard
        would log it and call it again (an engine whose wait() fails, forever)."""

        def run() -> None:
            try:
                callback()
            except Exception as e:
                errors.append(e)

        return run

    def end(outcome: Outcome) -> None:
        if not ended:  # the first reason seen in a loop turn is the one
            ended.append(outcome)

    def output(data: bytes) -> None:  # called by the pump, from the loop: its errors end the run too
        try:
            console.write(data)
            if inc.saw(data):
                end(Outcome(_REBOOTING, "guest rebooted"))
        except Exception as e:
            errors.append(e)

    def read_user() -> None:
        data = os.read(user.fd, 4096)
        if not data:  # EOF: stop forwarding but keep the guest's console open
            loop.remove_reader(user.fd)
            user.open = False
        elif user.interactive and ESCAPE in data:
            end(Outcome(Exit.POWEROFF, "console escape: domain destroyed"))
        else:
            pump.type(data)
            loop.remove_reader(user.fd)  # read more only once the guest took this

    def engine_exited() -> None:
        rc = instance.wait()
        inc.drain(console.write)
        inc.notified()  # what it reported just before it exited (a reboot, a panic) tells why
        event, reason = inc.exit_reason(rc)
        if event == Event.REBOOT:
            end(Outcome(_REBOOTING, reason))
        elif event == Event.POWEROFF:
            end(Outcome(Exit.POWEROFF, reason))
        else:
            end(Outcome(Exit.PANIC if inc.panic is not None else Exit.CRASH, reason))

    def backend_died() -> None:
        assert inc.backend is not None
        end(Outcome(Exit.BACKEND_CRASH, f"device backend died ({exit_status(inc.backend.wait())})"))

    def read_user_again() -> None:
        if user.open:
            loop.add_reader(user.fd, raising(read_user))

    pump = ConsolePump(loop, output, on_drained=read_user_again)
    pump.attach(inc.out_r, inc.in_w)
    loop.add_reader(instance.pidfd, raising(engine_exited))
    def notified() -> None:
        if inc.notified():
            end(Outcome(_REBOOTING, "guest rebooted"))

    loop.add_reader(instance.event_fd(), raising(notified))
    if inc.backend is not None:
        loop.add_reader(inc.backend.pidfd, raising(backend_died))
    if user.open:
        try:
            loop.add_reader(user.fd, raising(read_user))
        except (OSError, ValueError):  # a regular file (epoll cannot watch it), or closed
            loop.remove_reader(user.fd)
            user.open = False
    try:
        while not ended:
            loop.run_once(None)
            if errors:
                raise errors[0]
    finally:
        loop.close()
    return ended[0]
