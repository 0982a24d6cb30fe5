"""What a spec needs of the host, checked just before a domain starts (the model checks only form).

Every error names the offending file and says what is wrong, so a missing image or a foreign
kernel fails before a single process, socket or file exists.
"""

from __future__ import annotations

import os

from slimvisor.engines import engine_for, resolve_type
from slimvisor.model.spec import DiskSpec, DomainSpec, SpecError, check_name


def check_disk(disk: DiskSpec) -> None:
    """The image exists, opens as asked (nobody else holds a conflicting lock on it), and (an overlay)
    has a sound header, bitmap and base."""
    if not os.path.isfile(disk.path):
        raise SpecError(f"disk {disk.path}: no such file")
    if not os.access(disk.path, os.R_OK if disk.readonly else os.R_OK | os.W_OK):
        mode = "reading" if disk.readonly else "reading and writing"
        raise SpecError(f"disk {disk.path}: cannot open for {mode}")
    from slimvisor.storage import OverlayError, open_disk

    try:  # an overlay's header, bitmap and base, and anyone's lock on the image, before anything starts
        open_disk(disk.path, disk.format, readonly=disk.readonly).close()
    except (OverlayError, OSError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError(f"disk {disk.path}: {detail.removeprefix(disk.path + ': ')}") from None
    if os.path.getsize(disk.path) < 512:
        raise SpecError(f"disk {disk.path}: smaller than one 512-byte sector")


def check_spec(spec: DomainSpec) -> list[str]:
    """Everything a domain needs of the host: its name, its engine's kernel, initrd and disks.
    Returns warnings (a PV config with an ordinary kernel runs as PVH: `resolve_type`)."""
    check_name(spec.name)
    warnings = [w for w in [resolve_type(spec)] if w]
    engine_for(spec).check(spec)
    if spec.initrd is not None and not os.path.isfile(spec.initrd):
        raise SpecError(f"initrd {spec.initrd}: no such file")
    for disk in spec.disks:
        check_disk(disk)
    paths = [d.path for d in spec.disks]
    if len(set(paths)) != len(paths):
        raise SpecError("the same disk image is given twice")
    if len(spec.disks) > 26:
        raise SpecError(f"{len(spec.disks)} disks: at most 26 (vda..vdz)")
    if spec.initrd is None and not spec.disks:
        raise SpecError("nothing to boot: give an initrd or a root disk")
    return warnings


def fill_defaults(spec: DomainSpec) -> str | None:
    """The one place a checked spec gets its boot defaults (foreground runner and daemon alike):
    root on the first disk unless said otherwise; returns the initrd to boot, dom0's own boot
    initrd when the domain boots from a disk without one."""
    if spec.disks and spec.root is None and "root=" not in spec.cmdline and spec.kernel:
        spec.root = "/dev/vda"
    if spec.initrd is None and spec.disks and spec.type == "pv":  # dom0's initrd has UML's modules
        from slimvisor.images.cache import boot_initrd

        return str(boot_initrd())
    return spec.initrd
