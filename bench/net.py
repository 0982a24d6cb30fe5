"""Guest-to-guest networking between two UML domains: slimvisor's switch against the kernel's.

Paths, same two busybox domains (iperf3 inside), one run, interleaved rounds, medians, ratios:
  slimvisor  virtio-net over vhost-user, through a `slimvisor switch` process
  bridge     UML's in-kernel vector driver on TAP devices in a Linux bridge (the C anchor); bare
             linux.uml with its root on ubd, as only an unjailed UML can reach a TAP
Metrics: TCP throughput (iperf3, 5 s) and request/response latency: the median round trip of
100 pings in each round (a median, as everywhere here: one host hiccup must not move the figure).
Each figure comes with its lowest and highest round, and the run with the CPU time the host's own
hypervisor stole meanwhile: on a shared cloud VM that is what makes the figures move.

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

from hoststat import cpu_times, stolen
from pyroute2 import IPRoute
from rich.console import Console
from rich.table import Table

from slimvisor.images.cache import busybox_assets
from slimvisor.testing.expect import ConsoleSession

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
    """slimvisor's path: `slimvisor run` (jailed; disk and network over vhost-user). The anchor's:
    bare linux.uml with the kernel's own drivers (ubd, vector TAP), which only an unjailed UML can
    use, so the kernel command line carries its host options."""
    args, host_options = extra
    if not host_options:
        argv = [sys.executable, "-m", "slimvisor", "run", "--name", name, "--memory", "256M", "--disk", str(rootfs),
                "--cmdline", f"quiet sv.ip={ip}", "--log", str(tmp / f"{name}.log"), *args]  # fmt: skip
        return ConsoleSession(argv)
    initrd, _ = busybox_assets()
    uml_dir = tmp / name
    uml_dir.mkdir()
    argv = ["/usr/bin/linux.uml", "mem=256M", f"initrd={initrd}", "root=/dev/ubda", f"ubda={rootfs}", "con=null",
            "con0=fd:0,fd:1", f"uml_dir={uml_dir}", "quiet", f"sv.ip={ip}", host_options]  # fmt: skip
    return ConsoleSession(argv, env={"TMPDIR": "/dev/shm"}, cwd=str(uml_dir))


def one_round(kind: str, rootfs: list[Path]) -> tuple[dict[str, float], float]:
    """The round's metrics, and the share of CPU time stolen from this host while they ran."""
    tag = f"nb{os.getpid() % 10000}{kind[0]}"
    with tempfile.TemporaryDirectory(prefix="svbench-") as t, _network(kind, tag) as extra:
        a = _domain(f"{tag}-a", rootfs[0], "10.77.0.1/24", extra[0], Path(t))
        b = _domain(f"{tag}-b", rootfs[1], "10.77.0.2/24", extra[1], Path(t))
        try:
            a.expect(UP, 90)
            b.expect(UP, 90)
            a.run("ping -c 2 -W 5 10.77.0.2")
            b.run("iperf3 -s -D -1 > /dev/null; sleep 0.5")
            cpu_before = cpu_times()
            out = a.run("iperf3 -c 10.77.0.2 -t 5 -J", timeout=120)
            gbps = json.loads(out[out.index("{") :])["end"]["sum_received"]["bits_per_second"] / 1e9
            ping = a.run("ping -c 100 -i 0.02 10.77.0.2")
            rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", ping)]
            if len(rtts) < 90:
                raise RuntimeError(f"only {len(rtts)} of 100 pings answered: {ping[-300:]}")
            steal = stolen(cpu_before, cpu_times())
            for con in (a, b):
                con.send("poweroff")
            for con in (a, b):
                con.wait(60)
            return {"TCP throughput (Gbit/s)": gbps, "ping round trip (ms)": statistics.median(rtts)}, steal
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
    steals: list[float] = []
    with tempfile.TemporaryDirectory(prefix="svbench-disks-", dir="/var/tmp") as t:
        disks = [Path(t) / f"{n}.ext4" for n in "ab"]
        for d in disks:
            d.write_bytes(base.read_bytes())
        for r in range(args.rounds):
            order = random.sample(kinds, len(kinds))
            for kind in order:
                metrics, steal = one_round(kind, disks)
                steals.append(steal)
                for metric, value in metrics.items():
                    samples[metric][kind].append(value)
            print(f"round {r + 1}/{args.rounds} done ({', '.join(order)})", file=sys.stderr)
    title = f"UML guest to guest, {args.rounds} interleaved rounds, {os.cpu_count()} host CPUs"
    table = Table(title=title, caption="median (lowest-highest round): the spread is this host's noise")
    table.add_column("metric")
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("slimvisor / bridge", justify="right")
    for metric, by_kind in samples.items():
        med = {k: statistics.median(v) for k, v in by_kind.items()}
        cells = [f"{med[k]:.3f} ({min(by_kind[k]):.2f}-{max(by_kind[k]):.2f})" for k in kinds]
        table.add_row(metric, *cells, f"{med['slimvisor'] / med['bridge']:.2f}x")
    Console().print(table)
    # A VM's vCPUs share physical CPUs with other tenants: what they take shows up as steal, and
    # it moves both paths' figures from run to run (a ratio from a round with much steal is weak).
    print(f"CPU time stolen from this host by its hypervisor during the runs: median {statistics.median(steals):.0f}% "
          f"({min(steals):.0f}-{max(steals):.0f}%)")


if __name__ == "__main__":
    main()
