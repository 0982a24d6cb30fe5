"""Guest-to-guest networking between two UML domains: slimvisor's switch against the kernel's.

Paths, same two busybox domains (iperf3 inside), one run, interleaved rounds, medians, ratios:
  slimvisor  virtio-net over vhost-user, through a `slimvisor switch` process
  bridge     UML's in-kernel vector driver on TAP devices in a Linux bridge (the C anchor)
Metrics: TCP throughput (iperf3, 5 s) and request/response latency: the median round trip of
100 pings in each round (a median, as everywhere here: one host hiccup must not move the figure).

    python3 bench/net.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute
from rich.console import Console
from rich.table import Table

from slimvisor.domain.expect import ConsoleSession
from slimvisor.images.cache import busybox_assets

UP = r"slimvisor: \S+ is up"
Samples = dict[str, dict[str, list[float]]]


def _slimvisor(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "slimvisor", *args], check=True, capture_output=True)


@contextmanager
def _network(kind: str, tag: str) -> Iterator[list[tuple[list[str], str]]]:
    """Set up the path; yield (extra `slimvisor run` arguments, extra kernel command line) for a, b."""
    if kind == "slimvisor":
        _slimvisor("switch", "start", tag)
        try:
            yield [(["--net", f"switch={tag}"], "")] * 2
        finally:
            _slimvisor("switch", "stop", tag)
        return
    taps = [f"{tag}a", f"{tag}b"]
    with IPRoute() as ipr:
        ipr.link("add", ifname=tag, kind="bridge")
        br = ipr.link_lookup(ifname=tag)[0]
        for tap in taps:
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], master=br, state="up")
        ipr.link("set", index=br, state="up")
    try:
        yield [([], f"vec0:transport=tap,ifname={tap},gro=1") for tap in taps]  # gro=1: its fast mode
    finally:
        with IPRoute() as ipr:
            for name in [*taps, tag]:
                for idx in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=idx)


def _domain(name: str, rootfs: Path, ip: str, extra: tuple[list[str], str], tmp: Path) -> ConsoleSession:
    args, cmdline = extra
    argv = [sys.executable, "-m", "slimvisor", "run", "--name", name, "--memory", "256M", "--disk", str(rootfs),
            "--cmdline", f"quiet sv.ip={ip} {cmdline}", "--log", str(tmp / f"{name}.log"), *args]  # fmt: skip
    return ConsoleSession(argv)


def one_round(kind: str, rootfs: list[Path]) -> dict[str, float]:
    tag = f"nb{os.getpid() % 10000}{kind[0]}"
    with tempfile.TemporaryDirectory(prefix="svbench-") as t, _network(kind, tag) as extra:
        a = _domain(f"{tag}-a", rootfs[0], "10.77.0.1/24", extra[0], Path(t))
        b = _domain(f"{tag}-b", rootfs[1], "10.77.0.2/24", extra[1], Path(t))
        try:
            a.expect(UP, 90)
            b.expect(UP, 90)
            a.run("ping -c 2 -W 5 10.77.0.2")
            b.run("iperf3 -s -D -1 > /dev/null; sleep 0.5")
            out = a.run("iperf3 -c 10.77.0.2 -t 5 -J", timeout=120)
            gbps = json.loads(out[out.index("{") :])["end"]["sum_received"]["bits_per_second"] / 1e9
            ping = a.run("ping -c 100 -i 0.02 10.77.0.2")
            rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", ping)]
            if len(rtts) < 90:
                raise RuntimeError(f"only {len(rtts)} of 100 pings answered: {ping[-300:]}")
            for con in (a, b):
                con.send("poweroff")
            for con in (a, b):
                con.wait(60)
            return {"TCP throughput (Gbit/s)": gbps, "ping round trip (ms)": statistics.median(rtts)}
        finally:
            a.kill()
            b.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    _, base = busybox_assets()
    kinds = ["slimvisor", "bridge"]
    samples: Samples = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory(prefix="svbench-disks-", dir="/var/tmp") as t:
        disks = [Path(t) / f"{n}.ext4" for n in "ab"]
        for d in disks:
            d.write_bytes(base.read_bytes())
        for r in range(args.rounds):
            order = random.sample(kinds, len(kinds))
            for kind in order:
                for metric, value in one_round(kind, disks).items():
                    samples[metric][kind].append(value)
            print(f"round {r + 1}/{args.rounds} done ({', '.join(order)})", file=sys.stderr)
    table = Table(title=f"UML guest to guest, {args.rounds} interleaved rounds")
    table.add_column("metric")
    for kind in kinds:
        table.add_column(f"{kind} (median)", justify="right")
    table.add_column("slimvisor / bridge", justify="right")
    for metric, by_kind in samples.items():
        med = {k: statistics.median(v) for k, v in by_kind.items()}
        table.add_row(metric, *(f"{med[k]:.3f}" for k in kinds), f"{med['slimvisor'] / med['bridge']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
