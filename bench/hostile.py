"""A hostile neighbour: one guest floods while another measures, on one switch and one daemon.

Three busybox domains made by a private slimvisord (`slimvisor create`, xl.cfg, one switch):
  flooder  transmits UDP at full speed (socat) to its own MAC (every frame crosses the switch and is
           dropped there, so only the switch's work grows) and rewrites a xenstore key in a loop
  a, b     a pings b: 100 pings 20 ms apart, the median round trip per round
and the toolstack's `list` over its API socket (20 calls, median), from the host. Each round
measures quiet, then with the flood running, then quiet again after it stopped; figures are
medians over rounds with the lowest and highest round, the CPU time the host's hypervisor stole,
and slimvisord's largest RSS while flooded (bounded: docs/security.md and the xenstore quotas).
Then (--xenstore-flood, 60 s) the flooder's own xenstore channel is flooded at full speed from the
host (fresh nodes, stuffed transactions, requests whose replies are never read) while slimvisord's
RSS is sampled twice a second.
Goal (issue 17): the second guest's latency within 2x of the quiet figure.

    python3 bench/hostile.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil
from hoststat import cpu_times, stolen
from rich.console import Console
from rich.table import Table

from slimvisor.images.cache import busybox_assets
from slimvisor.testing.expect import ConsoleSession
from slimvisor.toolstack.api import Client
from slimvisor.xenstore import XENSTORE_VSOCK_PORT
from slimvisor.xenstore.client import XenstoreClient
from slimvisor.xenstore.wire import XS_READ, XenstoreError, request

UP = r"slimvisor: \S+ is up"
NET = "10.78.0"


class Tree:
    """A private slimvisord and switch (their own run, state and log directories)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, **{f"SLIMVISOR_{k}_DIR": str(root / k.lower()) for k in ("RUN", "STATE", "LOG")}}

    def sv(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "slimvisor", *args], env=self.env, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"slimvisor {' '.join(args)}: {out.stderr}")
        return out.stdout

    def console(self, name: str) -> ConsoleSession:
        return ConsoleSession([sys.executable, "-m", "slimvisor", "console", name], self.env)

    def list_latency(self, calls: int = 20) -> float:
        """Median seconds of one `list` call on the daemon's API socket."""
        times = []
        with Client(self.root / "run" / "slimvisord.sock", autostart=False, timeout=60) as client:
            for _ in range(calls):
                t = time.perf_counter()
                client.call("list")
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def _ping(a: ConsoleSession) -> float:
    out = a.run(f"ping -c 100 -i 0.02 {NET}.2", timeout=120)
    rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]
    if len(rtts) < 90:
        raise RuntimeError(f"only {len(rtts)} of 100 pings answered: {out[-300:]}")
    return statistics.median(rtts)


def _taken(tree: Tree, tag: str) -> int:
    """Frames the switch has taken from the flooder's port so far."""
    ports = json.loads(tree.sv("switch", "show", tag, "--json"))["ports"]
    return sum(int(c["rx_packets"]) for p, c in ports.items() if p.startswith(f"{tag}f"))


def _flood_nodes(path: str, stop: threading.Event, counts: Counter[str]) -> None:
    """Fresh 2000-byte nodes (under node-size) until the nodes quota refuses them, and on."""
    with XenstoreClient(path, timeout=5) as xs:
        i = 0
        while not stop.is_set():
            try:
                xs.write(f"data/k{i}", b"x" * 2000)
                counts["accepted"] += 1
            except XenstoreError:
                counts["refused"] += 1
            i += 1


