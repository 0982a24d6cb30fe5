"""Virtio device models, one file per device type, each plain Python over guest memory."""
