"""What a domain is made of, parsed and validated before anything is started.

Every error names the offending value and says what was expected, so a bad command line or
config fails before a single process, socket or file exists.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_UML = "/usr/bin/linux.uml"
MIN_MEMORY_MIB = 16
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SpecError(ValueError):
    """Bad user input: the message names what and where."""


def check_name(name: str) -> None:
    """A domain name: it names files, sockets and switch ports, so no '/' or spaces."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise SpecError(f"name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")


def parse_size_mib(text: str, what: str) -> int:
    """A size in MiB from '256', '256M', '1G', '262144K' (plain numbers are MiB, as in xl)."""
    m = _SIZE.match(text)
    if not m:
        raise SpecError(f"{what}: {text!r} is not a size (examples: 256, 256M, 1G)")
    nbytes = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if nbytes % (1 << 20):
        raise SpecError(f"{what}: {text!r} is not a whole number of MiB")
    return nbytes >> 20


def parse_memory(text: str, what: str = "memory") -> int:
    """Guest memory in MiB, within what UML needs and this host has."""
    mib = parse_size_mib(text, what)
    if mib < MIN_MEMORY_MIB:
        raise SpecError(f"{what}: {text!r} is below the minimum of {MIN_MEMORY_MIB} MiB")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    if mib > total:
        raise SpecError(f"{what}: {text!r} is more than this host's {total} MiB of memory")
    return mib


DISK_FORMATS = ("raw", "overlay")


@dataclass(frozen=True)
class DiskSpec:
    path: str
    readonly: bool = False
    serial: str = ""
    format: str = "raw"  # "overlay": a copy-on-write overlay of a raw base (slimvisor.storage.overlay)

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """'PATH[,readonly|ro|rw][,serial=ID][,format=raw|overlay]' as on the command line."""
        path, *opts = text.split(",")
        if not path:
            raise SpecError(f"disk {text!r}: no path given")
        readonly, serial, fmt = False, "", "raw"
        for opt in opts:
            key, _, value = opt.partition("=")
            if key in ("readonly", "ro"):
                readonly = True
            elif key == "rw":
                readonly = False
            elif key == "serial" and value:
                if len(value.encode()) > 20:
                    raise SpecError(f"disk {text!r}: serial {value!r} is longer than 20 bytes")
                serial = value
            elif key == "format" and value:
                if value not in DISK_FORMATS:
                    raise SpecError(f"disk {text!r}: unknown format {value!r} (known: {', '.join(DISK_FORMATS)})")
                fmt = value
            else:
                raise SpecError(
                    f"disk {text!r}: unknown option {opt!r} (known: readonly, rw, serial=ID, format=raw|overlay)"
                )
        return cls(os.path.abspath(path), readonly, serial, fmt)

    def check(self) -> None:
        if not os.path.isfile(self.path):
            raise SpecError(f"disk {self.path}: no such file")
        if not os.access(self.path, os.R_OK if self.readonly else os.R_OK | os.W_OK):
            mode = "reading" if self.readonly else "reading and writing"
            raise SpecError(f"disk {self.path}: cannot open for {mode}")
        if self.format == "overlay":
            from slimvisor.storage import OverlayError, open_disk

            try:  # the header, the bitmap and the base, checked before anything starts
                open_disk(self.path, self.format, readonly=True).close()
            except (OverlayError, OSError) as e:
                raise SpecError(f"disk {self.path}: {str(e).removeprefix(self.path + ': ')}") from None
        if os.path.getsize(self.path) < 512:
            raise SpecError(f"disk {self.path}: smaller than one 512-byte sector")


def _options(text: str, what: str, known: tuple[str, ...]) -> dict[str, str]:
    """'k=v,k=v' with every key known and given once."""
    out: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if key not in known or not eq or not value:
            raise SpecError(f"{what} {text!r}: bad option {item!r} (known: {', '.join(k + '=' for k in known)})")
        if key in out:
            raise SpecError(f"{what} {text!r}: {key} given twice")
        out[key] = value
    return out


