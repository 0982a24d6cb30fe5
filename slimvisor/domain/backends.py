"""A domain's device backends, in a process of their own forked from the runner.

Forking (rather than starting a new interpreter) makes the backend ready in about a millisecond,
so a booting domain never waits for Python to import, and its pages are shared with the runner.
The sockets are listening before the domain starts, so it can connect at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.daemon import Listening, serve
from slimvisor.vhostuser.server import VhostUserServer
from slimvisor.virtio.device import VirtioDevice

_PR_SET_PDEATHSIG = 1


class BackendProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None

    @classmethod
    def start(
        cls, devices: list[tuple[str, Callable[[], VirtioDevice]]], rundir: Path,
        setup: Callable[[VhostUserServer], None] | None = None,
    ) -> tuple[BackendProcess, list[Path]]:  # fmt: skip
        """Listen on RUNDIR/NAME.sock for each (name, device factory), then fork the server.

        Devices are built in the child, so the runner never holds their files; `setup` runs
        there too, with the event loop (e.g. to add the domain's control socket).
        """
        paths = [rundir / f"{name}.sock" for name, _ in devices]
        endpoints: list[Listening] = []
        try:
            for (name, make), path in zip(devices, paths, strict=True):
                endpoints.append(Listening(listen_unix(str(path)), name, make))
            parent = os.getpid()
            gc.freeze()  # the child's collections leave the pages it shares with its parent alone
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                cls._child(parent, endpoints, setup)
            gc.unfreeze()
        finally:
            for ep in endpoints:
                ep.sock.close()
        return cls(pid), paths

    @staticmethod
    def _child(parent: int, endpoints: list[Listening], setup: Callable[[VhostUserServer], None] | None) -> None:
        """Serve until told to stop; never return into the runner's code."""
        status = 1
        try:
            os.setsid()  # the user's Ctrl-C goes to the runner, which stops us in order
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:
                os._exit(1)
            from setproctitle import setproctitle

            setproctitle(f"slimvisor-backend {' '.join(ep.name for ep in endpoints)}")
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            logging.basicConfig(level=logging.WARNING, format="slimvisor-backend: %(message)s", force=True)
            serve(endpoints, setup, unsealed_memory=True)  # for the runner's jailed UML
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 0
        except BaseException:
            traceback.print_exc(file=sys.stderr)
        finally:
            os._exit(status)

    def wait(self) -> int:
        """Reap; returns a Popen-style code (negative: killed by that signal)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def stop(self, grace: float = 3.0) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            import select

            if not select.select([self.pidfd], [], [], grace)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.wait()
        os.close(self.pidfd)
