"""Constants from the OASIS virtio 1.2 specification, named as the spec names them."""

# 5 Device Types: device ids
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19

# 6 Reserved Feature Bits
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# 2.7.5 The Virtqueue Descriptor Table
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_SIZE = 16  # le64 addr, le32 len, le16 flags, le16 next

# 2.7.6 The Virtqueue Available Ring
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

# 2.7.8 The Virtqueue Used Ring
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_USED_ELEM_SIZE = 8  # le32 id, le32 len

# 2.7 Split Virtqueues: Queue Size is a power of 2, at most 32768
VIRTQ_MAX_SIZE = 32768


def bit(n: int) -> int:
    return 1 << n
