"""Xenstore: Xen's configuration database and its wire protocol, served over a Unix socket."""
