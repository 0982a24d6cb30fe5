"""The L2 switch on its own: ports are recording callables, time is passed in."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimvisor.devices.net import VnetHeader
from slimvisor.network.switch import AGEING, COUNTERS, Switch

A, B, C = (bytes.fromhex(f"5254000000{i:02x}") for i in (0xA, 0xB, 0xC))
HOST = bytes.fromhex("0200000000aa")
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")
HDR = VnetHeader()


def frame(dst: bytes, src: bytes, payload: bytes = b"payload") -> bytes:
    return dst + src + b"\x08\x00" + payload


class Net:
    """A switch whose ports record what they were sent; `ok[name]` says whether they take it."""

    def __init__(self, **kw):
        self.sw = Switch(clock=lambda: 0.0, **kw)
        self.got: dict[str, list[bytes]] = {}
        self.ok: dict[str, bool] = {}

    def port(self, name: str, mac: bytes | None, **kw):
        self.got[name] = []
        self.ok[name] = True

        def send(header: VnetHeader, data: bytes) -> bool:
            assert header is HDR
            self.got[name].append(data)  # looked up per call: take() replaces the lists
            return self.ok[name]

        return self.sw.add_port(name, mac, send, **kw)

    def announce(self, port: str, mac: bytes, now: float) -> None:
        """`port` broadcasts from `mac` (an ARP request, say); where the flood went is forgotten."""
        self.sw.receive(port, HDR, frame(BCAST, mac), now)
        self.take()

    def take(self) -> dict[str, list[bytes]]:
        """What each port got since the last call (ports that got nothing left out)."""
        out = {k: v for k, v in self.got.items() if v}
        self.got = {k: [] for k in self.got}
        return out


@pytest.fixture
def net() -> Net:
    n = Net()
    n.port("a", A)
    n.port("b", B)
    n.port("c", C)
    n.port("uplink", None, enforce_mac=False)
    return n


def test_owned_macs_are_known_before_any_traffic(net):
    f = frame(B, A)
    net.sw.receive("a", HDR, f, 0.0)
    assert net.take() == {"b": [f]}
    assert net.sw.totals["forwarded"] == 1
    assert net.sw.table(0.0) == {A: "a", B: "b", C: "c"}


def test_broadcast_multicast_and_unknown_flood_everywhere_but_back(net):
    for dst in (BCAST, MCAST, HOST):
        f = frame(dst, A)
        net.sw.receive("a", HDR, f, 1.0)
        assert net.take() == {"b": [f], "c": [f], "uplink": [f]}
    assert net.sw.totals["flooded"] == 3


def test_learning_on_the_uplink_and_the_reply(net):
    ask = frame(BCAST, HOST)
    net.sw.receive("uplink", HDR, ask, 10.0)
    assert net.take() == {"a": [ask], "b": [ask], "c": [ask]}
    reply = frame(HOST, A)
    net.sw.receive("a", HDR, reply, 11.0)
    assert net.take() == {"uplink": [reply]}  # learned: unicast, no flood
    assert net.sw.table(11.0)[HOST] == "uplink"


def test_learned_mac_ages_out(net):
    net.announce("uplink", HOST, 0.0)
    f = frame(HOST, A)
    net.sw.receive("a", HDR, f, AGEING)
    assert net.take() == {"uplink": [f]}  # still known at exactly the ageing time
    net.sw.receive("a", HDR, f, 2 * AGEING + 1)
    assert set(net.take()) == {"b", "c", "uplink"}  # forgotten: flooded again
    assert HOST not in net.sw.table(2 * AGEING + 1)
    assert net.sw.table(10 * AGEING) == {A: "a", B: "b", C: "c"}  # owned MACs never age


def test_traffic_keeps_a_mac_alive():
    n = Net(ageing=10.0)
    n.port("a", A)
    n.port("up", None, enforce_mac=False)
    for t in range(0, 100, 5):
        n.sw.receive("up", HDR, frame(A, HOST), float(t))
    f = frame(HOST, A)
    n.sw.receive("a", HDR, f, 100.0)
    assert n.take() == {"a": [frame(A, HOST)] * 20, "up": [f]}


def test_learned_mac_moves_with_the_station():
    n = Net()
    for name in ("u1", "u2", "a"):
        n.port(name, A if name == "a" else None, enforce_mac=name == "a")
    n.announce("u1", HOST, 1.0)
    n.announce("u2", HOST, 2.0)  # the host moved behind u2
    f = frame(HOST, A)
    n.sw.receive("a", HDR, f, 3.0)
    assert n.take() == {"u2": [f]}


def test_owned_mac_cannot_be_drawn_away_by_another_port(net):
    """The uplink (not enforced) sending from A's MAC must not make the switch send A's traffic out."""
    net.announce("uplink", A, 1.0)
    f = frame(A, B)
    net.sw.receive("b", HDR, f, 2.0)
    assert net.take() == {"a": [f]}


def test_no_hairpin(net):
    net.announce("uplink", HOST, 1.0)
    net.sw.receive("uplink", HDR, frame(HOST, bytes.fromhex("0200000000bb")), 2.0)
    assert net.take() == {}
    assert net.sw.totals["filtered"] == 1


def test_forged_source_dropped_and_counted_while_legit_traffic_flows(net):
    forged = frame(B, bytes.fromhex("525400666666"))
    for _ in range(3):
        net.sw.receive("a", HDR, forged, 1.0)
        net.sw.receive("a", HDR, frame(B, C), 1.0)  # another port's MAC is forged too
    assert net.take() == {}
    ok = frame(B, A)
    net.sw.receive("a", HDR, ok, 2.0)
    assert net.take() == {"b": [ok]}
    stats = net.sw.stats()
    assert stats["a"]["forged"] == 6
    assert stats["a"]["rx_packets"] == 1 and stats["a"]["rx_bytes"] == len(ok)
    assert stats["b"]["tx_packets"] == 1 and stats["b"]["tx_bytes"] == len(ok)
    assert net.sw.table(2.0)[C] == "c"  # the forged frames taught the switch nothing


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", b"\xff" * 13, frame(B, BCAST), frame(B, MCAST), frame(B, bytes(6)), frame(B, A)[:13]],
)
def test_runts_and_impossible_sources_dropped(data):
    n = Net()
    n.port("a", None, enforce_mac=False)
    n.port("b", B)
    n.sw.receive("a", HDR, data, 0.0)
    assert n.take() == {}
    assert n.sw.stats()["a"]["rx_dropped"] == 1
    assert n.sw.totals == {"forwarded": 0, "flooded": 0, "filtered": 0, "dropped": 1}


def test_full_destination_counts_tx_drop(net):
    net.ok["b"] = False
    net.sw.receive("a", HDR, frame(B, A), 0.0)
    net.sw.receive("a", HDR, frame(BCAST, A), 0.0)
    stats = net.sw.stats()
    assert stats["b"]["tx_dropped"] == 2 and stats["b"]["tx_packets"] == 0
    assert stats["c"]["tx_packets"] == 1


def test_a_failing_port_does_not_stop_the_flood(net, caplog):
    def broken(header, data):
        raise RuntimeError("bug")

    net.sw.add_port("broken", None, broken, enforce_mac=False)
    f = frame(BCAST, A)
    net.sw.receive("a", HDR, f, 0.0)
    assert net.take() == {"b": [f], "c": [f], "uplink": [f]}
    assert net.sw.stats()["broken"]["tx_dropped"] == 1
    assert "port broken failed" in caplog.text


def test_port_removal_forgets_its_macs(net):
    net.announce("uplink", HOST, 0.0)
    net.sw.remove_port("uplink")
    net.sw.remove_port("b")
    net.sw.remove_port("nonexistent")
    assert net.sw.table(0.0) == {A: "a", C: "c"}
    assert set(net.sw.stats()) == {"a", "c"}
    net.take()
    f = frame(HOST, A)
    net.sw.receive("a", HDR, f, 1.0)
    assert net.take() == {"c": [f]}
    net.sw.receive("b", HDR, frame(A, B), 1.0)  # a frame from a port that is gone
    assert net.take() == {}
    # B's address is free again for a new port
    net.port("b2", B)
    assert net.sw.table(1.0)[B] == "b2"


def test_add_port_refuses_bad_and_taken_macs(net):
    def send(header, data):
        return True

    with pytest.raises(ValueError, match="exists"):
        net.sw.add_port("a", None, send)
    for bad in (BCAST, MCAST, bytes(6), b"\x02\x00"):
        with pytest.raises(ValueError, match="not a unicast"):
            net.sw.add_port("x", bad, send)
    with pytest.raises(ValueError, match="belongs to port a"):
        net.sw.add_port("x", A, send)
    assert set(net.sw.ports) == {"a", "b", "c", "uplink"}


def test_learning_table_is_bounded_and_forgets_the_least_recently_seen():
    n = Net(max_macs=8, flood_pps=None)
    n.port("up", None, enforce_mac=False)
    n.port("a", A)
    for i in range(100):
        n.sw.receive("up", HDR, frame(BCAST, bytes([2, 0, 0, 0, 0, i])), i / 100)
        n.sw.receive("up", HDR, frame(BCAST, bytes([2, 0, 0, 0, 1, 0])), i / 100)  # seen all along
    learned = {bytes([2, 0, 0, 0, 0, i]): "up" for i in range(93, 100)} | {bytes([2, 0, 0, 0, 1, 0]): "up"}
    assert n.sw.table(1.0) == learned | {A: "a"}  # 8 learned, the port's own on top
    n.sw.receive("up", HDR, frame(BCAST, HOST), AGEING + 2)  # the old ones aged
    assert n.sw.table(AGEING + 2) == {A: "a", HOST: "up"}


def test_a_new_source_costs_the_same_with_a_full_table():
    """Once full, each new source evicts one entry (it used to rebuild the table: 254 us a frame)."""
    n = Net(max_macs=4096, flood_pps=None)
    n.port("up", None, enforce_mac=False)
    n.port("a", A)
    for i in range(4096):
        n.sw.receive("up", HDR, frame(A, bytes([2, 0, 0, 0, i >> 8, i & 255])), 0.0)
    assert len(n.sw.table(0.0)) == 4097
    start = time.process_time()
    for i in range(2000):
        n.sw.receive("up", HDR, frame(A, bytes([2, 1, 0, 0, i >> 8, i & 255])), 1.0)
    per_frame = (time.process_time() - start) / 2000
    assert per_frame < 50e-6, f"{per_frame * 1e6:.0f} us a frame with a full table"
    assert len(n.sw.table(1.0)) == 4097


def test_storm_control_limits_what_one_port_floods():
    """A port floods at most FLOOD_PPS frames a second (a tenth of it as burst); the rest is
    dropped and counted; unicast to a known station is never limited; other ports keep theirs."""
    from slimvisor.network.switch import FLOOD_PPS

    net = Net()
    net.port("a", A)
    net.port("b", B)
    burst = FLOOD_PPS // 10
    for _ in range(burst + 50):
        net.sw.receive("a", HDR, frame(BCAST, A), 0.0)
    assert len(net.take()["b"]) == burst
    assert net.sw.ports["a"].counters["flood_limited"] == 50
    net.sw.receive("b", HDR, frame(BCAST, B), 0.0)  # b's own budget is untouched
    for _ in range(10):
        net.sw.receive("a", HDR, frame(B, A), 0.0)  # known unicast: forwarded
    assert [len(v) for v in net.take().values()] == [1, 10]
    net.sw.receive("a", HDR, frame(BCAST, A), 0.5)  # half a second later: 500 more allowed
    assert len(net.take()["b"]) == 1
    assert net.sw.totals["dropped"] == 50


def test_default_clock_is_used_without_a_time():
    sw = Switch()
    got: list[bytes] = []

    def send(header: VnetHeader, data: bytes) -> bool:
        got.append(data)
        return True

    sw.add_port("a", A, lambda h, f: True)
    sw.add_port("b", None, send, enforce_mac=False)
    sw.receive("a", HDR, frame(HOST, A))
    assert len(got) == 1 and sw.table() == {A: "a"}


# -- property: random frames from random ports -------------------------------------------------
MACS = [A, B, C, HOST, BCAST, MCAST, bytes(6), bytes.fromhex("0200000000bb")]
PORTS = [("a", A, True), ("b", B, True), ("c", None, True), ("up", None, False), ("d", C, False)]
frames = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda d, s, rest: d + s + rest,
        st.sampled_from(MACS) | st.binary(min_size=6, max_size=6),
        st.sampled_from(MACS),
        st.binary(max_size=20),
    ),
)
events = st.lists(
    st.tuples(
        st.sampled_from([*(p[0] for p in PORTS), "gone"]),
        frames,
        st.floats(0, 2 * AGEING),  # time step
        st.booleans(),  # whether the destination ports take frames
        st.integers(0, 30),  # < len(PORTS): remove then re-add that port first
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events=events, ageing=st.sampled_from([1.0, AGEING]))
def test_random_traffic_is_accounted_for(events, ageing):
    sw = Switch(ageing=ageing, max_macs=6)
    sent: Counter[str] = Counter()
    offered: Counter[str] = Counter()
    accepting = [True]

    def sender(name):
        def send(header, data):
            sent[name] += 1
            return accepting[0]

        return send

    retired: Counter[str] = Counter()  # counters of ports removed along the way
    received_total = 0
    for name, mac, enforce in PORTS:
        sw.add_port(name, mac, sender(name), enforce_mac=enforce)
    now = 0.0
    flood_sends = 0
    for ingress, data, step, take, churn in events:
        if churn < len(PORTS):
            name, mac, enforce = PORTS[churn]
            retired.update(sw.ports[name].counters)
            sw.remove_port(name)
            sw.add_port(name, mac, sender(name), enforce_mac=enforce)
        now += step
        accepting[0] = take
        before = dict(sw.totals)
        sent_before = sum(sent.values())
        sw.receive(ingress, HDR, data, now)
        received_total += 1
        offered[ingress] += 1
        changed = {k: sw.totals[k] - before[k] for k in before}
        assert sorted(changed.values()) == [0, 0, 0, 1]  # exactly one fate per frame
        fanout = sum(sent.values()) - sent_before
        if changed["flooded"]:
            assert fanout == len(PORTS) - 1
            flood_sends += fanout
        elif changed["forwarded"]:
            assert fanout == 1
        else:
            assert fanout == 0
        assert len(sw.table(now)) <= 6 + 3  # learned ones bounded, owned ones on top
    totals = sw.totals
    assert sum(totals.values()) == received_total
    per_port = Counter(retired)
    for port in sw.ports.values():
        per_port.update(port.counters)
    assert set(sw.stats()) == {p[0] for p in PORTS}
    assert all(set(s) == set(COUNTERS) for s in sw.stats().values())
    # every frame from a known port was taken, dropped as a runt/bad source, or as forged
    from_ports = sum(offered[p[0]] for p in PORTS)
    assert per_port["rx_packets"] + per_port["rx_dropped"] + per_port["forged"] == from_ports
    refused = per_port["rx_dropped"] + per_port["forged"] + per_port["flood_limited"]
    assert totals["dropped"] == refused + offered["gone"]
    # every send is counted once on the receiving port, as delivered or dropped
    assert per_port["tx_packets"] + per_port["tx_dropped"] == sum(sent.values())
    assert sum(sent.values()) == flood_sends + totals["forwarded"]
