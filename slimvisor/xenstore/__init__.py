"""Xenstore: Xen's configuration database and its wire protocol, served over a Unix socket."""

# The vsock port a guest reaches its xenstore on (host CID 2). With Firecracker-style vsock the
# toolstack serves it on the Unix socket f"{uds}_{XENSTORE_VSOCK_PORT}" (`XenstoreServer.listen_domain`);
# the busybox guest bridges /run/xenstored/socket to it when booted with sv.xenstore=PORT.
# 0x5853 is "XS" in ASCII: clear of well-known ports and of the ports tests pick.
XENSTORE_VSOCK_PORT = 0x5853  # 22611
