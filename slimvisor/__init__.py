"""slimvisor: Xen's dom0 on plain Linux, written in Python."""

__version__ = "0.1.0"
