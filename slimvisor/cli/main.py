"""The `slimvisor` command line. Heavy modules are imported inside commands to keep start-up short."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from slimvisor import __version__
from slimvisor.cli import migration, pool, xl
from slimvisor.cli.fail import fail
from slimvisor.devices.registry import Shape, options
from slimvisor.model.spec import (
    DiskSpec,
    DomainSpec,
    SpecError,
    default_kernel,
    parse_memory,
    parse_size_mib,
)
from slimvisor.runtime.errors import SlimvisorError

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimvisor")
def cli() -> None:
    """slimvisor: Xen's dom0 on plain Linux. PV domains run as User-Mode Linux; their devices are
    served by vhost-user backends in dom0."""


def _device_options(command: F) -> F:
    """`run`'s device options, as devices.registry declares them (in its order)."""
    for _, option in reversed(options()):
        if option.cli_option is None:
            continue
        if option.shape is Shape.FLAG:
            command = click.option(option.cli_option, option.field, is_flag=True, help=option.help)(command)
        else:
            command = click.option(option.cli_option, option.field, multiple=option.shape is Shape.LIST,
                                   metavar=option.metavar, help=option.help)(command)  # fmt: skip
    return command


def _device_fields(values: dict[str, Any]) -> dict[str, Any]:
    """The DomainSpec fields from `run`'s device options: each value by its spec type's `parse`."""
    fields: dict[str, Any] = {}
    for kind, option in options():
        if option.cli_option is None:
            continue
        value, spec = values[option.field], cast(Any, kind.spec)
        if option.shape is Shape.FLAG:
            fields[option.field] = value
        elif option.shape is Shape.VALUE:
            fields[option.field] = spec.parse(value) if value else None
        else:
            fields[option.field] = [spec.parse(text) for text in value]
    return fields


@cli.command()
@click.option("--type", "kind", type=click.Choice(["pv", "pvh", "hvm"]), default="pv", show_default=True,
              help="pv: User-Mode Linux; pvh/hvm: an unmodified kernel in QEMU (KVM where the host can, else TCG).")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 64), help="Virtual CPUs (pvh, hvm).")
@click.option("--kernel", help="Kernel: linux.uml for pv [default: /usr/bin/linux.uml]; a bzImage or vmlinux for "
              "pvh/hvm (hvm without one boots its first disk).")
@click.option("--initrd", type=click.Path(dir_okay=False), help="Initramfs; default for a root disk: slimvisor's.")
@click.option("--memory", "-m", default="256M", show_default=True, help="Guest memory (256, 256M, 1G).")
@click.option("--root", help="Guest root device [default: /dev/vda when a disk is given].")
@click.option("--cmdline", default="", help="Extra kernel command line.")
@click.option("--name", default="domU", show_default=True, help="Domain name.")
@click.option("--no-reboot", is_flag=True, help="Stop instead of booting again when the guest reboots.")
@click.option("--log", "log_path", help="Console log file [default: /var/log/slimvisor/NAME.console.log].")
@_device_options
def run(kind: str, vcpus: int, kernel: str | None, initrd: str | None, memory: str, root: str | None, cmdline: str,
        name: str, no_reboot: bool, log_path: str | None, **devices: Any) -> None:
    """Boot one domain in the foreground with its console on this terminal (Ctrl-] leaves).

    Exit status: 0 powered off (or rebooted with --no-reboot, or Ctrl-]), 1 bad input,
    3 guest kernel panic, 4 the engine (UML, QEMU) crashed, 5 a device backend died, 128+N killed by signal N.
    """
    from slimvisor.domain.runner import default_log_path, run_domain

    try:
        kernel = kernel or (default_kernel() if kind == "pv" else "")
        if kernel is None:
            raise SpecError("kernel: no --kernel given and /usr/bin/linux.uml is not installed "
                            "(apt-get install user-mode-linux)")  # fmt: skip
        memory_mib = parse_memory(memory, "--memory")
        spec = DomainSpec(name=name, kernel=kernel, memory_mib=memory_mib, initrd=initrd, cmdline=cmdline, root=root,
                          type=kind, vcpus=vcpus, **_device_fields(devices))  # fmt: skip
        outcome = run_domain(spec, reboot=not no_reboot, log_path=log_path or default_log_path(name))
    except (SlimvisorError, OSError) as e:
        fail(str(e))
        return
    click.echo(f"\r\nslimvisor: {name}: {outcome.reason}", err=True)
    sys.exit(outcome.status)


@cli.group()
def backend() -> None:
    """Run device backends on their own, for any vhost-user front-end (UML, QEMU)."""


@backend.command("blk")
@click.option("--socket", "sockets", multiple=True, required=True, metavar="PATH",
              help="vhost-user socket to listen on; one per disk, in order.")
