"""What a spec needs of the host, checked just before a domain starts (the model checks only form).

Every error names the offending file and says what is wrong, so a missing image or a foreign
kernel fails before a single process, socket or file exists.
"""

from __future__ import annotations

import os
import stat

from slimvisor.engines import engine_for, resolve_type
from slimvisor.model.spec import DiskSpec, DomainSpec, SpecError, check_name


def check_disk(disk: DiskSpec, locked_ok: bool = False) -> None:
    """The image (a file, or a block device: xl's phy:) exists, opens as asked (nobody else holds a
    conflicting lock on it, unless `locked_ok`: a migration's source does), and (an overlay, a qcow2)
    has a sound header; every problem it has is named."""
    try:
        mode = os.stat(disk.path).st_mode
    except OSError:
        raise SpecError(f"disk {disk.path}: no such file or block device") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise SpecError(f"disk {disk.path}: neither a file nor a block device")
    if not os.access(disk.path, os.R_OK if disk.readonly else os.R_OK | os.W_OK):
        mode_text = "reading" if disk.readonly else "reading and writing"
        raise SpecError(f"disk {disk.path}: cannot open for {mode_text}")
    if disk.backend == "qsd":
        from slimvisor.domain.qsd import check_image

        check_image(disk)
        return
    from slimvisor.storage import OverlayError, probe_disk

    try:  # an overlay's header and base, and anyone's lock on the image, before anything starts; the backend
        size = probe_disk(disk.path, disk.format, readonly=disk.readonly, locked_ok=locked_ok)  # opens it once
    except (OverlayError, OSError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SpecError(f"disk {disk.path}: {detail.removeprefix(disk.path + ': ')}") from None
    if size < 512:
        raise SpecError(f"disk {disk.path}: smaller than one 512-byte sector")


def check_spec(spec: DomainSpec, locked_ok: bool = False) -> list[str]:
    """Everything a domain needs of the host: its name, its engine's kernel, initrd and disks
    (`locked_ok`: held by a migration's source). Returns warnings (a PV config with an ordinary
    kernel runs as PVH: `resolve_type`)."""
    check_name(spec.name)
    warnings = [w for w in [resolve_type(spec)] if w]
    engine_for(spec).check(spec)
    if spec.initrd is not None and not os.path.isfile(spec.initrd):
        raise SpecError(f"initrd {spec.initrd}: no such file")
    for disk in spec.disks:
        check_disk(disk, locked_ok)
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
    root on the first disk unless said otherwise, and the disks' xl.cfg names (vdev) for the guest;
    returns the initrd to boot, dom0's own boot initrd when a PV domain boots from a disk without one."""
    if spec.disks and spec.root is None and "root=" not in spec.cmdline and spec.kernel:
        spec.root = "/dev/vda"
    vdevs = [d.vdev for d in spec.disks]
    plain = [f"vd{chr(ord('a') + i)}" for i in range(len(vdevs))]
    if all(vdevs) and vdevs != plain and "sv.vdevs=" not in spec.cmdline:
        spec.cmdline = f"{spec.cmdline} sv.vdevs={','.join(vdevs)}".strip()  # the boot initramfs maps Xen's names
    if spec.initrd is None and spec.disks and spec.type == "pv":  # dom0's initrd has UML's modules
        from slimvisor.images.cache import boot_initrd

        return str(boot_initrd())
    return spec.initrd
