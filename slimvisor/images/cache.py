"""Where built guest assets live: $SLIMVISOR_CACHE, else ~/.cache/slimvisor."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from slimvisor.images import busybox


def cache_dir() -> Path:
    base = os.environ.get("SLIMVISOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimvisor"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def busybox_assets() -> tuple[Path, Path]:
    """The cached busybox guest (initrd, rootfs), built once per set of inputs."""
    outdir = cache_dir() / f"busybox-{busybox.fingerprint()}"
    initrd, rootfs = outdir / "initrd.cpio.gz", outdir / "rootfs.ext4"
    if not (initrd.exists() and rootfs.exists()):
        busybox.build(outdir)
    return initrd, rootfs


def boot_initrd() -> Path:
    """The initramfs `slimvisor run` uses when a root disk is given without --initrd."""
    return busybox_assets()[0]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, so that concurrent callers build a cache entry once."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cloud_assets() -> tuple[Path, Path]:
    """The cached cloud kernel and its boot initramfs (vmlinuz, initrd) for HVM/PVH domains, built
    once; concurrent callers wait for the one that builds."""
    from slimvisor.images import cloud

    outdir = cache_dir() / f"cloud-{cloud.fingerprint()}"
    vmlinuz, initrd = outdir / "vmlinuz", outdir / "initrd.cpio.gz"
    with locked(cache_dir() / "cloud.lock"):
        if not (vmlinuz.exists() and initrd.exists()):
            cloud.build(outdir)
    return vmlinuz, initrd


def bootable_disk() -> Path:
    """The busybox guest as a bootable disk with the cloud kernel (cached): HVM domains without a kernel."""
    vmlinuz, initrd = cloud_assets()
    from slimvisor.images import cloud

    path = cache_dir() / f"bootable-{busybox.fingerprint()}-{cloud.fingerprint()}.img"
    if not path.exists():
        busybox.build_bootable(path, vmlinuz, initrd)
    return path
