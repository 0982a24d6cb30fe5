"""Every kind of device a domain can have, declared once.

A `DeviceKind` says what the rest of slimvisor needs to know of a device: its virtio id, the
module of its model (which the supervisor imports before it confines itself), its options' type
in `model.spec`, the xl.cfg keys and `slimvisor run` options that ask for it, and how to build
the domain's instances of it from a `DomainSpec`. The domain layer serves whatever `KINDS` lists
(`domain/devices.py`), `slimvisor run` makes its options from `Option`s here (`cli/main.py`), and
the xl.cfg parser reads its keys from them (`toolstack/xlcfg.py`), so adding a device is its
module, its entry here and its `DomainSpec` field (with a spec type and its `parse` if it takes
options); `tests/test_device_registry.py` checks the declarations against all of them.

Models are imported when a device is built, not here: `slimvisor` commands that serve no device
do not pay for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from slimvisor.model.spec import ChannelSpec, DiskSpec, DomainSpec, NetSpec, VsockSpec
from slimvisor.virtio.device import VirtioDevice
from slimvisor.virtio.spec import (
    VIRTIO_ID_BALLOON,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_NET,
    VIRTIO_ID_RNG,
    VIRTIO_ID_VSOCK,
)

Factory = Callable[[], VirtioDevice]
Model = Callable[[], type[Any]]  # the model class, imported when first called


class Shape(StrEnum):
    """How an option's value is written, in xl.cfg and on `slimvisor run`'s command line."""

    FLAG = "flag"  # on or off: xl.cfg KEY=0|1, a --flag
    VALUE = "value"  # one spec: xl.cfg KEY="TEXT", --option TEXT; parsed by the spec type's `parse`
    LIST = "list"  # specs: xl.cfg KEY=["TEXT", ...], a repeatable --option TEXT


@dataclass(frozen=True)
class Option:
    """One setting that asks for a device: the `DomainSpec` field it sets, its xl.cfg key and its
    `slimvisor run` option (either may be None), and the option's help."""

    field: str
    xlcfg_key: str | None
    cli_option: str | None
    shape: Shape
    help: str
    metavar: str | None = None


@dataclass(frozen=True)
class DeviceKind:
    name: str
    virtio_id: int
    module: str  # the device model's module
    model: str  # its class there
    spec: type | None  # the type of its options in model.spec; None: on or off
    options: tuple[Option, ...]  # the settings that ask for it
    instances: Callable[[DomainSpec, Model], list[tuple[str, Factory]]]
    """The domain's devices of this kind: (name, factory) pairs; `Model()` gives the model class."""
    on_switch: bool = False  # served by a dom0 switch (a shared process), not by the domain's backend
    edges: tuple[str, ...] = ()  # modules of its I/O edges (host sockets), apart from the model

    @property
    def xlcfg_keys(self) -> tuple[str, ...]:
        """The xl.cfg keys that ask for it (none: `slimvisor run` only)."""
        return tuple(o.xlcfg_key for o in self.options if o.xlcfg_key)

    @property
    def cli_options(self) -> tuple[str, ...]:
        """The `slimvisor run` options that ask for it."""
        return tuple(o.cli_option for o in self.options if o.cli_option)

    def model_class(self) -> type[Any]:
        return getattr(importlib.import_module(self.module), self.model)  # type: ignore[no-any-return]

    def build(self, spec: DomainSpec) -> list[tuple[str, Factory]]:
        """The (name, factory) pairs of `spec`'s devices of this kind; nothing built (or imported) yet."""
        return self.instances(spec, self.model_class)


def disk_name(index: int) -> str:
    """vda, vdb, ...: the guest's name for its index-th disk, and its socket's."""
    return f"vd{chr(ord('a') + index)}"


def _disks(spec: DomainSpec, model: Model) -> list[tuple[str, Factory]]:
    def factory(disk: DiskSpec) -> Factory:
        return lambda: model().from_spec(disk)

    # Only the disks slimvisor's blk backend serves: the others are qemu-storage-daemon's (domain.qsd).
    return [(disk_name(i), factory(d)) for i, d in enumerate(spec.disks) if d.backend == "blk"]


def _vsock(spec: DomainSpec, model: Model) -> list[tuple[str, Factory]]:
    if spec.vsock is None:
        return []
    cid, uds = spec.vsock.cid, spec.vsock.uds

    def make() -> VirtioDevice:
        from slimvisor.devices.vsock_unix import unix_vsock  # the model, with its host side on Unix sockets

        return unix_vsock(cid, uds)

    return [("vsock", make)]


