"""What the jail costs: starting the engine in a jail against starting it bare, in one run.

Paths, the same program (`linux.uml --version`: UML's own start-up, then exit), interleaved:
  jailed  slimvisor.jail.spawn as a domain's engine gets it: a leased uid, five new namespaces,
          pivot_root into a tmpfs with the kernel, its libraries and a /tmp, rlimits, no
          capabilities, the UML seccomp allowlist (the compiled filter is cached, as in a daemon)
  bare    fork + exec of the same command line (subprocess), the anchor
Each round times `--starts` starts of each path (order shuffled per round); per path the median
of each round, then the median of the rounds with the lowest and highest round, the ratio, and
the CPU time the host's hypervisor stole during the run.

    python3 bench/jail.py [--rounds 5] [--starts 20]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hoststat import cpu_times, stolen
from rich.console import Console
from rich.table import Table

from slimvisor.engines.uml import uml_filter
from slimvisor.jail import Bind, JailSpec, UidLease, spawn
from slimvisor.jail.spawn import shared_libraries

UML = "/usr/bin/linux.uml"
ARGV = [UML, "--version"]


def jailed(lease: UidLease, work: Path) -> float:
    root = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    binds = [Bind(p, p) for p in (UML, *shared_libraries(UML))]
    spec = JailSpec("bench", lease.uid, lease.gid, root, binds, 64 << 20, seccomp=uml_filter())
    with open(os.devnull, "r+b") as null:
        engine = spawn(spec, ARGV, {"PATH": "/nonexistent"}, null.fileno(), null.fileno())
        rc = engine.wait()
    elapsed = time.perf_counter() - t0
    engine.close()
    root.rmdir()
    if rc != 0:
        raise RuntimeError(f"jailed {ARGV} exited {rc}")
    return elapsed


def bare() -> float:
    t0 = time.perf_counter()
    subprocess.run(ARGV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--starts", type=int, default=20)
    args = ap.parse_args()
    lease = UidLease.acquire("bench-jail")
    uml_filter()  # compiled (or read from its cache) once, as slimvisord does before forking supervisors
    shared_libraries(UML)
    rounds: dict[str, list[float]] = {"jailed": [], "bare": []}
    before = cpu_times()
    with tempfile.TemporaryDirectory(prefix="svbench-jail-") as t:
        for r in range(args.rounds):
            order = random.sample(list(rounds), 2)
            for kind in order:
                times = [jailed(lease, Path(t)) if kind == "jailed" else bare() for _ in range(args.starts)]
                rounds[kind].append(statistics.median(times))
            print(f"round {r + 1}/{args.rounds} done ({', '.join(order)})", file=sys.stderr)
    steal = stolen(before, cpu_times())
    lease.release()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    table = Table(title=f"Engine start ({ARGV[0]} --version), {args.rounds} interleaved rounds of {args.starts}, "
                        f"{os.cpu_count()} CPUs, {steal:.0f}% stolen")  # fmt: skip
    table.add_column("path")
    table.add_column("median (ms)", justify="right")
    table.add_column("rounds low-high (ms)", justify="right")
    for kind, values in rounds.items():
        table.add_row(kind, f"{1000 * med[kind]:.2f}", f"{1000 * min(values):.2f}-{1000 * max(values):.2f}")
    Console().print(table)
    added = 1000 * (med["jailed"] - med["bare"])
    print(f"jailed / bare: {med['jailed'] / med['bare']:.2f}x; the jail adds {added:+.1f} ms")


if __name__ == "__main__":
    main()
