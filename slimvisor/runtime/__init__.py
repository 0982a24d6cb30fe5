"""The lowest layer: what every dom0 process runs on.

The event loop (`loop`), Unix listening sockets (`unix`), control sockets between dom0's own
processes (`control`), rate limiting (`ratelimit`), where state lives on the host (`paths`) and
the build's identity (`build`). Nothing here imports any other slimvisor package.
"""

from slimvisor.runtime.errors import SlimvisorError
from slimvisor.runtime.loop import EventLoop, Loop

__all__ = ["EventLoop", "Loop", "SlimvisorError"]
