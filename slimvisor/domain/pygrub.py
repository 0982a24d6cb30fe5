"""pygrub-style boot: the kernel, initramfs and command line a guest disk's GRUB would boot.

Xen's pygrub reads the guest's boot configuration in dom0 before the domain starts; so does this,
for xl.cfg's `bootloader = "pygrub"` (and a path ending in pygrub). The disk is the guest's and
hostile: its filesystem is read by e2fsprogs' debugfs (no mount), jailed as the engines are (its
own namespaces, a root with only debugfs, its libraries, the image read-only and one output
directory, no capabilities, bounded file sizes), and the configuration it yields is parsed here
with bounds on its size and its entries.

Found: GRUB 2's grub.cfg or GRUB legacy's menu.lst, on the first ext2/3/4 partition of an MBR
disk (or the whole disk) that has one, under /boot/grub or /grub (a separate /boot partition).
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimvisor.jail.spawn import Bind, JailError, JailSpec, shared_libraries, spawn
from slimvisor.model.spec import SpecError

DEBUGFS = "/usr/sbin/debugfs"
CONFIGS = ("/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub/menu.lst", "/grub/menu.lst")
MAX_CONFIG = 1 << 20  # a boot configuration larger than this is not read
MAX_FILE = 512 << 20  # a kernel or initramfs larger than this is not extracted (RLIMIT_FSIZE in the jail)
MAX_ENTRIES = 256
SECTOR = 512
# The MBR (the partition table at 446, four 16-byte entries, then 0x55AA); Linux partitions are 0x83.
MBR_TABLE, MBR_ENTRY, MBR_LINUX = 446, 16, 0x83


@dataclass(frozen=True)
class Entry:
    title: str
    kernel: str
    initrd: str | None
    args: str


@dataclass(frozen=True)
class Boot:
    kernel: Path
    initrd: Path | None
    args: str
    title: str


def partitions(head: bytes) -> list[int]:
    """Byte offsets of the Linux partitions of an MBR disk whose first sector is `head`; [0] when
    there is no partition table (a filesystem on the whole disk)."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return [0]
    out = []
    for i in range(4):
        kind = head[MBR_TABLE + i * MBR_ENTRY + 4]
        (start,) = struct.unpack_from("<I", head, MBR_TABLE + i * MBR_ENTRY + 8)
        if kind == MBR_LINUX and start:
            out.append(start * SECTOR)
    return out or [0]


def _unquote(word: str) -> str:
    try:
        parts = shlex.split(word)
    except ValueError:
        return word
    return parts[0] if parts else ""


def parse_grub2(text: str) -> tuple[list[Entry], str]:
    """The menu entries of a grub.cfg (submenus flattened, in order) and its `set default=`."""
    entries: list[Entry] = []
    default = "0"
    title: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    args = ""
    for raw in text.splitlines():
        line = raw.strip()
        if m := re.match(r"set\s+default=(\S+)", line):
            default = _unquote(m.group(1))
        elif m := re.match(r"menuentry\s+(\"[^\"]*\"|'[^']*'|\S+)", line):
            title, kernel, initrd, args = _unquote(m.group(1)), None, None, ""
        elif title is not None and (m := re.match(r"linux(?:16|efi)?\s+(\S+)\s*(.*)", line)):
            kernel, args = m.group(1), m.group(2)
        elif title is not None and (m := re.match(r"initrd(?:16|efi)?\s+(\S+)", line)):
            initrd = m.group(1)
        elif line == "}" and title is not None:
            if kernel is not None and len(entries) < MAX_ENTRIES:
                entries.append(Entry(title, kernel, initrd, args))
            title = None
    return entries, default


def parse_legacy(text: str) -> tuple[list[Entry], str]:
    """GRUB legacy's menu.lst: title / kernel PATH ARGS / initrd PATH, and `default N`."""
    entries: list[Entry] = []
    default = "0"
    current: dict[str, str] = {}

    def close() -> None:
        if "kernel" in current and len(entries) < MAX_ENTRIES:
            kernel, _, args = current["kernel"].partition(" ")
            entries.append(Entry(current.get("title", ""), kernel, current.get("initrd"), args.strip()))

    for raw in text.splitlines():
        key, _, value = raw.strip().partition(" ")
        if key == "default":
            default = value.strip()
        elif key == "title":
            close()
            current = {"title": value.strip()}
        elif key in ("kernel", "initrd") and current:
            current[key] = value.strip()
    close()
    return entries, default


def choose(entries: list[Entry], default: str, wanted: str | None) -> Entry:
    """The entry `bootloader_args` names (--entry=N or a title), else the config's default, else the first."""
    if not entries:
        raise SpecError("bootloader: the guest's boot configuration has no bootable entry")
    for key in [k for k in (wanted, default) if k is not None]:
        if key.isdigit() and int(key) < len(entries):
            return entries[int(key)]
        for entry in entries:
            if entry.title == key:
                return entry
        if key is wanted:
            raise SpecError(f"bootloader_args: no entry {key!r} (entries: {', '.join(e.title for e in entries)})")
    return entries[0]


