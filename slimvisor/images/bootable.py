"""A partitioned raw disk that boots under SeaBIOS, built without a mount or a loop device.

Layout: an MBR partition table (sfdisk on the image file) with one bootable Linux partition from
1 MiB; GRUB's boot.img in the MBR's code area and its core.img (grub-mkimage for i386-pc, with the
modules to read ext4 and boot Linux built in, and its prefix pointing into the partition) in the
gap before it; the partition an ext4 filesystem made by `mkfs.ext4 -d TREE -E offset=` holding the
root tree, /boot/vmlinuz, /boot/initrd.img and /boot/grub/grub.cfg. What grub-install's setup step
would patch is patched here (grub-core/boot/i386/pc/boot.S and diskboot.S).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from slimvisor.images.tools import run_tool
from slimvisor.runtime.errors import SlimvisorError

GRUB_I386_PC = Path("/usr/lib/grub/i386-pc")
SECTOR = 512
PART_START = 2048  # sectors: the partition starts at 1 MiB; core.img lives in sectors 1..2047
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "configfile", "search", "echo", "test", "gzio")
# grub-core/boot/i386/pc/boot.S: the LBA of core.img's first sector (GRUB_BOOT_MACHINE_KERNEL_SECTOR);
# the MBR's code area ends where the disk signature and the partition table begin.
BOOT_KERNEL_SECTOR = 0x5C
MBR_CODE = 440
# grub-core/boot/i386/pc/diskboot.S: the first blocklist entry at the end of core.img's first
# sector: start LBA (u64), sector count (u16), load segment (u16).
DISKBOOT_BLOCKLIST = SECTOR - 12


class BootableError(SlimvisorError, RuntimeError):
    """The bootable disk could not be built; the message says which step."""


def grub_cfg(cmdline: str, kernel: str, initrd: str) -> str:
    return f"""set timeout=0
set default=0
menuentry "slimvisor guest" {{
    linux /boot/{kernel} {cmdline}
    initrd /boot/{initrd}
}}
"""


def build_disk(out: Path, tree: Path, size_mib: int, cmdline: str, kernel: str = "vmlinuz",
               initrd: str = "initrd.img") -> None:  # fmt: skip
    """Write the bootable disk to `out` from `tree` (which holds boot/KERNEL and boot/INITRD)."""
    if not (GRUB_I386_PC / "boot.img").is_file():
        raise BootableError(f"no {GRUB_I386_PC}/boot.img: apt-get install grub-pc-bin")
    for name in (kernel, initrd):
        if not (tree / "boot" / name).is_file():
            raise BootableError(f"the root tree has no boot/{name}")
    (tree / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    (tree / "boot" / "grub" / "grub.cfg").write_text(grub_cfg(cmdline, kernel, initrd))
    with open(out, "wb") as f:
        f.truncate(size_mib << 20)
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(out)],
         f"label: dos\nstart={PART_START}, type=83, bootable\n")  # fmt: skip
    part_kib = ((size_mib << 20) - PART_START * SECTOR) >> 10
    _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tree), "-E", f"offset={PART_START * SECTOR}", str(out),
          f"{part_kib}k"])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slimvisor-grub-") as tmp:
        core_path = Path(tmp) / "core.img"
        _run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_I386_PC), "-o", str(core_path),
              "-p", "(hd0,msdos1)/boot/grub", *GRUB_MODULES])  # fmt: skip
        core = bytearray(core_path.read_bytes())
    sectors = -(-len(core) // SECTOR)
    if sectors >= PART_START:
        raise BootableError(f"GRUB's core.img ({len(core)} bytes) does not fit before the partition")
    struct.pack_into("<QHH", core, DISKBOOT_BLOCKLIST, 2, sectors - 1, 0x820)  # the rest follows sector 1
    boot = bytearray((GRUB_I386_PC / "boot.img").read_bytes()[:MBR_CODE])
    struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, 1)
    with open(out, "r+b") as f:
        f.write(boot)  # the code area only: sfdisk's table and signature stay
        f.seek(SECTOR)
        f.write(core)


def _run(argv: list[str], stdin: str | None = None) -> None:
    run_tool(argv, BootableError, stdin=stdin)
