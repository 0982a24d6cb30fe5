"""Lifecycle rules shared by the supervisor (it restarts its engine) and the daemon (it restarts a
domain whose supervisor died): one limiter, so both stop a crash loop the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

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
