"""A domain's console: the pump between the engine's console pipes and its users (one for the
foreground runner and the daemon's supervisor alike), the raw terminal, the escape key, and a log
of everything shown."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Callable, Iterator

from slimvisor.runtime.logfile import RotatingLog
from slimvisor.runtime.loop import Loop

ESCAPE = b"\x1d"  # Ctrl-], as xl console and telnet
MAX_PENDING_INPUT = 64 * 1024  # typed-ahead bytes the guest has not read yet; more is refused
READ_SIZE = 65536


class ConsolePump:
    """Moves bytes between an engine's console pipes and whoever shows and types: guest output to
    `on_output`, input given to `type` into the guest as it takes it. It outlives an incarnation
    (`attach` each boot's pipes, `detach` them at its end), so typing ahead survives a reboot.
    `on_drained` runs when the guest took every byte typed (a reader that waits for that before it
    reads more of its user: backpressure instead of a buffer)."""

    def __init__(self, loop: Loop, on_output: Callable[[bytes], None],
                 on_drained: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.loop = loop
        self.on_output = on_output
        self.on_drained = on_drained
        self.pending = bytearray()
        self.out_r = self.in_w = -1

    def attach(self, out_r: int, in_w: int) -> None:
        """Serve one boot's pipes (non-blocking: the guest's output end, its input end)."""
        self.out_r, self.in_w = out_r, in_w
        self.loop.add_reader(out_r, self._readable)
        if self.pending:
            self.loop.add_writer(in_w, self._writable)

    def detach(self) -> None:
        for fd in (self.out_r, self.in_w):
            if fd >= 0:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
        self.out_r = self.in_w = -1

    def type(self, data: bytes) -> bool:
        """Queue `data` for the guest; False (nothing queued) when MAX_PENDING_INPUT would be passed:
        a guest that does not read its console makes typing ahead fail, never grow a buffer."""
        if len(self.pending) + len(data) > MAX_PENDING_INPUT:
            return False
        self.pending += data
        if self.in_w >= 0:
            self.loop.add_writer(self.in_w, self._writable)
        return True

    def _readable(self) -> None:
        fd = self.out_r
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        if not data:  # the engine closed its console
            self.loop.remove_reader(fd)
            return
        self.on_output(data)

    def _writable(self) -> None:
        try:
            del self.pending[: os.write(self.in_w, self.pending)]
        except BlockingIOError:
            return
        except OSError:  # the engine is gone: what was typed for it goes too
            self.pending.clear()
        if not self.pending:
            self.loop.remove_writer(self.in_w)
            if self.on_drained is not None:
                self.on_drained()


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Put a terminal in raw mode for the duration; yields whether `fd` is a terminal at all."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class ConsoleOutput:
    """Copies guest console bytes to the user's terminal (while it lasts) and to a log file."""

    def __init__(self, log_path: str | None, out_fd: int | None = None) -> None:
        self.out_fd = sys.stdout.fileno() if out_fd is None else out_fd
        self.log = RotatingLog(log_path, fresh=True) if log_path else None  # bounded, 0640

    def write(self, data: bytes) -> None:
        if self.log is not None:
            self.log.write(data)
        if self.out_fd >= 0:
            try:
                while data:
                    data = data[os.write(self.out_fd, data) :]
            except OSError:  # the reader went away: keep logging, stop echoing
                self.out_fd = -1

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
