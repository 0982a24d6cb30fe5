"""`slimvisor pool ...`: this host in a pool of hosts (docs/pool.md), as XAPI's pool-join and friends."""

from __future__ import annotations

import json
from typing import Any

import click

from slimvisor.cli.migration import follow
from slimvisor.cli.xl import daemon_client, table_console
from slimvisor.toolstack.api import ApiError, Client
from slimvisor.toolstack.peers import PEER_PORT


def register(cli: click.Group) -> None:
    cli.add_command(pool)


def _membership_options(command: Any) -> Any:
    for option in reversed((
        click.option("--etcd", required=True, metavar="URL[,URL...]", help="The pool's etcd client URLs."),
        click.option("--name", "host", default=None, help="This host's name in the pool [default: its hostname]."),
        click.option("--address", default=None, help="This host's address on the pool's network [default: the "
                     "source address toward the first etcd URL]."),
        click.option("--port", default=PEER_PORT, show_default=True, help="TCP port of this host's pool link."),
        click.option("--ttl", default=10, show_default=True, help="Seconds this host's lease lives unrenewed: "
                     "how soon the others restart its domains if it is lost."),
    )):  # fmt: skip
        command = option(command)
    return command


@click.group()
def pool() -> None:
    """This host in a pool of hosts: shared names, placement, pool-wide switches, migration, HA."""


def _enter(op: str, etcd: str, host: str | None, address: str | None, port: int, ttl: int, **extra: Any) -> None:
    import platform

    with daemon_client() as client:
        reply = client.call(op, etcd=[u for u in etcd.split(",") if u], host=host or platform.node(),
                            address=address, port=port, ttl=ttl, **extra)  # fmt: skip
    click.echo(f"{reply['host']} is a member of pool {reply['pool']} ({len(reply['hosts'])} hosts)", err=True)


@pool.command("init")
@_membership_options
@click.option("--pool", "pool_name", default="pool", show_default=True, help="The pool's name.")
def pool_init(etcd: str, host: str | None, address: str | None, port: int, ttl: int, pool_name: str) -> None:
    """Make a new pool in etcd, with this host its first member."""
    _enter("pool-init", etcd, host, address, port, ttl, pool=pool_name)


@pool.command("join")
@_membership_options
def pool_join(etcd: str, host: str | None, address: str | None, port: int, ttl: int) -> None:
    """Join the pool that lives in etcd at --etcd."""
    _enter("pool-join", etcd, host, address, port, ttl)


@pool.command("leave")
@click.option("--evacuate", is_flag=True, help="First migrate every migratable domain to other members.")
def pool_leave(evacuate: bool) -> None:
    """Leave the pool; domains still here keep running, as this host's own."""
    with daemon_client() as client:
        if evacuate:
            _evacuate(client)
        reply = client.call("pool-leave")
    kept = f"; kept here: {', '.join(reply['kept'])}" if reply["kept"] else ""
    click.echo(f"{reply['host']} left pool {reply['pool']}{kept}", err=True)


def _evacuate(client: Client) -> None:
    """Each domain here to the member placement chooses, one at a time; one that cannot move stays."""
    client.call("pool-leave", evacuating=True)  # no member places anything here meanwhile
    names = [d["name"] for d in client.call("list")["domains"] if d["domid"] != 0]
    stuck = []
    for name in names:
        try:
            reply = client.call("migrate", domain=name, target={"pool": None}, live=True, paused=False)
        except ApiError as e:
            stuck.append(f"{name} ({e.message})")
            continue
        try:
            follow(client, name, "migrating", gone_is_done=True)
        except SystemExit:
            stuck.append(f"{name} (its migration failed)")
            continue
        click.echo(f"Domain {name} migrated to {reply['target_host']}", err=True)
    for line in stuck:
        click.echo(f"slimvisor: warning: not evacuated: {line}", err=True)


@pool.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def pool_list(as_json: bool) -> None:
    """The pool's members with their capacity, and its domains."""
    with daemon_client() as client:
        reply = client.call("pool-list")
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    from rich.table import Table

    table = Table("Host", "Address", "CPUs", "Mem(MiB)", "Free(MiB)", "Engines", "Domains",
                  title=f"pool {reply['pool']}", box=None, header_style="bold")  # fmt: skip
    for h in reply["hosts"]:
        count = sum(1 for d in reply["domains"] if d["host"] == h["name"])
        table.add_row(h["name"] + (" (leaving)" if h["leaving"] else ""), f"{h['address']}:{h['port']}", str(h["cpus"]),
                      str(h["memory_mib"]), str(h["free_memory_mib"]), ",".join(h["engines"]), str(count))  # fmt: skip
    table_console().print(table)
    if reply.get("problem"):
        click.echo(f"slimvisor: warning: {reply['problem']}", err=True)

