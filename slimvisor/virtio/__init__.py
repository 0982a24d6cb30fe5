"""Virtio: the split virtqueue and the device model, as plain Python over guest memory (no I/O).

`queue.SplitQueue` is the device side of a split virtqueue; `device.VirtioDevice` what every
device is to a transport; `state` reads saved device and queue state back (untrusted input).
"""

from slimvisor.virtio.device import Transport, VirtioDevice
from slimvisor.virtio.queue import Chain, SplitQueue, VirtqueueError
from slimvisor.virtio.state import StateError

__all__ = ["Chain", "SplitQueue", "StateError", "Transport", "VirtioDevice", "VirtqueueError"]
