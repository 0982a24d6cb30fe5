"""The root of slimvisor's own errors.

Every error slimvisor raises on purpose derives from `SlimvisorError`, whatever layer names it, so
a caller catches "anything slimvisor refused" in one clause; each also keeps the builtin base it
always had (a `SpecError` is still a ValueError). It lives in the lowest layer because every layer
defines errors of its own.
"""

from __future__ import annotations


class SlimvisorError(Exception):
    """A failure slimvisor names itself; a bug's TypeError or a host's OSError stays what it is."""
