"""The user's side of a domain console: raw terminal, escape key, and a log of everything shown."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator

from slimvisor.runtime.logfile import RotatingLog

ESCAPE = b"\x1d"  # Ctrl-], as xl console and telnet


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
