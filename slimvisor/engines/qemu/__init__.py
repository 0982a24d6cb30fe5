"""The HVM and PVH engine: unmodified x86 kernels in QEMU, the device model as in Xen.

QEMU provides CPU and memory (KVM where the host has VMX/SVM, TCG elsewhere: `accel`), its
machine (q35 with SeaBIOS for HVM, microvm entered at the kernel's PVH note for PVH: `kernel`),
a serial console, pvpanic and the balloon; every other device is slimvisor's own vhost-user
backend, the same as PV domains use. The supervisor drives it over QMP (`qmp`).
"""

from slimvisor.engines.qemu.engine import HVM, PVH, QemuEngine

__all__ = ["HVM", "PVH", "QemuEngine"]
