"""A Debian root filesystem for PV domains: mmdebstrap into a folder, then mkfs.ext4 -d (no mounts)."""

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


def build(output: Path, size_mib: int = 1024, suite: str = "bookworm") -> None:
    """`slimvisor image debian OUT.ext4`, with a live progress line; atomic (OUT appears whole or not)."""
    from rich.console import Console

    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    console = Console(stderr=True)
    part = output.with_name(output.name + ".part")
    with tempfile.TemporaryDirectory(prefix="slimvisor-debian-") as tmp:
        root = Path(tmp) / "root"
        argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--verbose"]
        argv += [f"--customize-hook={h}" for h in HOOKS] + [suite, str(root)]
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
