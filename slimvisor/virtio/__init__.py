"""Virtio: the split virtqueue and the device model, as plain Python over guest memory (no I/O)."""
