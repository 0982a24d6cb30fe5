"""Run one PV domain in the foreground: its backends, its UML engine and its console.

`run_domain` owns every resource it makes (run directory, sockets, backend process, UML process
group, pipes, terminal mode) and releases all of them on every way out: poweroff, reboot with
--no-reboot, panic, a crash of UML or of the backend, the escape key, SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import FrameType

from slimvisor.domain.backends import BackendProcess
from slimvisor.domain.console import ESCAPE, ConsoleOutput, raw_terminal
from slimvisor.domain.devices import LocalDevices, NetPorts
from slimvisor.domain.spec import DomainSpec
from slimvisor.engines.uml import McNotify, UmlProcess, uml_argv
from slimvisor.paths import log_dir, runtime_base


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


_PANIC_LINE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")
_REBOOT_LINE = b"reboot: Restarting system"


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
    spec.check()
    if spec.disks and spec.root is None and "root=" not in spec.cmdline:
        spec.root = "/dev/vda"
    initrd = spec.initrd
    if initrd is None and spec.disks:
        from slimvisor.images.cache import boot_initrd

        initrd = str(boot_initrd())
    rundir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=runtime_base()))
    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    backend: BackendProcess | None = None
    console = ConsoleOutput(log_path, stdout_fd)
    ports = NetPorts(spec)
    try:
        local = LocalDevices(spec, rundir)
        factories = local.factories()
        devices: list[tuple[Path, int]] = []
        if factories:
            backend, paths = BackendProcess.start([(n, f) for n, _, f in factories], rundir, local.setup)
            devices = [(p, vid) for p, (_, vid, _) in zip(paths, factories, strict=True)]
        devices += ports.acquire()
        argv = uml_argv(spec, rundir, devices, initrd)
        with raw_terminal(stdin_fd) as interactive:
            user = _UserInput(stdin_fd, interactive)
            while True:
                outcome = _boot_once(argv, rundir, backend, console, user)
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
        ports.release()
        if backend is not None:
            backend.stop()
        console.close()
        shutil.rmtree(rundir, ignore_errors=True)
    return outcome


_REBOOTING = -1


@dataclass
class _UserInput:
    fd: int
    interactive: bool
    open: bool = True


def _boot_once(argv: list[str], rundir: Path, backend: BackendProcess | None,
               console: ConsoleOutput, user: _UserInput) -> Outcome:  # fmt: skip
    """One incarnation of the domain: a fresh UML process tree, torn down whatever happens.

    A guest reboot ends the incarnation (like Xen's on_reboot=restart: destroy, create again)
    rather than letting UML re-exec itself in place, which can hang under host load.
    """
    (rundir / "notify.sock").unlink(missing_ok=True)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    uml: UmlProcess | None = None
    try:
        uml = UmlProcess(argv, rundir, in_r, out_w)
        os.close(in_r)
        os.close(out_w)
        in_r = out_w = -1
        return _supervise(uml, backend, console, user, in_w, out_r)
    finally:
        if uml is not None:
            uml.close()
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def _supervise(
    uml: UmlProcess,
    backend: BackendProcess | None,
    console: ConsoleOutput,
    user: _UserInput,
    in_w: int,
    out_r: int,
) -> Outcome:
    sel = selectors.DefaultSelector()
    sel.register(uml.pidfd, selectors.EVENT_READ, "uml")
    sel.register(uml.notify, selectors.EVENT_READ, "notify")
    sel.register(out_r, selectors.EVENT_READ, "console")
    if backend is not None:
        sel.register(backend.pidfd, selectors.EVENT_READ, "backend")
    if user.open:
        try:
            sel.register(user.fd, selectors.EVENT_READ, "stdin")
        except (OSError, ValueError):
            user.open = False
    tail = b""  # the end of console output, to spot panic and reboot lines across reads
    panic: str | None = None
    pending = b""  # user input the guest has not taken yet
    os.set_blocking(in_w, False)
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
                    sel.register(in_w, selectors.EVENT_WRITE, "guest-input")
                elif what == "guest-input":
                    try:
                        pending = pending[os.write(in_w, pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = b""
                    if not pending:
                        sel.unregister(in_w)
                        sel.register(user.fd, selectors.EVENT_READ, "stdin")
                elif what == "console":
                    data = os.read(out_r, 65536)
                    if not data:
                        sel.unregister(out_r)
                        continue
                    console.write(data)
                    tail = (tail + data)[-4096:]
                    if m := _PANIC_LINE.search(tail):
                        panic = m.group(1).decode(errors="replace").strip()
                    if _REBOOT_LINE in tail:
                        return Outcome(_REBOOTING, "guest rebooted")
                elif what == "notify":
                    for n in uml.notifications():
                        if n.kind == McNotify.MCONSOLE_PANIC:
                            panic = panic or n.data
                elif what == "backend":
                    assert backend is not None
                    return Outcome(Exit.BACKEND_CRASH, f"device backend died ({_status(backend.wait())})")
                elif what == "uml":
                    rc = uml.proc.wait()
                    _drain(out_r, console)
                    if panic is not None:
                        return Outcome(Exit.PANIC, f"guest kernel panic: {panic}")
                    if rc == 0:
                        return Outcome(Exit.POWEROFF, "domain powered off")
                    return Outcome(Exit.CRASH, f"UML crashed ({_status(rc)})")
    finally:
        sel.close()


def _drain(fd: int, console: ConsoleOutput) -> None:
    """Show what UML printed last (its helpers may hold the pipe: do not wait for EOF)."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError, OSError):
        while data := os.read(fd, 65536):
            console.write(data)


def _status(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"
