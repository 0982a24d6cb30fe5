"""Engines: how a domain's CPU and memory are provided.

`base` is the interface the domain layer uses; each engine implements it in a package of its own:
`uml` (PV domains: User-Mode Linux) and `qemu` (HVM and PVH domains: QEMU, KVM or TCG).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimvisor.engines.base import Engine, EngineError, EngineEvent, Identity, Instance, Unsupported

if TYPE_CHECKING:
    from slimvisor.model.spec import DomainSpec

__all__ = ["Engine", "EngineError", "EngineEvent", "Identity", "Instance", "Unsupported", "engine_for"]


def engine_for(spec: DomainSpec) -> Engine:
    """The engine for `spec.type` (after `resolve_type`)."""
    if spec.type == "pv":
        from slimvisor.engines.uml import UML

        return UML
    from slimvisor.engines.qemu import HVM, PVH

    return PVH if spec.type == "pvh" else HVM


def resolve_type(spec: DomainSpec) -> str | None:
    """A PV domain whose kernel is an ordinary x86 kernel, not linux.uml, runs as PVH (through the
    kernel's PVH note), as Xen's pvshim runs PV guests inside PVH containers; without the note, as
    HVM with direct kernel boot. Sets `spec.type`; returns the warning that says so, or None."""
    from slimvisor.engines.uml import is_uml_kernel

    if spec.type != "pv" or not spec.kernel or is_uml_kernel(spec.kernel):
        return None
    from slimvisor.engines.qemu.engine import kernel_cache
    from slimvisor.engines.qemu.kernel import KernelError, inspect

    try:
        info = inspect(spec.kernel, kernel_cache())
    except KernelError:
        return None  # not a kernel at all: the PV engine's check says so
    if info.pvh_entry is None and info.kind != "bzImage":
        return None  # an ELF without the note (a program, not a kernel we can boot): the PV engine says so
    spec.type = "pvh" if info.pvh_entry is not None else "hvm"
    how = "PVH, through its Xen PVH entry" if spec.type == "pvh" else "HVM with direct kernel boot (it has no PVH note)"
    return f"kernel {spec.kernel} is not User-Mode Linux: this PV domain runs as {how}, as Xen's pvshim would"
