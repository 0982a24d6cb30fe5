"""A hostile neighbour: one guest floods while another measures, on one switch and one daemon.

Three busybox domains made by a private slimvisord (`slimvisor create`, xl.cfg, one switch):
  flooder  transmits UDP at full speed (socat) to its own MAC (every frame crosses the switch and is
           dropped there, so only the switch's work grows) and rewrites a xenstore key in a loop
  a, b     a pings b: 100 pings 20 ms apart, the median round trip per round
and the toolstack's `list` over its API socket (20 calls, median), from the host. Each round
measures quiet, then with the flood running, then quiet again after it stopped; figures are
medians over rounds with the lowest and highest round, the CPU time the host's hypervisor stole,
and slimvisord's largest RSS while flooded (bounded: docs/security.md and the xenstore quotas).
Goal (issue 17): the second guest's latency within 2x of the quiet figure.

    python3 bench/hostile.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
from hoststat import cpu_times, stolen
from rich.console import Console
from rich.table import Table

from slimvisor.images.cache import busybox_assets
from slimvisor.testing.expect import ConsoleSession
from slimvisor.toolstack.api import Client

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


def measure(tree: Tree, a: ConsoleSession) -> dict[str, float]:
    return {"ping round trip a to b (ms)": _ping(a), "slimvisor list over the API (ms)": tree.list_latency() * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _, base = busybox_assets()
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    steals: list[float] = []
    rss: list[int] = []
    root = Path(tempfile.mkdtemp(prefix="svhostile-", dir="/var/tmp"))
    tree = Tree(root)
    tag = f"hb{os.getpid() % 10000}"
    consoles: dict[str, ConsoleSession] = {}
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
    print(f"slimvisord RSS while flooded: at most {max(rss) / 2**20:.1f} MiB; CPU time stolen from this host: "
          f"median {statistics.median(steals):.0f}% ({min(steals):.0f}-{max(steals):.0f}%)")


if __name__ == "__main__":
    main()
