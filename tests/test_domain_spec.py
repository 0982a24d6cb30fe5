"""Parsing of `slimvisor run` device words (pure)."""

from __future__ import annotations

import pytest

from slimvisor.model.spec import NetSpec, SpecError
from slimvisor.network.switchd import _limiter


def test_net_words() -> None:
    n = NetSpec.parse("switch=lab0,mac=52:54:00:00:00:01,rate=100M,pps=5000")
    assert (n.switch, n.mac, n.rate, n.pps) == ("lab0", bytes.fromhex("525400000001"), 12_500_000, 5000)
    assert NetSpec.parse("bridge=lab0").switch == "lab0"  # xl's word for it
    assert NetSpec.parse("switch=a").mac_for("dom", 0) == NetSpec.parse("switch=b").mac_for("dom", 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mac=52:54:00:00:00:01", "say which switch"),
        ("switch=a,pps=0", "pps must be a positive number"),
        ("switch=a,pps=1e3", "pps must be a positive number"),
        ("switch=a,mac=01:00:00:00:00:01", "multicast"),
        ("switch=a,rate=fast", "rate 'fast'"),
        ("switch=a,speed=1", "bad option 'speed=1'"),
        ("switch=a,switch=b", "switch given twice"),
    ],
)
def test_bad_net_words(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        NetSpec.parse(text)


def test_packet_rate_limit_bucket() -> None:
    limiter = _limiter(None, 100)
    assert limiter is not None and limiter.bandwidth is None and limiter.ops is not None
    now = 1000.0
    passed = sum(limiter.allow(1500, now + i * 0.001) for i in range(1000))  # 1 s of offered packets
    assert 95 <= passed <= 115  # 100 pps plus the 100 ms burst
    assert _limiter(None, None) is None
