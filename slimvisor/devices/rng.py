"""virtio-rng (virtio 1.2 section 5.4): the host kernel's randomness for the guest's hw_random.

Each chain the driver makes available is device-writable buffers; the device fills them from
getrandom(2), which never blocks once the host's pool is seeded. With a `RateLimiter`, a request
that must wait stays on the ring rather than in a host buffer: the queue gives the chain back
(`unpop`) and a timer serves it again, so a greedy guest costs the host nothing but a timer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from slimvisor.runtime.ratelimit import RateLimiter
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_RNG
from slimvisor.virtio.state import integer

# 5.4.2 Virtqueues
REQUESTQ = 0
# 5.4.6.2: the device MAY fill less than the whole buffer; this bounds one getrandom() copy.
MAX_REQUEST = 64 * 1024
MIN_WAIT = 0.001  # seconds: never spin on a timer of zero


class RngDevice(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    max_queues = 1

    def __init__(self, limiter: RateLimiter | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limiter = limiter
        self.clock = clock
        self.waiting = False  # a timer will serve the queue again
        self.bytes_served = 0

    def device_features(self) -> int:
        return 0  # 5.4.3: none

    def config(self) -> bytes:
        return b""  # 5.4.4: none

    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        """Serve chains until the ring is empty or the rate limit says wait (then a timer resumes)."""
        chains = moved = 0
        while True:
            queue.disable_kicks()
            while (chain := queue.pop()) is not None:
                want = _request_len(chain)
                if self.limiter is not None and not self.limiter.allow(want, self.clock()):
                    queue.unpop()
                    self._wait(self.limiter.wait_time(want, self.clock()))
                    return
                written = self.handle(queue_index, chain)
                queue.push(chain.head, written)
                chains, moved = chains + 1, moved + written
                if self.over_budget(queue_index, chains, moved):
                    return
            if not queue.enable_kicks():
                return

    def handle(self, queue_index: int, chain: Chain) -> int:
        written = chain.write(0, os.getrandom(_request_len(chain)))
        self.bytes_served += written
        return written

    def _wait(self, delay: float) -> None:
        if self.waiting or self.transport is None:
            return  # one timer at a time: kicks meanwhile find the limit still closed
        self.waiting = True
        self.transport.call_later(max(delay, MIN_WAIT), self._resume)

    def _resume(self) -> None:
        self.waiting = False
        self.serve(REQUESTQ)

    state_fields = ("bytes_served",)

    def save_device(self) -> dict[str, Any]:
        return {"bytes_served": self.bytes_served}

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        served = integer(state, "bytes_served", "rng", 0, (1 << 64) - 1)
        return lambda: setattr(self, "bytes_served", served)

    def reset(self) -> None:
        super().reset()
        self.waiting = False  # a timer still pending finds no queue, or a fresh one to serve


def _request_len(chain: Chain) -> int:
    """How many bytes to give: no driver-readable buffers (5.4.6.1), room for one byte at least (5.4.6.2)."""
    if chain.readable or chain.writable_len == 0:
        raise VirtqueueError(f"rng request {chain.head} is not one or more device-writable bytes")
    return min(chain.writable_len, MAX_REQUEST)
