"""What kind of x86 kernel a file is, read in Python: an ELF vmlinux, or a bzImage and the ELF inside it.

A PVH domain boots a kernel through its Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (the seed thread's
"launch environment chosen by an ELF note"); QEMU finds that note only in an ELF file, so a
bzImage's payload is extracted (Documentation/arch/x86/boot.rst: setup header fields
payload_offset/payload_length) and decompressed with the format its magic names.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import lzma
import os
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from slimvisor.runtime.errors import SlimvisorError

# Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header".
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE  # 0xAA55
HEADER = 0x202  # "HdrS"
VERSION = 0x206
PAYLOAD_OFFSET = 0x248  # protocol 2.08+, from the start of the protected-mode code
PAYLOAD_LENGTH = 0x24C
MIN_PAYLOAD_VERSION = 0x0208

# include/xen/interface/elfnote.h
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4
ELF_MAGIC = b"\x7fELF"
MAX_KERNEL = 512 << 20  # a decompressed kernel bigger than this is not one we boot

# Magics of the compressors the kernel supports (lib/decompress.c); lz4 and zstd through their programs.
_GZIP, _XZ, _LZMA, _BZIP2 = b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x5d\x00\x00", b"BZh"
_LZ4_LEGACY, _ZSTD = b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd"


class KernelError(SlimvisorError, ValueError):
    """The file is not a kernel this engine can boot the way asked; the message says why."""


@dataclass(frozen=True)
class KernelInfo:
    path: str
    kind: str  # "bzImage" or "elf"
    pvh_entry: int | None  # XEN_ELFNOTE_PHYS32_ENTRY, when the kernel has one


def _u(data: bytes, offset: int, fmt: str) -> int:
    return int(struct.unpack_from(fmt, data, offset)[0])


def bzimage_payload(data: bytes) -> bytes | None:
    """The compressed vmlinux inside a bzImage, or None when `data` is not a bzImage."""
    if len(data) < 0x250 or data[HEADER : HEADER + 4] != b"HdrS" or _u(data, BOOT_FLAG, "<H") != 0xAA55:
        return None
    if _u(data, VERSION, "<H") < MIN_PAYLOAD_VERSION:
        raise KernelError("bzImage boot protocol older than 2.08 has no payload fields")
    setup = (data[SETUP_SECTS] or 4) + 1
    start = setup * 512 + _u(data, PAYLOAD_OFFSET, "<I")
    end = start + _u(data, PAYLOAD_LENGTH, "<I")
    if not setup * 512 < start < end <= len(data):
        raise KernelError("bzImage payload lies outside the file")
    return data[start:end]


def decompress(payload: bytes) -> bytes:
    """A kernel payload in any format Linux builds it with; trailing bytes (its appended size) ignored."""
    if payload.startswith(_GZIP):
        return zlib.decompressobj(wbits=31).decompress(payload, MAX_KERNEL)
    if payload.startswith(_XZ) or payload.startswith(_LZMA):
        fmt = lzma.FORMAT_XZ if payload.startswith(_XZ) else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress(payload, MAX_KERNEL)
    if payload.startswith(_BZIP2):
        return bz2.BZ2Decompressor().decompress(payload, MAX_KERNEL)
    for magic, program in ((_LZ4_LEGACY, "lz4"), (_ZSTD, "zstd")):
        if payload.startswith(magic):
            return _program(program, payload)
    raise KernelError(f"bzImage payload compressed with an unknown format (magic {payload[:4].hex()})")


def _program(name: str, payload: bytes) -> bytes:
    try:
        r = subprocess.run([name, "-dc"], input=payload, capture_output=True, check=False)
    except FileNotFoundError:
        raise KernelError(
            f"the kernel is {name}-compressed and {name} is not installed (Debian: apt-get install {name})"
        ) from None
    if not r.stdout.startswith(ELF_MAGIC):  # zstd and lz4 complain about the appended size, yet decode
        raise KernelError(
            f"{name} -dc could not decompress the bzImage payload: {r.stderr.decode(errors='replace').strip()}"
        )
    return r.stdout


def elf_notes(elf: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every note in an ELF64 little-endian file's PT_NOTE segments."""
    if elf[:4] != ELF_MAGIC or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        raise KernelError("not a 64-bit little-endian ELF file")
    phoff, phentsize, phnum = _u(elf, 0x20, "<Q"), _u(elf, 0x36, "<H"), _u(elf, 0x38, "<H")
    notes = []
    for i in range(phnum):
        ph = phoff + i * phentsize
        if ph + 56 > len(elf) or _u(elf, ph, "<I") != PT_NOTE:
            continue
        offset, size = _u(elf, ph + 8, "<Q"), _u(elf, ph + 32, "<Q")
        pos, end = offset, min(offset + size, len(elf))
        while pos + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, pos)
            name_at = pos + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            nxt = desc_at + (descsz + 3) // 4 * 4
            if nxt > end:
                break
            notes.append((elf[name_at : name_at + namesz].rstrip(b"\0"), kind, elf[desc_at : desc_at + descsz]))
            pos = nxt
    return notes


