"""Switch frames: any bytes from any port, at any time; every frame gets exactly one fate, the
counters add up and the learning table stays bounded."""

from __future__ import annotations

from fuzz.bytes import Input
from slimvisor.devices.net import VnetHeader
from slimvisor.network.switch import Switch

MACS = [bytes.fromhex(h) for h in ("52540000000a", "52540000000b", "0200000000aa", "ffffffffffff", "01005e000001")]
PORTS = [("a", MACS[0], True), ("b", MACS[1], True), ("up", None, False), ("c", None, True)]
MAX_MACS = 8


def target(data: bytes) -> None:
    inp = Input(data)
    sw = Switch(max_macs=MAX_MACS, flood_pps=inp.pick([None, 10, 1000]), clock=lambda: 0.0)
    accept = [True]
    for name, mac, enforce in PORTS:
        sw.add_port(name, mac, lambda h, f: accept[0], enforce_mac=enforce)
    now, frames = 0.0, 0
    while inp.more:
        op = inp.num()
        now += inp.num() / 16
        accept[0] = bool(op & 1)
        if op & 0xE0 == 0xE0:  # churn: a port goes and comes back
            name, mac, enforce = inp.pick(PORTS)
            sw.remove_port(name)
            sw.add_port(name, mac, lambda h, f: accept[0], enforce_mac=enforce)
            continue
        dst = inp.pick(MACS) if op & 2 else inp.take(6)
        src = inp.pick(MACS) if op & 4 else inp.take(6)
        frame = (dst + src + inp.rest(64))[: inp.num() if op & 8 else None]
        before = sum(sw.totals.values())
        sw.receive(inp.pick([p[0] for p in PORTS] + ["gone"]), VnetHeader(), frame, now)
        frames += 1
        assert sum(sw.totals.values()) == before + 1, "a frame had no fate, or two"
        assert len(sw.table(now)) <= MAX_MACS + len(PORTS), "the learning table outgrew its bound"
    assert sum(sw.totals.values()) == frames
