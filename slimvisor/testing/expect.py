"""Drive a guest console from a program: send lines, wait for output, run commands.

Used by tests, benchmarks and tools that script guests through the same console a user types on.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from typing import IO


class ConsoleSession:
    """A process whose stdin/stdout are a guest console (`slimvisor run`, or bare linux.uml)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )  # fmt: skip
        self.out = bytearray()
        self.err = bytearray()
        self.last_status = -1
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream: IO[bytes] | None, buf: bytearray) -> None:
        assert stream is not None
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            buf.extend(chunk)

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 60, start: int = 0) -> re.Match[str]:
        """Wait until console output (from byte `start`) matches `pattern`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            exited = self.proc.poll() is not None
            m = rx.search(self.out[start:].decode(errors="replace"))
            if m:
                return m
            if exited or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        raise AssertionError(
            f"{pattern!r} not seen (exit {self.proc.poll()}); console tail:\n{self.text[-3000:]}\n"
            f"stderr:\n{self.err.decode(errors='replace')[-2000:]}"
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 120) -> str:
        """Run a shell command in the guest; return its output. Sets `last_status`."""
        tag = f"SV{time.monotonic_ns()}"
        start = len(self.out)
        # Quotes split the markers so the echoed command line itself never matches.
        self.send(f"echo {tag}'B'EGIN; {command}; echo {tag}'E'ND=$?")
        m = self.expect(rf"(?s){tag}BEGIN\r?\n(.*?){tag}END=(\d+)", timeout, start)
        self.last_status = int(m.group(2))
        return m.group(1).replace("\r", "")

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def kill(self) -> None:
        """Stop the process, politely first: a runner killed outright cannot tear its domain down."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