def pvh_entry(elf: bytes) -> int | None:
    for name, kind, desc in elf_notes(elf):
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little")
    return None


def vmlinux(data: bytes) -> bytes:
    """The ELF kernel in `data` (itself, or the payload of a bzImage)."""
    if data.startswith(ELF_MAGIC):
        return data
    payload = bzimage_payload(data)
    if payload is None:
        raise KernelError("neither an ELF vmlinux nor a bzImage")
    elf = decompress(payload)
    if not elf.startswith(ELF_MAGIC):
        raise KernelError("the bzImage payload is not an ELF kernel")
    return elf


def inspect(path: str, cache: Path | None = None) -> KernelInfo:
    """What the kernel at `path` is; raises KernelError when it is no x86 kernel. With `cache`, a
    bzImage's vmlinux is extracted there once (`extracted`), and the answer is kept per file."""
    if cache is not None:
        return _examined(path, cache)[0]
    data = _read(path)
    if data.startswith(ELF_MAGIC):
        return KernelInfo(path, "elf", pvh_entry(data))
    return KernelInfo(path, "bzImage", pvh_entry(vmlinux(data)))


def is_bzimage(path: str) -> bool:
    """Only the setup header (its magic and boot flag): an HVM domain's direct boot needs no more."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER + 4)
    except OSError:
        return False
    return len(head) == HEADER + 4 and head[HEADER:] == b"HdrS" and _u(head, BOOT_FLAG, "<H") == 0xAA55


def extracted(data: bytes, cache: Path) -> Path:
    """The ELF vmlinux of bzImage `data`, kept in `cache` under the bzImage's hash: many domains
    from one kernel extract it once, and a replaced kernel is a new file."""
    out = cache / f"{hashlib.sha256(data).hexdigest()[:24]}.vmlinux"
    if out.is_file():
        return out
    elf = vmlinux(data)
    cache.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".vmlinux.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(elf)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # whole or not at all: a concurrent create reads either file
    except BaseException:
        os.unlink(tmp)
        raise
    return out


NO_PVH_NOTE = "has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y"


def pvh_kernel(path: str, cache: Path) -> Path:
    """An ELF file with the PVH note for `path`: the file itself, or its extracted vmlinux."""
    info, elf = _examined(path, cache)
    if info.pvh_entry is None:
        raise KernelError(NO_PVH_NOTE)
    return elf


def _examined(path: str, cache: Path) -> tuple[KernelInfo, Path]:
    """`path` read once per (path, size, mtime, inode), as engines.uml.is_uml_kernel: the daemon's
    resolve and check and the supervisor it forks to start the domain share one reading."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise KernelError(e.strerror or str(e)) from None
    found = _examine(path, st.st_size, st.st_mtime_ns, st.st_ino, cache)
    if not found[1].is_file():  # the extracted copy was removed from the cache meanwhile
        _examine.cache_clear()
        found = _examine(path, st.st_size, st.st_mtime_ns, st.st_ino, cache)
    return found


@functools.lru_cache(maxsize=16)
def _examine(path: str, size: int, mtime_ns: int, inode: int, cache: Path) -> tuple[KernelInfo, Path]:
    data = _read(path)
    if data.startswith(ELF_MAGIC):
        return KernelInfo(path, "elf", pvh_entry(data)), Path(path)
    elf = extracted(data, cache)
    return KernelInfo(path, "bzImage", pvh_entry(elf.read_bytes())), elf


def _read(path: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_KERNEL:
            raise KernelError(f"{size} bytes: larger than any kernel")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KernelError(e.strerror or str(e)) from None