def _rng(spec: DomainSpec, model: Model) -> list[tuple[str, Factory]]:
    return [("rng", lambda: model()())] if spec.rng else []


def _balloon(spec: DomainSpec, model: Model) -> list[tuple[str, Factory]]:
    deflate = spec.balloon_deflate_on_oom
    return [("balloon", lambda: model()(deflate_on_oom=deflate))] if spec.balloon else []


def _console(spec: DomainSpec, model: Model) -> list[tuple[str, Factory]]:
    names = [c.name for c in spec.channels]

    def make() -> VirtioDevice:
        from slimvisor.devices.console import PortSpec

        device: VirtioDevice = model()([PortSpec(console=True), *(PortSpec(name=n) for n in names)])  # 0: hvc0
        return device

    return [("console", make)] if names else []


def _nets(spec: DomainSpec, model: Model) -> list[tuple[str, Factory]]:
    return []  # a switch port: slimvisor.network.switchd builds the device


# In the order their sockets are handed to the engine (the guest finds them in this order).
KINDS: tuple[DeviceKind, ...] = (
    DeviceKind("blk", VIRTIO_ID_BLOCK, "slimvisor.devices.blk", "BlockDevice", DiskSpec, (
        Option("disks", "disk", "--disk", Shape.LIST, "Raw disk image served over vhost-user; the first is "
               "/dev/vda. Repeatable.", "PATH[,readonly][,serial=ID]"),
    ), _disks),
    DeviceKind("vsock", VIRTIO_ID_VSOCK, "slimvisor.devices.vsock", "VsockDevice", VsockSpec, (
        Option("vsock", "vsock", "--vsock", Shape.VALUE, "virtio-vsock; host side on Unix sockets, as Firecracker.",
               "cid=N,uds=PATH"),
    ), _vsock, edges=("slimvisor.devices.vsock_unix",)),
    DeviceKind("rng", VIRTIO_ID_RNG, "slimvisor.devices.rng", "RngDevice", None, (
        Option("rng", "rng", "--rng", Shape.FLAG, "virtio-rng from the host's getrandom()."),
    ), _rng),
    DeviceKind("balloon", VIRTIO_ID_BALLOON, "slimvisor.devices.balloon", "BalloonDevice", None, (
        Option("balloon", "balloon", "--balloon", Shape.FLAG,
               "virtio-balloon: `slimvisor mem-set` gives memory back to the host."),
        Option("balloon_deflate_on_oom", "balloon_deflate_on_oom", "--balloon-deflate-on-oom", Shape.FLAG,
               "A balloon the guest takes pages back from rather than run out of memory (implies --balloon)."),
    ), _balloon),
    DeviceKind("console", VIRTIO_ID_CONSOLE, "slimvisor.devices.console", "ConsoleDevice", ChannelSpec, (
        Option("channels", None, "--channel", Shape.LIST, "virtio-console port /dev/virtio-ports/NAME, a Unix "
               "socket at PATH on the host. Repeatable.", "NAME=PATH"),
    ), _console, edges=("slimvisor.devices.console_unix",)),
    DeviceKind("net", VIRTIO_ID_NET, "slimvisor.devices.net", "NetDevice", NetSpec, (
        Option("nets", "vif", "--net", Shape.LIST, "Network card on a dom0 switch (`slimvisor switch`); rate like "
               "100M (bits/s). Repeatable.", "switch=NAME[,mac=MAC][,rate=RATE][,pps=N]"),
    ), _nets, on_switch=True),
)  # fmt: skip


def options() -> list[tuple[DeviceKind, Option]]:
    """Every device option, with its kind, in the order of `KINDS`."""
    return [(k, o) for k in KINDS for o in k.options]


def kind(name: str) -> DeviceKind:
    for k in KINDS:
        if k.name == name:
            return k
    raise KeyError(name)


def local_factories(spec: DomainSpec) -> list[tuple[str, int, Factory]]:
    """(name, virtio id, factory) of every device `spec` asks of the domain's own backend, in order."""
    return [(name, k.virtio_id, make) for k in KINDS for name, make in k.build(spec)]


def model_modules() -> tuple[str, ...]:
    """The modules of the models (and their edges) a domain's backend may build (the supervisor
    preloads them)."""
    return tuple(m for k in KINDS if not k.on_switch for m in (k.module, *k.edges))
