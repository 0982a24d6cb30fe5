"""Virtio device models, one file per device type, each plain Python over guest memory.

`registry.KINDS` declares every kind once (virtio id, model, spec, xl.cfg keys, run options);
models open no sockets: their host-side edges are `vsock_unix` and `console_unix`. Models are
imported when a device is built, so this package exports only the registry.
"""

from slimvisor.devices.registry import KINDS, DeviceKind, local_factories

__all__ = ["KINDS", "DeviceKind", "local_factories"]
