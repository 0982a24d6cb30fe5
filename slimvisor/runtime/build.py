"""The identity of this build, so dom0's own processes refuse to talk across versions.

Daemon, supervisors and backends are one tree released in lock-step (their control messages are
internal and unversioned); a supervisor left running by an older build must not be driven by a
newer daemon as if it were the same. The id is the package version plus a hash of its sources.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from slimvisor import __version__


@functools.cache
def build_id() -> str:
    digest = hashlib.sha256()
    root = Path(__file__).parent.parent  # the slimvisor package, not just runtime/
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


BUILD_MISMATCH = "build mismatch"  # how a supervisor refuses a caller of another build


def mismatch(mine: str, theirs: object) -> str:
    return f"{BUILD_MISMATCH}: this is {mine}, the caller is {theirs}"
