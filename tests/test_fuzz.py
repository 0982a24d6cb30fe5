"""The fuzz targets (fuzz/) under hypothesis, bounded, and every input in their corpus replayed.

Each target raises only on a failure: a crash, an exception other than its documented rejection,
an access outside guest memory, a leaked fd, a broken invariant, or more than fuzz.targets'
MEMORY_BUDGET allocated for one input (measured with tracemalloc). Longer runs:
`scripts/fuzz.sh TARGET SECONDS` (atheris where it installs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import TARGETS, corpus, run_measured

# Examples per target: the six together take about 20 s here (the whole step must stay under 3 min).
EXAMPLES = {"vhostuser": 300, "virtqueue": 600, "xenstore": 600, "switch": 600, "xlcfg": 600, "peers": 600}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_under_hypothesis(name: str) -> None:
    @settings(max_examples=EXAMPLES[name], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=2048))
    def run(data: bytes) -> None:
        run_measured(TARGETS[name], data)

    run()


CASES = [(name, path) for name in sorted(TARGETS) for path in corpus(name)]


@pytest.mark.parametrize(("name", "path"), CASES, ids=[f"{n}/{p.name}" for n, p in CASES])
def test_corpus_input(name: str, path: Path) -> None:
    """An input that once failed (or that reaches deep): it must pass now."""
    run_measured(TARGETS[name], path.read_bytes())


def test_every_target_has_a_corpus() -> None:
    assert all(corpus(name) for name in TARGETS), [name for name in TARGETS if not corpus(name)]


def test_a_target_can_fail() -> None:
    """The harness reports what a target raises (so a real failure would not pass unseen)."""

    def broken(data: bytes) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_measured(broken, b"")
    with pytest.raises(AssertionError, match="at its peak"):
        run_measured(lambda data: bytearray(8 << 20) and None, b"", budget=1 << 20)
