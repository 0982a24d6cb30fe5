"""Test harness: drive `slimvisor run` as a user would, through its console, and check leftovers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RUN_BASE = Path("/run/slimvisor")


class Console:
    """A `slimvisor run` process with its console on pipes: send lines, expect output."""

    def __init__(self, *args: str, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        argv = [sys.executable, "-m", "slimvisor", "run", "--name", name, *args]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.out = bytearray()
        self.err = bytearray()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream, buf: bytearray) -> None:
        while chunk := stream.read1(65536):
            buf.extend(chunk)

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 60, start: int = 0) -> re.Match[str]:
        """Wait until console output (from byte `start`) matches `pattern`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.out[start:].decode(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.2)
                m = rx.search(self.out[start:].decode(errors="replace"))
                if m:
                    return m
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{pattern!r} not seen (exit {self.proc.poll()}); console tail:\n{self.text[-3000:]}\n"
            f"stderr:\n{self.err.decode(errors='replace')[-2000:]}"
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 120) -> str:
        """Run a shell command in the guest; return its output (between unique markers)."""
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
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def backend_pids(self) -> list[int]:
        return [
            p.pid
            for p in psutil.Process(self.proc.pid).children(recursive=True)
            if "slimvisor.vhostuser.daemon" in " ".join(p.cmdline())
        ]

    def uml_pid(self) -> int:
        for p in psutil.Process(self.proc.pid).children():
            if p.name().startswith("linux"):
                return p.pid
        raise AssertionError("no UML process")


def leftovers(name: str) -> list[str]:
    """Anything a domain called `name` may have left: processes, run dirs, sockets."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"/{name}-" in cmd and ("linux" in cmd or "slimvisor" in cmd):
            found.append(f"process {p.info['pid']}: {cmd[:200]}")
    if RUN_BASE.exists():
        found += [f"run dir {d}" for d in RUN_BASE.glob(f"{name}-*")]
    return found


def copy_image(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    return dest
