"""Lifecycle rules shared by the supervisor (it restarts its engine) and the daemon (it restarts a
domain whose supervisor died): one limiter, so both stop a crash loop the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    """A domain's state as the supervisor reports it (xl list's letters but blocked)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # powered off and preserved
    CRASHED = "crashed"
    DYING = "dying"
    MIGRATING = "migrating"  # its state is being sent (migrate, save) or received (the target, restore)


class Event(StrEnum):
    """How an incarnation of a domain ended: what on_poweroff / on_reboot / on_crash answer."""

    POWEROFF = "poweroff"
    REBOOT = "reboot"
    CRASH = "crash"


class Action(StrEnum):
    """xl.cfg's lifecycle actions (xl.cfg(5), on_poweroff and its siblings)."""

    DESTROY = "destroy"
    RESTART = "restart"
    RENAME_RESTART = "rename-restart"
    PRESERVE = "preserve"
    COREDUMP_DESTROY = "coredump-destroy"
    COREDUMP_RESTART = "coredump-restart"

    @property
    def restarts(self) -> bool:
        return self.value.endswith("restart")


@dataclass
class Policies:
    """What to do when the guest powers off, reboots or crashes (state.json keeps the words)."""

    on_poweroff: Action = Action.DESTROY
    on_reboot: Action = Action.RESTART
    on_crash: Action = Action.DESTROY

    def __post_init__(self) -> None:
        self.on_poweroff, self.on_reboot, self.on_crash = map(Action, (self.on_poweroff, self.on_reboot, self.on_crash))

    def on(self, event: Event) -> Action:
        return {Event.POWEROFF: self.on_poweroff, Event.REBOOT: self.on_reboot, Event.CRASH: self.on_crash}[event]


RESTART_LIMIT = (5, 60.0)  # more restarts than this within that many seconds: stop restarting (crashed)


@dataclass
class RestartLimiter:
    """xl's guard against a crash loop: more than `count` restarts within `window` seconds is too many."""

    count: int = RESTART_LIMIT[0]
    window: float = RESTART_LIMIT[1]
    times: list[float] = field(default_factory=list)

    def allow(self, now: float) -> bool:
        """Count a restart at `now` (time.monotonic()); False when it is one too many."""
        self.times = [t for t in self.times if now - t < self.window] + [now]
        return len(self.times) <= self.count
