"""The one restart limiter the supervisor and the daemon share."""

from __future__ import annotations

from slimvisor.model.lifecycle import RESTART_LIMIT, RestartLimiter


def test_more_than_the_limit_within_the_window_is_refused() -> None:
    limiter = RestartLimiter()
    count, window = RESTART_LIMIT
    assert all(limiter.allow(float(i)) for i in range(count))
    assert not limiter.allow(float(count))
    assert limiter.allow(count + window)  # the old ones have left the window


def test_restarts_spread_out_are_always_allowed() -> None:
    limiter = RestartLimiter(count=1, window=10.0)
    assert all(limiter.allow(t * 10.0) for t in range(20))
