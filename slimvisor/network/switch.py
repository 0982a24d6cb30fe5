"""The dom0 L2 switch, sans-IO: MAC learning, flooding and source-MAC enforcement between ports.

A port is a name, an optional MAC and a `send` callable (a NetDevice's `deliver`, the uplink TAP's
write). Frames come in through `receive` with the time, so learning and ageing are tested without
sleeping. As a Linux bridge with per-port MAC filtering: a port owns its MAC (an entry that never
ages nor moves, so no other port can draw its traffic away) and, when enforced, may send from no
other address; other addresses are learned and age out, and when the table is full the least
recently seen one makes room (O(1) a frame). Frames that flood (broadcast, multicast, unknown
destination) are limited per ingress port (storm control): one guest cannot make every other
port take its floods at full speed. Nothing in a frame can make the switch raise: what it cannot
forward it drops and counts.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from slimvisor.devices.net import ETH_HLEN, VnetHeader
from slimvisor.runtime.ratelimit import TokenBucket

log = logging.getLogger(__name__)

AGEING = 300.0  # seconds a learned MAC is kept without traffic from it, as Linux bridges do
MAX_MACS = 4096  # learned addresses at most: an uplink full of made-up sources cannot grow us
# Storm control: frames a port may flood a second, with a tenth of a second of them as burst. Far
# above what ARP, DHCP and neighbour discovery need; a flood past it is dropped and counted.
FLOOD_PPS = 1000
_ZERO = bytes(6)

Send = Callable[[VnetHeader, bytes], bool]
COUNTERS = (
    "rx_packets", "rx_bytes", "rx_dropped", "forged", "flood_limited", "tx_packets", "tx_bytes", "tx_dropped",
)  # fmt: skip


@dataclass(eq=False)
class Port:
    """One port with its counters: rx is what the switch took from it, tx what it gave it."""

    name: str
    mac: bytes | None
    send: Send
    enforce_mac: bool
    floods: TokenBucket | None = None  # storm control of what it floods
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def stats(self) -> dict[str, int]:
        return dict(self.counters)


class Switch:
    def __init__(
        self,
        *,
        ageing: float = AGEING,
        max_macs: int = MAX_MACS,
        flood_pps: int | None = FLOOD_PPS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ageing = ageing
        self.max_macs = max_macs
        self.flood_pps = flood_pps  # None: no storm control
        self.clock = clock
        self.ports: dict[str, Port] = {}
        self._owned: dict[bytes, str] = {}  # a port's own MAC -> the port: never ages nor moves
        self._learned: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # mac -> (port, last seen), LRU first
        # What became of every frame received: exactly one of these counts it.
        self.totals = dict.fromkeys(("forwarded", "flooded", "filtered", "dropped"), 0)

    # -- ports -----------------------------------------------------------------------------------
    def add_port(self, name: str, mac: bytes | None, send: Send, *, enforce_mac: bool = True) -> Port:
        """A new port; with a MAC it owns that address, and with enforce_mac may send only from it."""
        if name in self.ports:
            raise ValueError(f"port {name} exists already")
        if mac is not None:
            if len(mac) != 6 or mac[0] & 1 or mac == _ZERO:
                raise ValueError(f"port {name}: {mac.hex(':')} is not a unicast MAC address")
            owner = self._owned.get(mac)
            if owner is not None:
                raise ValueError(f"port {name}: MAC {mac.hex(':')} belongs to port {owner}")
            self._learned.pop(mac, None)
            self._owned[mac] = name
        floods = None
        if self.flood_pps is not None:
            burst = max(self.flood_pps // 10, 1)
            floods = TokenBucket(size=burst, refill_time=burst / self.flood_pps)
            floods.last = self.clock()
        port = Port(name, mac, send, enforce_mac and mac is not None, floods)
        self.ports[name] = port
        return port

    def remove_port(self, name: str) -> None:
        """Forget the port and every address it owned or was learned on."""
        if self.ports.pop(name, None) is not None:
            self._owned = {m: p for m, p in self._owned.items() if p != name}
            self._learned = OrderedDict((m, e) for m, e in self._learned.items() if e[0] != name)

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: port.stats() for name, port in self.ports.items()}

    def table(self, now: float | None = None) -> dict[bytes, str]:
        """The addresses the switch knows right now, and their ports."""
        now = self.clock() if now is None else now
        return {**{m: p for m, (p, seen) in self._learned.items() if now - seen <= self.ageing}, **self._owned}

    # -- frames ----------------------------------------------------------------------------------
    def receive(self, port: str, header: VnetHeader, frame: bytes, now: float | None = None) -> None:
        """A frame from `port`: learn its source, then forward, flood or drop it."""
        ingress = self.ports.get(port)
        if ingress is None:
            self.totals["dropped"] += 1
            return
        counters = ingress.counters
        src = frame[6:12]
        if ingress.enforce_mac and src != ingress.mac and len(frame) >= ETH_HLEN:
            counters["forged"] += 1
            self.totals["dropped"] += 1
            return
        if len(frame) < ETH_HLEN or src[0] & 1 or src == _ZERO:  # runt, or no station sends from these
            counters["rx_dropped"] += 1
            self.totals["dropped"] += 1
            return
        counters["rx_packets"] += 1
        counters["rx_bytes"] += len(frame)
        now = self.clock() if now is None else now
        self._learn(src, port, now)
        dst = frame[:6]
        out_name = None if dst[0] & 1 else self._where(dst, now)
        if out_name is None:  # broadcast, multicast, or nobody knows where: every other port
            if ingress.floods is not None and not ingress.floods.consume(1, now):
                counters["flood_limited"] += 1
                self.totals["dropped"] += 1
                return
            self.totals["flooded"] += 1
            for out in list(self.ports.values()):
                if out is not ingress:
                    self._send(out, header, frame)
        elif out_name == port:  # it is on the side it came from: never back out of the ingress
            self.totals["filtered"] += 1
        else:
            self.totals["forwarded"] += 1
            self._send(self.ports[out_name], header, frame)

    def _where(self, dst: bytes, now: float) -> str | None:
        """The port `dst` is on, if known and not aged out."""
        owner = self._owned.get(dst)
        if owner is not None:
            return owner
        entry = self._learned.get(dst)
        if entry is None:
            return None
        if now - entry[1] > self.ageing:
            del self._learned[dst]
            return None
        return entry[0]

    def _learn(self, src: bytes, port: str, now: float) -> None:
        """Learn or refresh `src` on `port`; a full table forgets its least recently seen entry."""
        if src in self._owned:
            return  # a port's own MAC stays where it is, whoever else sends from it
        learned = self._learned
        if src in learned:
            learned.move_to_end(src)
        elif len(learned) >= self.max_macs:
            learned.popitem(last=False)
        learned[src] = (port, now)

    def _send(self, port: Port, header: VnetHeader, frame: bytes) -> None:
        try:
            ok = port.send(header, frame)
        except Exception:  # one port's bug must not stop the frame reaching the others
            log.exception("switch: port %s failed to take a frame", port.name)
            ok = False
        if ok:
            port.counters["tx_packets"] += 1
            port.counters["tx_bytes"] += len(frame)
        else:
            port.counters["tx_dropped"] += 1