def _flood_transactions(path: str, stop: threading.Event, counts: Counter[str]) -> None:
    """Transactions kept open and stuffed with writes until a quota refuses (transactions,
    transaction-nodes, memory); then ended and started again."""
    with XenstoreClient(path, timeout=5) as xs:
        while not stop.is_set():
            txs: list[int] = []
            while not stop.is_set():
                try:
                    txs.append(xs.transaction_start())
                except XenstoreError:  # the transactions quota
                    break
                with contextlib.suppress(XenstoreError):
                    for i in range(2000):
                        xs.write(f"data/t{i}", b"y" * 1000, tx=txs[-1])
                        counts["accepted"] += 1
                counts["refused"] += 1
            for tx in txs:
                with contextlib.suppress(XenstoreError):
                    xs.transaction_end(tx, commit=False)


def _flood_unread(path: str, stop: threading.Event, counts: Counter[str]) -> None:
    """Reads sent without ever reading the replies: the outstanding quota stops reading them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.settimeout(0.5)
        batch = b"".join(request(XS_READ, b"data/k0\0", n) for n in range(64))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                sock.sendall(batch)
                counts["accepted"] += 64


# Two phases: nodes and transactions, then unread replies alone (a domain over its outstanding quota
# is not read on any of its connections: the first phase's would only wait).
PHASES = ((2 / 3, (_flood_nodes, _flood_nodes, _flood_transactions)), (1 / 3, (_flood_unread,)))


def xenstore_flood(tree: Tree, name: str, daemon: psutil.Process, seconds: float) -> dict[str, float]:
    """`seconds` of xenstore requests at full speed on `name`'s own xenstore channel (the socket its
    vsock connections reach: what a hostile guest kernel can send), one connection per flood of
    each PHASES entry, while slimvisord's RSS is sampled twice a second: its start, largest and last."""
    path = str(tree.root / "run" / "domains" / name / f"vsock_{XENSTORE_VSOCK_PORT}")
    counts = Counter[str]()
    start = daemon.memory_info().rss
    samples, t0 = [start], time.monotonic()
    for share, floods in PHASES:
        stop = threading.Event()
        threads = [threading.Thread(target=_quietly, args=(flood, path, stop, counts)) for flood in floods]
        for t in threads:
            t.start()
        end = time.monotonic() + share * seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            samples.append(daemon.memory_info().rss)
        stop.set()
        for t in threads:
            t.join(60)
    elapsed = time.monotonic() - t0
    return {"seconds": elapsed, "accepted": counts["accepted"], "refused": counts["refused"],
            "rss_start_mib": start / 2**20, "rss_max_mib": max(samples) / 2**20,
            "rss_end_mib": daemon.memory_info().rss / 2**20}  # fmt: skip


def _quietly(flood: Callable[[str, threading.Event, Counter[str]], None], path: str, stop: threading.Event,
             counts: Counter[str]) -> None:  # fmt: skip
    """A flood ends when the daemon stops answering or closes the connection (its quotas)."""
    with contextlib.suppress(OSError):
        flood(path, stop, counts)


