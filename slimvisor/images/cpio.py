"""A newc cpio writer (the initramfs format, Linux Documentation/driver-api/early-userspace).

Written by hand so image builds need no cpio tool and never touch a mount.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

_TRAILER = "TRAILER!!!"


def _entry(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + namez
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


# The kernel opens /dev/console for init before init can mount devtmpfs (init/main.c).
CONSOLE_NODE = ("dev/console", stat.S_IFCHR | 0o600, (5, 1))


def pack_tree(root: Path, nodes: tuple[tuple[str, int, tuple[int, int]], ...] = (CONSOLE_NODE,)) -> bytes:
    """Every file, directory and symlink under `root`, plus device `nodes`, as a newc archive."""
    out, ino = [], 1
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(full).encode()
            elif stat.S_ISREG(st.st_mode):
                data = full.read_bytes()
            elif stat.S_ISDIR(st.st_mode):
                data = b""
            else:
                continue
            out.append(_entry(rel, st.st_mode, data, ino))
            ino += 1
    for name, mode, rdev in nodes:
        out.append(_entry(name, mode, b"", ino, rdev))
        ino += 1
    out.append(_entry(_TRAILER, 0, b"", 0))
    return b"".join(out)


def write_initramfs(root: Path, dest: Path) -> None:
    """gzip-compressed newc archive of `root`, written atomically to `dest`."""
    tmp = dest.with_name(dest.name + ".part")
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        f.write(pack_tree(root))
    os.replace(tmp, dest)
