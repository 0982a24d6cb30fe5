"""The host's CPU time, for the benchmarks' steal figure: on a shared cloud VM the CPU time the
host's own hypervisor gives to other tenants is what moves every figure from run to run."""

from __future__ import annotations


def cpu_times() -> list[int]:
    """The host's total CPU times (/proc/stat): user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def stolen(before: list[int], after: list[int]) -> float:
    """Percent of the host's CPU time its own hypervisor gave to others (steal) between two readings."""
    d = [b - a for a, b in zip(before, after, strict=True)]
    return 100.0 * d[7] / max(1, sum(d)) if len(d) > 7 else 0.0
