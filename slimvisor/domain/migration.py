"""A domain's state leaving or arriving, as its supervisor runs it: migration, save and restore.

The engine moves the bytes (QEMU's migration stream, down a socket or into a file) and reports its
progress; this module is what slimvisor adds around it, on the supervisor's loop, never waiting:

- between two hosts, a handshake on the same channel once the engine's stream is through, as xl's
  (libxl's "migration receiver ready / domain received / go" lines): the target says RECEIVED
  once its engine loaded everything; only then does the source stop for good (its engine killed, its
  disks flushed and closed) and answer GO; only after GO does the target open the disks and run.
  So the domain never runs on both hosts, and until RECEIVED the source can take it back: a
  target that dies, refuses or stays silent leaves the domain running where it was.
- to and from a file (save, restore) there is no peer: the file is the whole state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from slimvisor.engines.base import MIGRATION_DONE, MIGRATION_FAILED, EngineError, Instance
from slimvisor.runtime.loop import Loop

log = logging.getLogger("slimvisor.migration")

RECEIVED = b"slimvisor-migration: received\n"
GO = b"slimvisor-migration: go"  # then the source's figures (JSON) and a newline: the target shows them
MAX_LINE = 4096  # a handshake line longer than this is a broken peer
HANDSHAKE_TIMEOUT = 60.0  # for either line: a peer silent this long has failed
PROGRESS_INTERVAL = 0.25  # how often the source asks the engine how far it got (the API's progress)
DOWNTIME_MS = 100  # the stop-and-copy QEMU aims for (its downtime-limit; QEMU's own default is 300 ms)

Done = Callable[[str | None], None]  # None: it worked; else why not


class _Channel:
    """The handshake's end of the channel: reads one expected line, at most `timeout` away."""

    def __init__(self, loop: Loop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.buf = b""
        self.rest = b""
        self.waiting = False

    def expect(self, line: bytes, done: Done, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Wait for one line beginning with `line` (what follows it is left in `self.rest`), read
        byte by byte: nothing after the newline is taken from the channel."""
        self.waiting = True
        deadline = time.monotonic() + timeout
        word = line.strip()

        def readable() -> None:
            try:
                data = os.read(self.fd, 1)
            except BlockingIOError:
                return
            except OSError as e:
                data, self.buf = b"", f"{e.strerror}".encode()
            if data:
                self.buf += data
                if not self.buf.endswith(b"\n") and len(self.buf) < MAX_LINE:
                    return
            self._stop_waiting()
            if self.buf.startswith(word) and self.buf.endswith(b"\n"):
                self.rest = self.buf[len(word) :].strip()
                done(None)
            else:
                what = f"said {self.buf[:80]!r}" if self.buf else "closed the channel"
                done(f"the peer {what} instead of {word.decode()!r}")

        def overdue() -> None:
            if self.waiting:
                self._stop_waiting()
                done(f"no {line.strip().decode()!r} from the peer within {timeout:.0f} s")

        self.loop.add_reader(self.fd, readable)
        self.loop.call_later(max(0.0, deadline - time.monotonic()), overdue)

    def _stop_waiting(self) -> None:
        if self.waiting:
            self.waiting = False
            self.loop.remove_reader(self.fd)

    def say(self, line: bytes) -> str | None:
        """Send `line`; why it could not be sent, or None."""
        try:
            os.write(self.fd, line)  # a few bytes into an idle socket: never blocks for long
            return None
        except OSError as e:
            return f"the channel broke: {e.strerror}"

    def close(self) -> None:
        self._stop_waiting()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class Outgoing:
    """The source's side: the engine sends; with a `peer`, wait for RECEIVED before `done(None)`.

    `done(None)` means the state is safely elsewhere (the target has it, or the file is complete):
    the caller then stops the domain for good (and calls `go`) or, for `save -c`, lets it run on.
    `done(why)` means it is not: the domain is the caller's to resume."""

    def __init__(self, loop: Loop, instance: Instance, fd: int, *, peer: bool, live: bool, done: Done,
                 downtime_ms: int = DOWNTIME_MS, file: tuple[str, str] | None = None) -> None:  # fmt: skip
        """`file`: (part, final) when `fd` writes a save file at `part`: renamed to `final` once
        complete and on disk, removed if not, so a save never leaves half a file under its name."""
        self.loop, self.instance, self.peer, self.done, self.file = loop, instance, peer, done, file
        self.live = live
        self.channel = _Channel(loop, fd)
        self.progress: dict[str, Any] = {"status": "setup"}
        self.finished = False
        self.started = time.monotonic()
        try:
            instance.migrate_out(fd, live, downtime_ms, self._fail)
        except EngineError as e:
            why = str(e)
            self.loop.call_later(0, lambda: self._fail(why))
            return
        self.loop.call_later(PROGRESS_INTERVAL, self._poll)

    def engine_status(self, status: str) -> None:
        """The engine's MIGRATION event ("completed" is said once the figures are in: `_final`)."""
        if status != MIGRATION_DONE:
            self.progress["status"] = status
        if self.finished:
            return
        if status == MIGRATION_DONE:
            self._ask(self._final)
        elif status in MIGRATION_FAILED:
            self._ask(lambda p: self._fail(str(p.get("error") or f"the engine says {status}")))

    def _ask(self, then: Callable[[dict[str, object]], None]) -> None:
        """The engine's last figures, then `then`; without them if it cannot say (it exited)."""
        try:
            self.instance.migration_progress(then)
        except EngineError:
            then({})

    def _final(self, progress: dict[str, object]) -> None:
        self.progress.update(progress)
        self.progress["bytes_remaining"] = 0
        if not self.live and "total_time_ms" in self.progress:  # stopped throughout: QEMU gives no downtime
            self.progress.setdefault("downtime_ms", self.progress["total_time_ms"])
        if self.finished:
            return
        if not self.peer:
            self._finish(None)
            return
        self.progress["status"] = "waiting for the target"
        self.channel.expect(RECEIVED, self._finish)

    def _poll(self) -> None:
        if self.finished:
            return

        def got(progress: dict[str, object]) -> None:
            if not self.finished and progress.get("status") not in (None, "", MIGRATION_DONE):
                self.progress.update(progress)

        with contextlib.suppress(EngineError):
            self.instance.migration_progress(got)
        self.loop.call_later(PROGRESS_INTERVAL, self._poll)

    def _fail(self, why: str) -> None:
        if not self.finished:
            with contextlib.suppress(EngineError):
                self.instance.cancel_migration()
            self._finish(why)

    def _finish(self, why: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.file is not None:
            why = self._keep_file(why)
        self.progress["status"] = "failed" if why else "completed"
        if why:
            self.progress["error"] = why
        if why or not self.peer:  # a peer's channel still carries GO
            self.channel.close()
        self.progress["elapsed_ms"] = round((time.monotonic() - self.started) * 1000)
        self.done(why)

    def _keep_file(self, why: str | None) -> str | None:
        part, final = self.file or ("", "")
        if why is None:
            try:
                os.fsync(self.channel.fd)
                os.rename(part, final)
                return None
            except OSError as e:
                why = f"{final}: {e.strerror}"
        with contextlib.suppress(OSError):
            os.unlink(part)
        return why

    def go(self) -> str | None:
        """Tell the target to run (the source let go of everything), with the figures of the move;
        why it could not be told."""
        why = self.channel.say(GO + b" " + json.dumps(self.progress).encode()[: MAX_LINE - 64] + b"\n")
        self.channel.close()
        return why


class Incoming:
    """The target's side: the engine loads from `fd`; with a `peer`, RECEIVED then wait for GO.

    `done(None)`: the state is loaded and the source let go: open the disks and run. `done(why)`:
    the domain never ran here; destroy it."""

    def __init__(self, loop: Loop, fd: int, *, peer: bool, done: Done) -> None:
        self.loop, self.peer, self.done = loop, peer, done
        self.channel = _Channel(loop, fd)
        self.status = "waiting for the engine"
        self.figures: dict[str, Any] = {}  # the source's, sent with GO
        self.finished = False

    def start(self, instance: Instance) -> None:
        """Once the engine can be asked (QEMU's monitor is up)."""
        self.status = "setup"
        try:
            instance.migrate_in(self.channel.fd, self._finish)
        except EngineError as e:
            self._finish(str(e))

    def engine_status(self, status: str) -> None:
        if self.finished:
            return
        self.status = status
        if status in MIGRATION_FAILED:
            self._finish(f"the engine could not load the domain's state ({status})")
        elif status == MIGRATION_DONE and not self.peer:
            self._finish(None)
        elif status == MIGRATION_DONE:
            if (why := self.channel.say(RECEIVED)) is not None:
                self._finish(why)
                return
            self.status = "waiting for the source"
            self.channel.expect(GO, self._go)

    def _go(self, why: str | None) -> None:
        if why is None:
            with contextlib.suppress(ValueError):  # a peer's: only figures are kept
                sent = json.loads(self.channel.rest or b"{}")
                if isinstance(sent, dict):
                    self.figures = {k: v for k, v in sent.items() if isinstance(k, str) and isinstance(v, int | str)
                                    and k != "status" and len(str(v)) < 200}  # fmt: skip
        self._finish(why)

    def _finish(self, why: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.status = "failed" if why else "completed"
        self.channel.close()
        self.done(why)