def parse_mac(text: str, what: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
        raise SpecError(f"{what}: {text!r} is not a MAC address (like 52:54:00:12:34:56)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise SpecError(f"{what}: {text!r} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class NetSpec:
    """A network card on a dom0 switch: 'switch=NAME[,mac=MAC][,rate=RATE][,pps=N]' (xl's vif
    words, plus a packet-rate limit as Firecracker's ops bucket)."""

    switch: str
    mac: bytes | None = None  # None: derived from the domain name, stable across runs
    rate: int | None = None  # bytes per second, each direction
    pps: int | None = None  # packets per second, each direction

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        from slimvisor.runtime.ratelimit import parse_rate

        opts = _options(text, "net", ("switch", "bridge", "mac", "rate", "pps"))
        switch = opts.get("switch") or opts.get("bridge")
        if not switch:
            raise SpecError(f"net {text!r}: say which switch (switch=NAME)")
        mac = parse_mac(opts["mac"], f"net {text!r}") if "mac" in opts else None
        try:
            rate = parse_rate(opts["rate"]) if "rate" in opts else None
        except ValueError as e:
            raise SpecError(f"net {text!r}: {e}") from e
        pps = opts.get("pps")
        if pps is not None and not re.fullmatch(r"[1-9][0-9]{0,9}", pps):
            raise SpecError(f"net {text!r}: pps must be a positive number of packets per second")
        return cls(switch, mac, rate, int(pps) if pps else None)

    def mac_for(self, domain: str, index: int) -> bytes:
        if self.mac is not None:
            return self.mac
        digest = hashlib.sha256(f"{domain}/{index}".encode()).digest()
        return bytes([0x52, 0x54, 0x00, *digest[:3]])


@dataclass(frozen=True)
class VsockSpec:
    """'cid=N,uds=PATH': the guest's vsock CID and the host Unix socket (Firecracker's scheme)."""

    cid: int
    uds: str

    @classmethod
    def parse(cls, text: str, cwd: str | None = None) -> VsockSpec:
        """A relative uds is taken against `cwd`, the client's directory [default: ours]."""
        opts = _options(text, "vsock", ("cid", "uds"))
        if "cid" not in opts or "uds" not in opts:
            raise SpecError(f"vsock {text!r}: give cid=N and uds=PATH")
        if not re.fullmatch(r"[0-9]{1,10}", opts["cid"]) or not 3 <= int(opts["cid"]) < 0xFFFFFFFF:
            raise SpecError(f"vsock {text!r}: cid must be a number from 3 (0-2 are reserved)")
        uds = os.path.abspath(os.path.join(cwd or os.getcwd(), opts["uds"]))
        if not os.path.isdir(os.path.dirname(uds)):
            raise SpecError(f"vsock {text!r}: directory {os.path.dirname(uds)} does not exist")
        if os.path.exists(uds):
            raise SpecError(f"vsock {text!r}: {uds} already exists")
        return cls(int(opts["cid"]), uds)


@dataclass(frozen=True)
class ChannelSpec:
    """'NAME=PATH': a virtio-console named port, /dev/virtio-ports/NAME in the guest, a Unix
    socket at PATH on the host (for a guest agent, as QEMU's virtserialport)."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> ChannelSpec:
        name, eq, path = text.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or not path:
            raise SpecError(f"channel {text!r}: expected NAME=PATH (NAME of letters, digits, '.', '_', '-')")
        path = os.path.abspath(path)
        if not os.path.isdir(os.path.dirname(path)):
            raise SpecError(f"channel {text!r}: directory {os.path.dirname(path)} does not exist")
        if os.path.exists(path):
            raise SpecError(f"channel {text!r}: {path} already exists")
        return cls(name, path)


def is_uml_kernel(path: str) -> bool:
    """A User-Mode Linux binary: an ELF executable that carries UML's own help text.

    The answer is kept per (path, size, mtime, inode): a daemon creating many domains from one
    kernel reads its megabytes once, and a replaced file is read again.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _is_uml_kernel(path, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _is_uml_kernel(path: str, size: int, mtime_ns: int, inode: int) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return False
            needle, tail = b"User Mode Linux", b""
            while chunk := f.read(1 << 20):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle) :]
    except OSError:
        return False
    return False


@dataclass
class DomainSpec:
    name: str
    kernel: str
    memory_mib: int
    initrd: str | None = None
    disks: list[DiskSpec] = field(default_factory=list)
    cmdline: str = ""
    root: str | None = None  # guest root device; default: first disk when there is no initrd
    nets: list[NetSpec] = field(default_factory=list)
    vsock: VsockSpec | None = None
    rng: bool = False
    balloon: bool = False
    balloon_deflate_on_oom: bool = False  # the guest may take ballooned pages back rather than OOM
    channels: list[ChannelSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.balloon = self.balloon or self.balloon_deflate_on_oom  # that balloon is still a balloon
        # UML runs in the domain's run directory: relative paths must not change meaning.
        self.kernel = os.path.abspath(self.kernel)
        if self.initrd is not None:
            self.initrd = os.path.abspath(self.initrd)

    def to_json(self) -> dict[str, Any]:
        """As stored beside a running domain, so the toolstack can start it again after a crash."""
        out = asdict(self)
        for net in out["nets"]:
            net["mac"] = net["mac"].hex() if net["mac"] is not None else None
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DomainSpec:
        return cls(**{
            **raw,
            "disks": [DiskSpec(**d) for d in raw["disks"]],
            "nets": [NetSpec(**{**n, "mac": bytes.fromhex(n["mac"]) if n["mac"] else None}) for n in raw["nets"]],
            "vsock": VsockSpec(**raw["vsock"]) if raw["vsock"] else None,
            "channels": [ChannelSpec(**c) for c in raw["channels"]],
        })  # fmt: skip

    def check(self) -> None:
        check_name(self.name)
        if not os.path.isfile(self.kernel):
            raise SpecError(f"kernel {self.kernel}: no such file")
        if not os.access(self.kernel, os.X_OK):
            raise SpecError(f"kernel {self.kernel}: not executable")
        if not is_uml_kernel(self.kernel):
            raise SpecError(f"kernel {self.kernel}: not a User-Mode Linux kernel (PV domains run linux.uml)")
        from slimvisor.engines.uml import host_options, refusal
        from slimvisor.jail.spawn import JailError, check_binary

        try:
            check_binary(self.kernel)
        except JailError as e:
            raise SpecError(f"kernel {e}: it runs in every domain's jail, so only root may change it") from None
        for what, text in (("cmdline", self.cmdline), ("root", self.root or "")):
            if bad := host_options(text):
                raise SpecError(refusal(what, bad[0]))
        if self.initrd is not None and not os.path.isfile(self.initrd):
            raise SpecError(f"initrd {self.initrd}: no such file")
        for disk in self.disks:
            disk.check()
        paths = [d.path for d in self.disks]
        if len(set(paths)) != len(paths):
            raise SpecError("the same disk image is given twice")
        if len(self.disks) > 26:
            raise SpecError(f"{len(self.disks)} disks: at most 26 (vda..vdz)")
        if self.initrd is None and not self.disks:
            raise SpecError("nothing to boot: give an initrd or a root disk")


def default_kernel() -> str | None:
    if os.path.exists(DEFAULT_UML):
        return DEFAULT_UML
    return shutil.which("linux.uml") or shutil.which("linux")
