"""Token buckets for rate limiting, in the manner of Firecracker's rate limiter.

A `RateLimiter` holds up to two buckets, bytes and operations (packets, requests); an operation
passes only when both have tokens. Time is passed in, so the logic is tested without sleeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`size` tokens refilled evenly over `refill_time` seconds, plus a one-time burst."""

    size: int
    refill_time: float = 1.0
    one_time_burst: int = 0
    tokens: float = field(init=False)
    last: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.refill_time <= 0:
            raise ValueError("a token bucket needs a positive size and refill time")
        self.tokens = float(self.size)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(float(self.size), self.tokens + elapsed * self.size / self.refill_time)

    def consume(self, n: int, now: float) -> bool:
        """Take `n` tokens if there are enough (an `n` above `size` passes on a full bucket)."""
        self._refill(now)
        if self.one_time_burst >= n:
            self.one_time_burst -= n
            return True
        need = min(n, self.size)
        if self.tokens >= need:
            self.tokens -= n  # may go negative for oversize n: later operations wait it out
            return True
        return False

    def wait_time(self, n: int, now: float) -> float:
        """Seconds until `n` tokens can be taken."""
        self._refill(now)
        need = min(n, self.size) - self.tokens
        return max(0.0, need * self.refill_time / self.size)


@dataclass
class RateLimiter:
    bandwidth: TokenBucket | None = None  # bytes
    ops: TokenBucket | None = None  # packets or requests

    def allow(self, nbytes: int, now: float | None = None) -> bool:
        """Account one operation of `nbytes`; False (nothing taken) when it must wait."""
        now = time.monotonic() if now is None else now
        if self.bandwidth is not None and self.bandwidth.wait_time(nbytes, now) > 0:
            return False
        if self.ops is not None and self.ops.wait_time(1, now) > 0:
            return False
        if self.bandwidth is not None:
            self.bandwidth.consume(nbytes, now)
        if self.ops is not None:
            self.ops.consume(1, now)
        return True

    def wait_time(self, nbytes: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        waits = [b.wait_time(n, now) for b, n in ((self.bandwidth, nbytes), (self.ops, 1)) if b is not None]
        return max(waits, default=0.0)


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_rate(text: str) -> int:
    """A bandwidth in bytes per second from xl's rate syntax: '100M' or '100Mb/s' (bits), '10MB/s' (bytes)."""
    t = text.strip()
    per = t.lower().endswith("/s")
    if per:
        t = t[:-2]
    unit_bytes = t.endswith("B")
    t = t.rstrip("bB") if per or unit_bytes else t
    scale = _UNITS.get(t[-1:].lower()) if t and not t[-1].isdigit() else 1
    number = t[:-1] if t and not t[-1].isdigit() else t
    if scale is None or not number.isdigit() or int(number) <= 0:
        raise ValueError(f"rate {text!r}: expected a number with an optional k/M/G unit, e.g. 100M or 10MB/s")
    value = int(number) * scale
    rate = value if unit_bytes else value // 8
    if rate <= 0:
        raise ValueError(f"rate {text!r} is less than one byte per second")
    return rate
