"""What the domain layer asks of an engine: the seam a second engine (QEMU for HVM) plugs into.

An `Engine` checks what it needs of a spec and starts an `Instance`: one boot of the domain's CPU
and memory, with the devices' vhost-user sockets attached. The supervisor and the runner talk to
an instance only through this interface; what an engine cannot do (save and migrate a UML domain)
it says by raising `Unsupported`, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from slimvisor.runtime.errors import SlimvisorError

if TYPE_CHECKING:
    from slimvisor.model.spec import DomainSpec


# What a Linux guest prints when it panics: every engine running Linux can see a panic there.
LINUX_PANIC_LINE = re.compile(rb"Kernel panic - not syncing: ([^\r\n]*)")


class EngineError(SlimvisorError):
    """The engine refused a request or did not answer it; the message says which request."""


class Unsupported(EngineError):
    """This engine does not offer the operation."""


class EngineEvent(StrEnum):
    """What an instance reports about its guest (its exit is seen on `pidfd`)."""

    STARTED = "started"
    REBOOT_REQUESTED = "reboot requested"
    PANICKED = "panicked"
    MIGRATION = "migration"  # a migration's status changed; the detail is the new status (MIGRATION_*)


# A migration's statuses as engines report them (QEMU's MigrationStatus names, qapi/migration.json).
MIGRATION_DONE = "completed"
MIGRATION_FAILED = ("failed", "cancelled")


@dataclass(frozen=True)
class Identity:
    """Who a domain's engine runs as, and where: its uid/gid and the cgroup.procs files it joins."""

    uid: int
    gid: int
    cgroup_procs: tuple[Path, ...] = ()


class Instance(Protocol):
    """One running boot of a domain."""

    pid: int
    pidfd: int  # readable once the engine's process has exited: then `wait`

    def event_fd(self) -> int:
        """Readable when the engine has something to report: then `events`."""
        ...

    def events(self) -> list[tuple[EngineEvent, str]]:
        """What the engine reported since last asked, with a detail (a panic's message)."""
        ...

    def console_seen(self, data: bytes) -> list[tuple[EngineEvent, str]]:
        """What the guest's console output `data` tells (engines that only say so there)."""
        ...

    def wait(self) -> int:
        """Reap the exited engine: its exit status (negative: killed by that signal)."""
        ...

    def pause(self, timeout: float = 5.0) -> None: ...

    def resume(self) -> None: ...

    def request_shutdown(self) -> None:
        """Ask the guest to go down its own way (ctrl-alt-del); its on_poweroff or on_reboot follows."""
        ...

    def vcpu_threads(self) -> list[int]:
        """Host tasks that run the guest's vCPUs, for pinning."""
        ...

    def set_memory_target(self, nbytes: int) -> None:
        """Ask the guest to use at most `nbytes` of its memory (a balloon the engine owns, as
        QEMU's over QMP). `Unsupported` when the engine has none: then slimvisor's own balloon
        device, which the domain layer serves beside the engine, does it."""
        ...

    def migrate_out(self, fd: int, live: bool, downtime_ms: int, failed: Callable[[str], None]) -> None:
        """Send the domain's state (memory, vCPUs, device state) down `fd`, a socket or a file:
        while it runs (`live`: pre-copy, then a stop of at most about `downtime_ms`), or stopped
        first. Progress and the end come as MIGRATION events; `failed(why)` if it cannot start."""
        ...

    def migrate_in(self, fd: int, failed: Callable[[str], None]) -> None:
        """Load the state `migrate_out` sent from `fd` into this instance, started `incoming` and
        paused; it stays paused afterwards (then `resume`). MIGRATION events as above."""
        ...

    def migration_progress(self, done: Callable[[dict[str, object]], None]) -> None:
        """Ask how the migration goes; `done` gets bytes sent and remaining, the dirty rate, the
        expected downtime (and, once completed, the downtime and total time), when the engine says."""
        ...

    def cancel_migration(self) -> None: ...

    def close(self) -> None:
        """Kill what is left of the engine and free what it held."""
        ...


class Engine(Protocol):
    name: str
    overhead: int  # bytes the engine needs beyond guest RAM (the domain's memory cgroup allows it)
    own_devices: frozenset[str]  # device kinds the engine provides itself rather than slimvisor's backends
    program: str  # what runs the guest, in messages ("UML crashed ...")
    shutdown_via: str  # how request_shutdown asks the guest, in the console log

    def check(self, spec: DomainSpec) -> None:
        """What this engine needs of `spec` on this host; raises SpecError."""
        ...

    def check_migratable(self, spec: DomainSpec) -> None:
        """Whether a domain of `spec` can be saved, restored and migrated; `Unsupported` says why not."""
        ...

    def why_not_live(self, spec: DomainSpec) -> str | None:
        """Why a domain of `spec` must be stopped before its state is copied (None: it can move live)."""
        ...

    def start(self, spec: DomainSpec, rundir: Path, devices: list[tuple[Path, int]], initrd: str | None,
              who: Identity, stdin: int, stdout: int, paused: bool = False,
              incoming: bool = False) -> Instance:  # fmt: skip
        """Boot `spec` with `devices` ((vhost-user socket, virtio id) pairs) attached, its console on
        `stdin`/`stdout`, running as `who`; `paused`: before the guest runs a single instruction,
        where the engine can (else the caller pauses it as soon as it can); `incoming`: not booted
        at all, waiting paused for `migrate_in`."""
        ...