def measure(tree: Tree, a: ConsoleSession) -> dict[str, float]:
    return {"ping round trip a to b (ms)": _ping(a), "slimvisor list over the API (ms)": tree.list_latency() * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--xenstore-flood", type=float, default=60, metavar="SECONDS",
                    help="then a xenstore flood this long with slimvisord's RSS sampled (0: none)")  # fmt: skip
    args = ap.parse_args()
    _, base = busybox_assets()
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    steals: list[float] = []
    rss: list[int] = []
    root = Path(tempfile.mkdtemp(prefix="svhostile-", dir="/var/tmp"))
    tree = Tree(root)
    tag = f"hb{os.getpid() % 10000}"
    consoles: dict[str, ConsoleSession] = {}
    flood: dict[str, float] | None = None
    try:
        tree.sv("switch", "start", tag)
        for i, name in enumerate(("b", "a", "f"), 2):
            name = f"{tag}{name}"
            disk = root / f"{name}.ext4"
            shutil.copyfile(base, disk)
            cfg = root / f"{name}.cfg"
            cfg.write_text(f'name = "{name}"\nmemory = 128\ndisk = ["{disk},raw,xvda,rw"]\n'
                           f'vif = ["bridge={tag}"]\nextra = "quiet sv.ip={NET}.{i}/24"\n')  # fmt: skip
            tree.sv("create", str(cfg))
            consoles[name] = tree.console(name)
            consoles[name].expect(UP, 240)
        a, f = consoles[f"{tag}a"], consoles[f"{tag}f"]
        a.run(f"ping -c 2 -W 5 {NET}.2")
        mac = f.run("cat /sys/class/net/eth0/address").strip()
        f.run(f"arp -s {NET}.99 {mac}")  # frames to its own MAC: the switch takes and drops them
        daemon = psutil.Process(int(json.loads(tree.sv("info", "--json"))["pid"]))
        for r in range(args.rounds):
            before = cpu_times()
            for metric, value in measure(tree, a).items():
                samples[metric]["quiet"].append(value)
            xs_loop = "i=0; while [ ! -e /tmp/stop ]; do xenstore-write data/x $i; i=$((i+1)); done"
            udp = f"socat -b 1400 -u /dev/zero UDP-SENDTO:{NET}.99:9"
            f.run(f"rm -f /tmp/stop; ({udp} &); ({xs_loop} &); echo flooding")
            frames_before, t0 = _taken(tree, tag), time.monotonic()
            for metric, value in measure(tree, a).items():
                samples[metric]["flooded"].append(value)
            samples["flood the switch took (kframes/s)"]["flooded"].append(
                (_taken(tree, tag) - frames_before) / (time.monotonic() - t0) / 1e3
            )
            rss.append(daemon.memory_info().rss)
            f.run("touch /tmp/stop; kill $(pidof socat); true")
            for metric, value in measure(tree, a).items():
                samples[metric]["after"].append(value)
            steals.append(stolen(before, cpu_times()))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        flood = xenstore_flood(tree, f"{tag}f", daemon, args.xenstore_flood) if args.xenstore_flood > 0 else None
    finally:
        for con in consoles.values():
            con.kill()
        for name in consoles:
            subprocess.run([sys.executable, "-m", "slimvisor", "destroy", name], env=tree.env, capture_output=True)
        subprocess.run([sys.executable, "-m", "slimvisor", "switch", "stop", tag], env=tree.env, capture_output=True)
        subprocess.run([sys.executable, "-m", "slimvisor", "daemon", "stop"], env=tree.env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"a flooding neighbour, {args.rounds} rounds, {os.cpu_count()} host CPUs",
                  caption="median (lowest-highest round)")  # fmt: skip
    table.add_column("metric")
    for kind in ("quiet", "flooded", "after"):
        table.add_column(kind, justify="right")
    table.add_column("flooded / quiet", justify="right")
    for metric, by_kind in samples.items():
        med = {k: statistics.median(v) for k, v in by_kind.items()}
        cells = [f"{med[k]:.2f} ({min(v):.2f}-{max(v):.2f})" if k in med else "" for k, v in
                 ((k, by_kind.get(k, [])) for k in ("quiet", "flooded", "after"))]  # fmt: skip
        ratio = f"{med['flooded'] / med['quiet']:.2f}x" if "quiet" in med else ""
        table.add_row(metric, *cells, ratio)
    Console().print(table)
    if rss:
        print(f"slimvisord RSS while flooded: at most {max(rss) / 2**20:.1f} MiB; CPU time stolen from this host: "
              f"median {statistics.median(steals):.0f}% ({min(steals):.0f}-{max(steals):.0f}%)")
    if flood is not None:
        print(f"xenstore flood on one guest's channel ({flood['seconds']:.0f} s, "
              f"{flood['accepted']:.0f} requests taken, {flood['refused']:.0f} refused): slimvisord RSS "
              f"{flood['rss_start_mib']:.1f} MiB before, at most {flood['rss_max_mib']:.1f} MiB, "
              f"{flood['rss_end_mib']:.1f} MiB at the end")


if __name__ == "__main__":
    main()
