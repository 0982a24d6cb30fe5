"""What a domain is made of, parsed and validated before anything is started.

Every error names the offending value and says what was expected, so a bad command line or
config fails before a single process, socket or file exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

from slimvisor.model import units
from slimvisor.runtime.errors import SlimvisorError

DEFAULT_UML = "/usr/bin/linux.uml"
MIN_MEMORY_MIB = 16


class SpecError(SlimvisorError, ValueError):
    """Bad user input: the message names what and where."""


# The one rule for a name that becomes a file, socket or port name (domains, channels, switch ports).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> None:
    """A domain name: it names files, sockets and switch ports, so no '/' or spaces."""
    if not NAME.fullmatch(name):
        raise SpecError(f"name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")


def parse_size_mib(text: str, what: str) -> int:
    """A size in MiB from '256', '256M', '1G', '262144K' (plain numbers are MiB, as in xl)."""
    try:
        return units.mib(units.parse_size(text, what, multiple_of=units.MiB))
    except units.SizeError as e:
        raise SpecError(str(e)) from None


def parse_memory(text: str, what: str = "memory") -> int:
    """Guest memory in MiB, within what UML needs and this host has."""
    mib = parse_size_mib(text, what)
    if mib < MIN_MEMORY_MIB:
        raise SpecError(f"{what}: {text!r} is below the minimum of {MIN_MEMORY_MIB} MiB")
    total = units.mib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if mib > total:
        raise SpecError(f"{what}: {text!r} is more than this host's {total} MiB of memory")
    return mib


# overlay: slimvisor's copy-on-write format (slimvisor.storage); qcow2: QEMU's, served by qemu-storage-daemon.
DISK_FORMATS = ("raw", "overlay", "qcow2")  # the one list


@dataclass(frozen=True)
class DiskSpec:
    path: str
    readonly: bool = False
    serial: str = ""
    format: str = "raw"  # "overlay": a copy-on-write overlay of a raw base (slimvisor.storage.overlay)
    backend: str = "blk"  # "blk": slimvisor's blk device; "qsd": qemu-storage-daemon (qcow2, backendtype=qdisk)
    vdev: str = field(default="", compare=False)  # as an xl.cfg named it (xvda1, hdc): the guest maps it to a vdX

    def __post_init__(self) -> None:
        if self.format == "qcow2":
            object.__setattr__(self, "backend", "qsd")  # slimvisor has no qcow2 code of its own

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """'PATH[,readonly|ro|rw][,serial=ID][,format=raw|overlay|qcow2]' as on the command line."""
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
                    f"disk {text!r}: unknown option {opt!r} (known: readonly, rw, serial=ID, format=raw|overlay|qcow2)"
                )
        return cls(os.path.abspath(path), readonly, serial, fmt)



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
        if not eq or not NAME.fullmatch(name) or not path:
            raise SpecError(f"channel {text!r}: expected NAME=PATH (NAME of letters, digits, '.', '_', '-')")
        path = os.path.abspath(path)
        if not os.path.isdir(os.path.dirname(path)):
            raise SpecError(f"channel {text!r}: directory {os.path.dirname(path)} does not exist")
        if os.path.exists(path):
            raise SpecError(f"channel {text!r}: {path} already exists")
        return cls(name, path)


# Xen's domain types (xl.cfg type=): pv runs on User-Mode Linux; pvh and hvm on QEMU (slimvisor.engines).
DOMAIN_TYPES = ("pv", "pvh", "hvm")


@dataclass
class DomainSpec:
    name: str
    kernel: str  # "": none (an HVM domain that boots from its first disk)
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
    # The engine section: which engine runs the domain (DOMAIN_TYPES) and its virtual CPUs.
    type: str = "pv"
    vcpus: int = 1
    # The RAM the engine gives the guest when it may grow (xl's maxmem): the balloon then holds
    # ram - memory from the start. None: memory_mib is the RAM.
    maxmem_mib: int | None = None

    @property
    def ram_mib(self) -> int:
        """The guest's RAM as the engine provides it (memory_mib is what it starts ballooned to)."""
        return max(self.maxmem_mib or self.memory_mib, self.memory_mib)

    def __post_init__(self) -> None:
        self.balloon = self.balloon or self.balloon_deflate_on_oom  # that balloon is still a balloon
        if self.type not in DOMAIN_TYPES:
            raise SpecError(f"type {self.type!r}: expected one of {', '.join(DOMAIN_TYPES)}")
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool) or self.vcpus < 1:
            raise SpecError(f"vcpus {self.vcpus!r}: expected a whole number from 1")
        # The engine runs in the domain's run directory: relative paths must not change meaning.
        if self.kernel:
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

def default_kernel() -> str | None:
    if os.path.exists(DEFAULT_UML):
        return DEFAULT_UML
    return shutil.which("linux.uml") or shutil.which("linux")
