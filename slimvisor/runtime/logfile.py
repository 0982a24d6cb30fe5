"""Console logs: guest-written bytes on the host's disk, so bounded in size and not world-readable.

A guest writes its console as fast as it likes and for as long as it runs; its log is one file
that is set aside (renamed to `PATH.1`, replacing the one before) once it reaches `max_bytes`, as
logrotate's `size` with `rotate 1` would, so a domain keeps at most twice that on disk. The file is
mode 0640 (what a guest prints may be secret: keys, passwords typed at its console).
"""

from __future__ import annotations

import os

CONSOLE_LOG_MAX = 8 << 20  # bytes in the current file before it is set aside
LOG_MODE = 0o640


class RotatingLog:
    """An append-only log file of at most `max_bytes`, plus the one set aside before it."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = CONSOLE_LOG_MAX, *, fresh: bool = False) -> None:
        """`fresh`: start the file empty (a foreground run's log) rather than append to it."""
        if max_bytes <= 0:
            raise ValueError("a log needs a positive size")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.fd = -1
        self._open(os.O_TRUNC if fresh else 0)

    def _open(self, extra: int = 0) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | extra
        self.fd = os.open(self.path, flags, LOG_MODE)
        os.fchmod(self.fd, LOG_MODE)  # an older file may have been made with a wider mode
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        """Append `data`, setting the file aside first whenever it would pass `max_bytes`."""
        view = memoryview(data)
        while view:
            if self.size >= self.max_bytes:
                self.rotate()
            n = os.write(self.fd, view[: self.max_bytes - self.size])
            self.size += n
            view = view[n:]

    def rotate(self) -> None:
        os.close(self.fd)
        os.replace(self.path, self.path + ".1")
        self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
