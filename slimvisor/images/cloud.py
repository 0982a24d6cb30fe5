"""Debian's cloud kernel (linux-image-cloud-amd64) for HVM and PVH domains, with slimvisor's boot
initramfs built for it: `slimvisor image cloud DIR` writes DIR/vmlinuz and DIR/initrd.cpio.gz.

It is the kernel Debian builds for VMs (CONFIG_PVH=y, virtio as modules); the initramfs is the
one PV domains boot with (slimvisor.images.busybox: load virtio modules, switch to root=), with
this kernel's modules, so the same busybox rootfs.ext4 boots under every engine. The kernel is
fetched with Debian's own clients (`apt-cache`, `apt-get download`, `dpkg-deb`); modules.dep
comes from the host's depmod (kmod).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from slimvisor.images import busybox, tools
from slimvisor.runtime.errors import SlimvisorError

META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
HOST_BUSYBOX = Path("/bin/busybox")
# What an HVM/PVH guest loads at boot: PV domains' virtio drivers, the PCI transport they sit on,
# virtio-rng, pvpanic (a guest panic reaches QEMU: a crash) and the ACPI power button with the
# evdev device busybox acpid reads it from (shutdown).
GUEST_MODULES = ("virtio_pci", *busybox.GUEST_MODULES, "virtio_rng", "pvpanic_pci", "pvpanic_mmio", "button", "evdev")


class CloudKernelError(SlimvisorError, RuntimeError):
    """The cloud kernel or its initramfs could not be fetched or built."""


def build(outdir: Path) -> tuple[Path, Path]:
    """DIR/vmlinuz and DIR/initrd.cpio.gz, each written whole (renamed into place)."""
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cloud-work.", dir=outdir) as tmp:
        work = Path(tmp)
        package, _, moddir, vmlinuz = unpack_kernel(work)
        try:
            busybox.build_initramfs(work / "initrd.cpio.gz", moddir, GUEST_MODULES)
        except FileNotFoundError as e:
            raise CloudKernelError(f"{package}: {e}") from None
        shutil.copyfile(vmlinuz, work / "vmlinuz")
        for name in ("vmlinuz", "initrd.cpio.gz"):
            os.replace(work / name, outdir / name)
    return outdir / "vmlinuz", outdir / "initrd.cpio.gz"


def unpack_kernel(work: Path) -> tuple[str, Path, Path, Path]:
    """The cloud kernel package downloaded and unpacked in `work`: (package, .deb, its module
    directory with a modules.dep, its vmlinuz)."""
    package, deb = download_kernel(work)
    tree = work / "tree"
    run_tool(["dpkg-deb", "-x", str(deb), str(tree)])
    moddir = module_dir(tree)
    vmlinuz = tree / "boot" / f"vmlinuz-{moddir.name}"
    if not vmlinuz.is_file():
        raise CloudKernelError(f"{deb.name} has no boot/{vmlinuz.name}")
    return package, deb, moddir, vmlinuz


def fingerprint() -> str:
    """Changes when what the initramfs is made of changes (the cache key; the kernel is Debian's newest)."""
    return hashlib.sha256(repr((busybox.INITRAMFS_INIT, GUEST_MODULES)).encode()).hexdigest()[:16]


# -- host tools and Debian packages ----------------------------------------------------------------
def run_tool(argv: list[str], cwd: Path | None = None) -> str:
    """argv's stdout; any failure, a missing program included, as a CloudKernelError."""
    return tools.run_tool(argv, CloudKernelError, cwd)


def static_busybox() -> Path:
    """The host's busybox, if it is busybox-static's: a dynamic one finds no libc in the initramfs."""
    with contextlib.suppress(CloudKernelError):
        status = run_tool(["dpkg-query", "-W", "-f=${Status}", BUSYBOX_PACKAGE])
        if status.endswith(" installed") and HOST_BUSYBOX.is_file():
            return HOST_BUSYBOX
    raise CloudKernelError(f"no static {HOST_BUSYBOX}: install the Debian package {BUSYBOX_PACKAGE}")


def resolve_kernel_package() -> str:
    """The versioned image package `linux-image-cloud-amd64` depends on (from the local lists)."""
    for line in run_tool(["apt-cache", "depends", META_PACKAGE]).splitlines():
        kind, _, name = line.strip().partition(":")
        name = name.strip().strip("<>")
        if kind.lstrip("|") in ("Depends", "PreDepends") and name.startswith("linux-image-"):
            return name
    raise CloudKernelError(f"apt-cache depends {META_PACKAGE} names no linux-image package")


def download_kernel(dest: Path) -> tuple[str, Path]:
    """(package, .deb) of the cloud kernel, `apt-get download`ed into dest.

    When that fails (no package lists yet, or lists so old the mirror dropped that version),
    `apt-get update` once and resolve again: after an update the name itself may have changed.
    """
    try:
        return _download(resolve_kernel_package(), dest)
    except CloudKernelError as first:
        try:
            run_tool(["apt-get", "update"])
        except CloudKernelError as e:
            raise CloudKernelError(f"{first}; and then {e}") from e
        return _download(resolve_kernel_package(), dest)


def _download(package: str, dest: Path) -> tuple[str, Path]:
    """(package, .deb) after `apt-get download package` in dest."""
    run_tool(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise CloudKernelError(f"apt-get download {package} left no {package}_*.deb")
    return package, debs[-1]


# -- kernel modules --------------------------------------------------------------------------------
def _depmod() -> str:
    """depmod, also from the sbin directories a non-root PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    depmod = shutil.which("depmod", path=path)
    if depmod is None:
        raise CloudKernelError("depmod is not installed: install the Debian package kmod")
    return depmod


def module_dir(tree: Path) -> Path:
    """The package's lib/modules/KVER (under usr/ when merged), given a modules.dep by depmod.

    The package ships no modules.dep (its postinst runs depmod), so write one with `depmod -b`.
    """
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        versions = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        if versions:
            run_tool([_depmod(), "-b", str(base.parent.parent), versions[-1].name])
            return versions[-1]
    raise CloudKernelError(f"no lib/modules/<version> in {tree}")