def parse_args(words: list[str]) -> dict[str, str]:
    """pygrub's own options (--entry, --kernel, --ramdisk, --args); anything else is refused."""
    out: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if key not in ("--entry", "--kernel", "--ramdisk", "--args") or not eq:
            raise SpecError(f"bootloader_args: {word!r}: expected --entry=N|TITLE, --kernel=, --ramdisk= or --args=")
        out[key[2:]] = value
    return out


def boot(disk: str, outdir: Path, args: list[str], name: str) -> Boot:
    """Read `disk`'s boot configuration and extract what it boots into `outdir` (created, root's)."""
    options = parse_args(args)
    with open(disk, "rb") as f:
        head = f.read(SECTOR)
    outdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    last = "no ext2/3/4 filesystem with a GRUB configuration"
    for offset in partitions(head):
        got = _debugfs(disk, offset, outdir, [f"dump {c} /out/cfg{i}" for i, c in enumerate(CONFIGS)], name)
        for i, config in enumerate(CONFIGS):
            path = got / f"cfg{i}"
            if not path.is_file() or path.stat().st_size > MAX_CONFIG:
                continue
            text = path.read_text(errors="replace")
            entries, default = (parse_legacy if config.endswith(".lst") else parse_grub2)(text)
            entry = choose(entries, default, options.get("entry"))
            boot_dir = "/boot" if config.startswith("/grub") else ""  # a separate /boot: its paths lack /boot
            kernel = options.get("kernel", entry.kernel)
            initrd = options.get("ramdisk", entry.initrd or "") or None
            wanted = [f"dump {_inner(kernel, boot_dir)} /out/kernel"]
            if initrd:
                wanted.append(f"dump {_inner(initrd, boot_dir)} /out/initrd")
            _debugfs(disk, offset, outdir, wanted, name)
            if not (outdir / "kernel").is_file() or not (outdir / "kernel").stat().st_size:
                raise SpecError(f"bootloader: {kernel} (from {config}) is not on the guest's disk")
            if initrd and not (outdir / "initrd").is_file():
                raise SpecError(f"bootloader: {initrd} (from {config}) is not on the guest's disk")
            return Boot(outdir / "kernel", outdir / "initrd" if initrd else None,
                        options.get("args", entry.args), entry.title)  # fmt: skip
        last = f"no {' or '.join(CONFIGS)} on the partition at {offset}"
    raise SpecError(f"bootloader: {disk}: {last}")


def _inner(path: str, boot_dir: str) -> str:
    """A GRUB path (maybe `(hd0,msdos1)/boot/x`) as a path in the partition debugfs reads."""
    path = re.sub(r"^\([^)]*\)", "", path)
    if boot_dir and path.startswith("/boot/"):
        path = path[len("/boot") :]
    if not path.startswith("/") or any(c in path for c in "\n\r\0\" "):
        raise SpecError(f"bootloader: {path!r} is not a path on the guest's disk")
    return path


def _debugfs(disk: str, offset: int, outdir: Path, requests: list[str], name: str) -> Path:
    """Run debugfs on `disk` (read-only, at `offset`) in a jail, with `requests`; returns `outdir`."""
    if not os.path.exists(DEBUGFS):
        raise SpecError(f"bootloader: {DEBUGFS} is not installed (apt-get install e2fsprogs)")
    for old in outdir.iterdir():
        old.unlink()
    (outdir / "requests").write_text("\n".join(requests) + "\n")
    with tempfile.TemporaryDirectory(prefix="slimvisor-pygrub-") as tmp:
        root = Path(tmp) / "jail"
        root.mkdir(mode=0o700)
        binds = [Bind(p, p) for p in (DEBUGFS, *shared_libraries(DEBUGFS))]
        binds += [Bind(disk, "/disk"), Bind(str(outdir), "/out", writable=True)]
        jail = JailSpec(name=f"{name}-pygrub", uid=0, gid=0, root=root, binds=binds, tmp_bytes=1 << 20,
                        rlimits={resource.RLIMIT_CORE: 0, resource.RLIMIT_FSIZE: MAX_FILE,
                                 resource.RLIMIT_NOFILE: 64})  # fmt: skip
        argv = [DEBUGFS, "-c", "-f", "/out/requests", f"/disk?offset={offset}"]
        with open(os.devnull, "r+b") as null:
            try:
                jailed = spawn(jail, argv, {"PATH": "/nonexistent"}, null.fileno(), null.fileno())
            except JailError as e:
                raise SpecError(f"bootloader: {e}") from None
            try:
                jailed.wait()
            finally:
                jailed.close()
    return outdir


def is_pygrub(bootloader: str) -> bool:
    """xl.cfg's bootloader = "pygrub", or a path ending in pygrub (/usr/lib/xen-4.9/bin/pygrub)."""
    return os.path.basename(bootloader) == "pygrub"