@click.option("--queues", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Most virtqueues a front-end may use (multiqueue).")
@click.option("--allow-unsealed-memory", is_flag=True,
              help="Accept guest memory not sealed against shrinking (UML's memory file): a front-end "
                   "that truncates it would crash this backend.")
@click.argument("disks", nargs=-1, required=True, metavar="DISK[,readonly][,serial=ID]...")
def backend_blk(sockets: tuple[str, ...], queues: int, allow_unsealed_memory: bool, disks: tuple[str, ...]) -> None:
    """Serve raw disk images as vhost-user-blk devices until SIGTERM or SIGINT."""
    import logging

    from slimvisor.devices.blk import blk_factory
    from slimvisor.domain.check import check_disk
    from slimvisor.vhostuser.daemon import listen_and_serve

    if len(sockets) != len(disks):
        fail(f"{len(sockets)} --socket options for {len(disks)} disks: give one socket per disk")
    try:
        specs = [DiskSpec.parse(d) for d in disks]
        for spec in specs:
            check_disk(spec)
    except SpecError as e:
        fail(str(e))
    logging.basicConfig(level=logging.INFO, format="slimvisor-backend: %(message)s")
    try:
        listen_and_serve(
            list(sockets), [(d.path, blk_factory(d, queues)) for d in specs], unsealed_memory=allow_unsealed_memory
        )
    except OSError as e:
        fail(str(e))


@cli.group()
def switch() -> None:
    """dom0 L2 switches that domains' network cards plug into (`--net switch=NAME`)."""


@switch.command("start")
@click.argument("name")
@click.option("--uplink", metavar="TAP", help="Also create this TAP device so the host reaches the domains.")
def switch_start(name: str, uplink: str | None) -> None:
    """Start switch NAME in the background; on a pool member, NAME is pool-wide (joined over VXLAN)."""
    from slimvisor.network import switchd

    if uplink is None and (vni := _pool_switch(name)) is not None:
        click.echo(f"switch {name} running, pool-wide (VXLAN VNI {vni})")
        return
    try:
        pid = switchd.start(name, uplink)
    except (SpecError, OSError) as e:
        fail(str(e))
        return
    click.echo(f"switch {name} running (pid {pid}){f', uplink {uplink}' if uplink else ''}")


def _pool_switch(name: str) -> int | None:
    """Start switch NAME through this host's slimvisord when it is a pool member: its VNI; else None."""
    from slimvisor.toolstack.api import ApiError, Client

    try:
        with Client(autostart=False, timeout=60) as client:
            if "switch-start" not in client.features:
                return None
            try:
                client.call("pool-list")
            except ApiError:
                return None  # in no pool
            vni: int = client.call("switch-start", switch=name)["vni"]
            return vni
    except ApiError as e:
        if "not running" in e.message:
            return None
        fail(e.message)
    except OSError:
        return None


@switch.command("stop")
@click.argument("name")
def switch_stop(name: str) -> None:
    """Stop switch NAME; its TAP uplink and sockets go with it (a pool-wide one's VXLAN link too)."""
    from slimvisor.toolstack.pool import stop_switch

    try:
        stop_switch(name)
    except (SpecError, OSError) as e:
        fail(str(e))


@switch.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def switch_show(name: str, as_json: bool) -> None:
    """Ports of switch NAME with their counters."""
    import json

    from slimvisor.network import switchd
    from slimvisor.runtime.control import ControlError, request

    try:
        switchd.check_name(name)
        stats = request(str(switchd.switch_dir(name) / "control.sock"), {"op": "stats"})
    except (SpecError, ControlError) as e:
        fail(f"switch {name}: {e}")
        return
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    ports: dict[str, dict[str, int]] = stats["ports"]
    columns = sorted({k for counters in ports.values() for k in counters})
    table = Table("port", *columns, title=f"switch {name}")
    for port, counters in sorted(ports.items()):
        table.add_row(port, *(str(counters.get(c, "")) for c in columns))
    Console().print(table)


@switch.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def switch_list(as_json: bool) -> None:
    """Running switches with their uplink and number of domain ports."""
    import json

    from slimvisor.network import switchd

    switches = switchd.listing()
    if as_json:
        click.echo(json.dumps(switches, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "pid", "uplink", "ports", title="switches")
    for sw in switches:
        ports = str(sw["ports"]) if "error" not in sw else f"not answering: {sw['error']}"
        table.add_row(sw["name"], str(sw["pid"] or "-"), sw["uplink"] or "-", ports)
    Console().print(table)


@cli.group()
def image() -> None:
    """Build guest images (cached; see README)."""


def _built(build: Callable[[], tuple[Path, ...]]) -> None:
    """Run an image build; print the files it made, one a line, or fail with its error."""
    try:
        made = build()
    except (OSError, RuntimeError) as e:
        fail(str(e))
        return
    click.echo("\n".join(map(str, made)))


@image.command("busybox")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
def image_busybox(outdir: Path) -> None:
    """A small guest: OUTDIR/initrd.cpio.gz (boots a root disk) and OUTDIR/rootfs.ext4."""
    from slimvisor.images import busybox

    _built(lambda: busybox.build(outdir))


@image.command("cloud")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
def image_cloud(outdir: Path) -> None:
    """Debian's cloud kernel for HVM/PVH domains: OUTDIR/vmlinuz and OUTDIR/initrd.cpio.gz (boots the
    rootfs.ext4 of `slimvisor image busybox`, as PV domains do)."""
    from slimvisor.images import cloud

    _built(lambda: cloud.build(outdir))


@image.command("debian")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default="1G", show_default=True, help="Image size.")
@click.option("--suite", default="bookworm", show_default=True)
@click.option("--bootable", is_flag=True, help="A partitioned disk with Debian's cloud kernel and GRUB in the MBR, "
              "which an HVM domain without a kernel boots through SeaBIOS.")
def image_debian(output: Path, size: str, suite: str, bootable: bool) -> None:
    """A Debian minbase root filesystem (mmdebstrap) as an ext4 image, or a bootable disk."""
    from slimvisor.images import debian

    try:
        debian.build(output, size_mib=parse_size_mib(size, "--size"), suite=suite, bootable=bootable)
    except (SpecError, OSError, RuntimeError) as e:
        fail(str(e))
        return
    click.echo(str(output))


xl.register(cli)
migration.register(cli)
pool.register(cli)


def main() -> None:
    cli(prog_name="slimvisor")
