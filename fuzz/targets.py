"""The registry of fuzz targets, the memory budget of one input, and the corpus of found inputs."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

from fuzz import peers, switch, vhostuser, virtqueue, xenstore, xlcfg

Target = Callable[[bytes], None]
TARGETS: dict[str, Target] = {
    "vhostuser": vhostuser.target,
    "virtqueue": virtqueue.target,
    "xenstore": xenstore.target,
    "switch": switch.target,
    "xlcfg": xlcfg.target,
    "peers": peers.target,
}
CORPUS = Path(__file__).parent / "corpus"
MEMORY_BUDGET = 64 << 20  # bytes one input may make a target allocate at its peak


def run_measured(target: Target, data: bytes, budget: int = MEMORY_BUDGET) -> None:
    """Run one input with tracemalloc on; more than `budget` at the peak is a failure."""
    tracemalloc.start()
    try:
        target(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if peak > budget:
        raise AssertionError(f"one input took {peak >> 20} MiB at its peak (budget {budget >> 20} MiB)")


def corpus(name: str) -> list[Path]:
    return sorted((CORPUS / name).glob("*")) if (CORPUS / name).is_dir() else []
