"""A Debian root filesystem: mmdebstrap into a folder, then mkfs.ext4 -d (no mounts).

Plain: an ext4 image for PV domains (and HVM/PVH ones booted with a kernel), root on /dev/vda.
`bootable`: a partitioned raw disk with Debian's cloud kernel and GRUB in the MBR
(slimvisor.images.bootable), for HVM domains without a kernel: SeaBIOS boots it like a PC.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# Boots under slimvisor's initramfs (root=/dev/vda): systemd as init, root logs in on the console.
PACKAGES = ["systemd-sysv", "udev", "iproute2", "iputils-ping", "procps", "kmod"]
HOOKS = [
    'echo slimvisor > "$1/etc/hostname"',
    'echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$1/etc/fstab"',
    'chroot "$1" passwd -d root',
    'mkdir -p "$1/etc/systemd/system/console-getty.service.d"',
    'printf "[Service]\\nExecStart=\\nExecStart=-/sbin/agetty --autologin root --noclear'
    ' --keep-baud console 115200,38400,9600 \\$TERM\\n"'
    ' > "$1/etc/systemd/system/console-getty.service.d/autologin.conf"',
    # UML's con0 is the console; its other lines are null: one autologin getty, on the console.
    'chroot "$1" systemctl mask getty@.service serial-getty@.service',
    'chroot "$1" systemctl enable console-getty.service',
]


BOOT_PACKAGES = ["linux-image-cloud-amd64", "initramfs-tools"]
BOOT_CMDLINE = "root=/dev/vda1 ro console=ttyS0"


def build(output: Path, size_mib: int = 1024, suite: str = "bookworm", bootable: bool = False) -> None:
    """`slimvisor image debian OUT [--bootable]`, with a live progress line; atomic (OUT appears
    whole or not)."""
    from rich.console import Console

    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    console = Console(stderr=True)
    part = output.with_name(output.name + ".part")
    with tempfile.TemporaryDirectory(prefix="slimvisor-debian-") as tmp:
        root = Path(tmp) / "root"
        packages = PACKAGES + (BOOT_PACKAGES if bootable else [])
        root_dev = "/dev/vda1" if bootable else "/dev/vda"
        hooks = [h.replace("/dev/vda ", f"{root_dev} ") for h in HOOKS]
        argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", "--verbose"]
        argv += [f"--customize-hook={h}" for h in hooks] + [suite, str(root)]
        start = time.monotonic()
        with console.status(f"mmdebstrap {suite} (minbase)") as status:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            lines: list[str] = []
            for line in proc.stdout:
                lines = [*lines[-30:], line.rstrip()]
                status.update(f"[{time.monotonic() - start:5.1f}s] {line.strip()[:100]}")
            if proc.wait() != 0:
                raise RuntimeError("mmdebstrap failed:\n" + "\n".join(lines))
            if bootable:
                status.update("partition, mkfs.ext4 -d, GRUB")
                _bootable(root, part, size_mib)
                os.replace(part, output)
                console.print(f"built {output} in {time.monotonic() - start:.1f}s")
                return
            status.update("mkfs.ext4 -d")
            try:
                with open(part, "wb") as f:
                    f.truncate(size_mib << 20)
                r = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "debian", "-d", str(root), str(part)],
                                   capture_output=True, text=True)  # fmt: skip
                if r.returncode != 0:
                    raise RuntimeError(f"mkfs.ext4 failed: {r.stderr.strip()}")
                os.replace(part, output)
            finally:
                part.unlink(missing_ok=True)
    console.print(f"built {output} in {time.monotonic() - start:.1f}s")


def _bootable(root: Path, out: Path, size_mib: int) -> None:
    """The tree as a disk SeaBIOS boots: GRUB in the MBR (slimvisor.images.bootable) booting its
    newest kernel and initramfs by their own names (pygrub-style boot reads them without links)."""
    from slimvisor.images.bootable import build_disk

    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError("the Debian tree has no /boot/vmlinuz-* and /boot/initrd.img-*")
    try:
        build_disk(out, root, size_mib, BOOT_CMDLINE, kernels[-1].name, initrds[-1].name)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def fingerprint() -> str:
    """Changes when what a Debian image is built from changes (a cache key for tests)."""
    import hashlib

    from slimvisor.images.bootable import GRUB_MODULES, grub_cfg

    return hashlib.sha256(repr((PACKAGES, BOOT_PACKAGES, HOOKS, BOOT_CMDLINE, GRUB_MODULES,
                                grub_cfg("", "", ""))).encode()).hexdigest()[:16]  # fmt: skip
