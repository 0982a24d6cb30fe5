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


def test_policies_keep_xl_words_in_json_and_answer_events() -> None:
    import json
    from dataclasses import asdict

    from slimvisor.model.lifecycle import Action, Event, Policies, State

    p = Policies(**json.loads(json.dumps(asdict(Policies(on_crash=Action.PRESERVE)))))  # as state.json does
    words = {"on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "preserve"}
    assert json.loads(json.dumps(asdict(p))) == words
    assert (p.on(Event.CRASH), p.on(Event.REBOOT)) == (Action.PRESERVE, Action.RESTART)
    assert Action.RENAME_RESTART.restarts and not Action.PRESERVE.restarts
    assert f"on_{Event.CRASH}={p.on_crash}" == "on_crash=preserve" and json.dumps(State.PAUSED) == '"paused"'
