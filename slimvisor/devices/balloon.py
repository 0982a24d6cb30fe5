"""virtio-balloon (virtio 1.2 section 5.5): the host asks for memory back, the guest hands over pages.

The host sets a target (`set_target`, in 4 KiB pages); the guest inflates its balloon by sending
the frame numbers of pages it gave up, and each run of them is returned to the host through
`Transport.discard_memory` (a hole punched in the shared memory file). Deflated pages need no
work: the guest simply touches them again. Frame numbers outside guest memory are the guest's
mistake: they are skipped and counted. Memory statistics arrive on the stats queue, whose one
buffer the device keeps until the host wants fresh numbers (5.5.6.3).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from slimvisor.memory import GuestMemoryError
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTIO_ID_BALLOON, VIRTQ_MAX_SIZE, bit
from slimvisor.virtio.state import integer, same

log = logging.getLogger(__name__)

# 5.5.2 Virtqueues
INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2  # only with VIRTIO_BALLOON_F_STATS_VQ

# 5.5.3 Feature bits
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

# 5.5.6 Device Operation: page frame numbers are in 4 KiB units whatever the guest's page size
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE = 1 << VIRTIO_BALLOON_PFN_SHIFT

# 5.5.6.3.1 Memory Statistics Tags
VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
STAT_NAMES = {
    VIRTIO_BALLOON_S_SWAP_IN: "swap_in",  # bytes
    VIRTIO_BALLOON_S_SWAP_OUT: "swap_out",  # bytes
    VIRTIO_BALLOON_S_MAJFLT: "major_faults",
    VIRTIO_BALLOON_S_MINFLT: "minor_faults",
    VIRTIO_BALLOON_S_MEMFREE: "free_memory",  # bytes
    VIRTIO_BALLOON_S_MEMTOT: "total_memory",  # bytes
    VIRTIO_BALLOON_S_AVAIL: "available_memory",  # bytes
    VIRTIO_BALLOON_S_CACHES: "disk_caches",  # bytes
    VIRTIO_BALLOON_S_HTLB_PGALLOC: "htlb_pgalloc",
    VIRTIO_BALLOON_S_HTLB_PGFAIL: "htlb_pgfail",
}
MAX_STATS = 64  # entries decoded from one buffer; Linux sends 10 (more tags may come, not 64)

_CONFIG = struct.Struct("<II")  # 5.5.4: le32 num_pages, le32 actual
_ACTUAL = 4  # offset of `actual`, the only field the driver writes
_PFN = struct.Struct("<I")
_STAT = struct.Struct("<HQ")  # 5.5.6.3: struct virtio_balloon_stat, packed (10 bytes)
_READ_CHUNK = 4096  # bytes of frame numbers copied out at a time


class BalloonDevice(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    max_queues = 3

    def __init__(self, *, deflate_on_oom: bool = False) -> None:
        super().__init__()
        self.deflate_on_oom = deflate_on_oom
        self.target_pages = 0  # num_pages: how many pages the host wants in the balloon
        self.actual_pages = 0  # actual: how many the guest says it holds
        self.inflated = self.deflated = 0  # pages, as the guest reported them on the queues
        self.bad_pfns = 0  # frame numbers outside guest memory
        self.discard_errors = 0  # host refused to free (e.g. 4 KiB holes in huge pages)
        self.bad_config_writes = 0
        self.stats_time: float | None = None  # time.monotonic() of the last stats buffer
        self._stats: dict[str, int] = {}
        self._stats_head: int | None = None  # the stats chain the device holds (5.5.6.3)

    def device_features(self) -> int:
        f = bit(VIRTIO_BALLOON_F_STATS_VQ)
        return f | bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) if self.deflate_on_oom else f

    def config(self) -> bytes:
        return _CONFIG.pack(self.target_pages, self.actual_pages)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver updates `actual` (5.5.6); writes anywhere else are ignored and counted."""
        if offset < _ACTUAL or offset + len(data) > _CONFIG.size:
            self.bad_config_writes += 1
            return
        space = bytearray(self.config())
        space[offset : offset + len(data)] = data
        self.actual_pages = _CONFIG.unpack(space)[1]

    # -- host side ------------------------------------------------------------------------------
    def set_target(self, pages: int) -> None:
        """Ask the guest to hold `pages` 4 KiB pages in its balloon (0 gives everything back)."""
        if not 0 <= pages <= 0xFFFFFFFF:
            raise ValueError(f"balloon target {pages} is not a le32 page count")
        self.target_pages = pages
        if self.transport is not None:
            self.transport.config_changed()

    def request_stats(self) -> bool:
        """Give the stats buffer back so the guest refills it; the numbers arrive later, by a kick.

        False when the device holds no buffer (no stats queue, or a request is already out).
        """
        t = self.transport
        q = t.queue(STATSQ) if t is not None and self.acked_features & bit(VIRTIO_BALLOON_F_STATS_VQ) else None
        if t is None or q is None or self._stats_head is None:
            return False
        q.push(self._stats_head, 0)
        self._stats_head = None
        t.interrupt(STATSQ)
        return True

    def stats(self) -> dict[str, int]:
        """The statistics the guest last reported, by name (see STAT_NAMES)."""
        return dict(self._stats)

    # -- queues ---------------------------------------------------------------------------------
    def drain(self, queue_index: int, queue: SplitQueue) -> None:
        if queue_index != STATSQ:
            super().drain(queue_index, queue)
            return
        chains = 0
        while True:  # keep the buffer: it goes back only when the host asks (request_stats)
            while (chain := queue.pop()) is not None:
                self._decode_stats(chain)
                if self._stats_head is not None:  # the guest re-added one we still held
                    queue.push(self._stats_head, 0)
                self._stats_head = chain.head
                chains += 1
                if self.over_budget(queue_index, chains):
                    return
            if not queue.enable_kicks():
                return

    def handle(self, queue_index: int, chain: Chain) -> int:
        pfns = _frames(chain)
        if queue_index == INFLATEQ:
            start = count = 0
            for pfn in pfns:  # one discard per run of consecutive frames
                if count and pfn == start + count:
                    count += 1
                    continue
                if count:
                    self._discard(start, count)
                start, count = pfn, 1
            if count:
                self._discard(start, count)
        else:
            self.deflated += chain.readable_len // _PFN.size
        return 0

    def _discard(self, pfn: int, count: int) -> None:
        if self.transport is None:
            return
        try:
            self.transport.discard_memory(pfn << VIRTIO_BALLOON_PFN_SHIFT, count << VIRTIO_BALLOON_PFN_SHIFT)
        except GuestMemoryError:
            if count == 1:
                self.bad_pfns += 1
            else:  # part of the run is outside, or it spans two regions: page by page
                for p in range(pfn, pfn + count):
                    self._discard(p, 1)
            return
        except OSError as e:
            self.discard_errors += count
            log.warning("balloon: cannot free guest pages %#x+%d: %s", pfn, count, e)
        self.inflated += count

    def _decode_stats(self, chain: Chain) -> None:
        if chain.writable or chain.readable_len % _STAT.size:
            raise VirtqueueError(f"stats buffer {chain.head} is not an array of virtio_balloon_stat")
        raw = chain.read(0, min(chain.readable_len, MAX_STATS * _STAT.size))
        stats = {STAT_NAMES[t]: v for t, v in _STAT.iter_unpack(raw) if t in STAT_NAMES}  # 5.5.6.3.2
        self._stats, self.stats_time = stats, time.monotonic()

    # -- saved state ------------------------------------------------------------------------------
    state_fields = ("deflate_on_oom", "target_pages", "actual_pages", "inflated", "deflated", "bad_pfns",
                    "stats_head")  # fmt: skip

    def save_device(self) -> dict[str, Any]:
        return {"deflate_on_oom": self.deflate_on_oom, "target_pages": self.target_pages,
                "actual_pages": self.actual_pages, "inflated": self.inflated, "deflated": self.deflated,
                "bad_pfns": self.bad_pfns, "stats_head": self._stats_head}  # fmt: skip

    def restore_device(self, state: dict[str, Any]) -> Callable[[], None]:
        what = "balloon"
        same(state, "deflate_on_oom", what, self.deflate_on_oom)
        counts = {k: integer(state, k, what, 0, 0xFFFFFFFF) for k in ("target_pages", "actual_pages")}
        counts |= {k: integer(state, k, what, 0, (1 << 64) - 1) for k in ("inflated", "deflated", "bad_pfns")}
        # the stats buffer held: a descriptor index, pushed back into the restored queue later
        head = None if state["stats_head"] is None else integer(state, "stats_head", what, 0, VIRTQ_MAX_SIZE - 1)

        def apply() -> None:
            for key, value in counts.items():
                setattr(self, key, value)
            self._stats_head = head

        return apply

    def forget_driver(self) -> None:
        """The driver is gone (reset, or a disconnect before a reboot): its count and buffer too.

        A held stats head pushed into the next guest's ring would be a used id it never made.
        """
        self.actual_pages = 0
        self._stats_head = None
        self._stats, self.stats_time = {}, None



def _frames(chain: Chain) -> Iterator[int]:
    """The le32 frame numbers of an inflate or deflate buffer (5.5.6), copied out a page at a time."""
    length = chain.readable_len
    if chain.writable or length % _PFN.size:
        raise VirtqueueError(f"balloon buffer {chain.head} is not an array of le32 frame numbers")
    chunks = (chain.read(off, min(_READ_CHUNK, length - off)) for off in range(0, length, _READ_CHUNK))
    return (pfn for raw in chunks for (pfn,) in _PFN.iter_unpack(raw))
