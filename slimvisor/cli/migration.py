"""xl's save, restore, migrate and migrate-receive, each over slimvisord's API (toolstack.migration).

The daemon returns as soon as the domain's state is on its way; these commands then follow it as xl
does, with a progress bar, and return when it is through: the domain gone from here (migrate, save),
or arrived (restore), or back where it was with the reason it did not move (exit status 1).
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import click

from slimvisor.cli.fail import fail
from slimvisor.cli.xl import daemon_client
from slimvisor.toolstack.api import ApiError, Client, socket_path

FOLLOW_TIMEOUT = 3600.0  # a migration that makes no progress this long is given up by the command (not the domain)
RELAY_CHUNK = 1 << 20


def register(cli: click.Group) -> None:
    for command in (save, restore, migrate, migrate_receive):
        cli.add_command(command)


@click.command()
@click.argument("domain")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-c", "keep", is_flag=True, help="Leave the domain running after saving it.")
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused after saving it.")
def save(domain: str, file: Path, keep: bool, paused: bool) -> None:
    """Save DOMAIN's state (memory, vCPUs, devices) to FILE, then destroy it, as `xl save`."""
    if keep and paused:
        fail("-c and -p: give one of them")
    then = "keep" if keep else "pause" if paused else "destroy"
    with daemon_client() as client:
        client.call("save", domain=domain, path=str(file.absolute()), then=then)
        follow(client, domain, "saving", gone_is_done=then == "destroy")
    click.echo(f"Domain {domain} saved to {file}", err=True)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused once restored.")
def restore(file: Path, paused: bool) -> None:
    """Start the domain saved in FILE where it was, as `xl restore`."""
    with daemon_client() as client:
        reply = client.call("restore", path=str(file.absolute()), paused=paused)
        for warning in reply.get("warnings", []):
            click.echo(f"slimvisor: warning: {warning}", err=True)
        _until_arrived(client, reply["name"])
    click.echo(f"Domain {reply['name']} restored (id {reply['domain']})", err=True)


@click.command()
@click.argument("domain")
@click.argument("host", required=False)
@click.option("--daemon", "daemon", type=click.Path(path_type=Path), metavar="SOCKET",
              help="Migrate to the slimvisord serving SOCKET (another run tree on this machine) instead of HOST.")
@click.option("-s", "ssh_command", default="ssh", show_default=True, metavar="SSHCOMMAND",
              help="Run SSHCOMMAND HOST slimvisor migrate-receive; if empty, run HOST itself as the command (xl's -s).")
@click.option("--live/--no-live", default=True, show_default=True,
              help="Copy memory while the domain runs, then stop it briefly (xl migrates live).")
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused on the target.")
def migrate(domain: str, host: str | None, daemon: Path | None, ssh_command: str, live: bool, paused: bool) -> None:
    """Move DOMAIN to HOST (an ssh destination running slimvisor) or to --daemon SOCKET, as `xl migrate`.

    Disks must be shared storage (the same image under the same path on both sides). The domain
    keeps its name and uuid; until the target has its whole state, it runs on here."""
    if (host is None) == (daemon is None):
        fail("give HOST or --daemon SOCKET")
    if daemon is None and _pool_member(str(host)):
        target: dict[str, Any] = {"pool": host}
    elif daemon is not None:
        target = {"daemon": str(daemon.absolute())}
    elif ssh_command:
        target = {"command": f"{ssh_command} {shlex.quote(str(host))} slimvisor migrate-receive"}
    else:
        target = {"command": str(host)}
    with daemon_client() as client:
        reply = client.call("migrate", domain=domain, target=target, live=live, paused=paused)
        for warning in reply.get("warnings", []):
            click.echo(f"slimvisor: warning: {warning}", err=True)
        follow(client, domain, "migrating", gone_is_done=True)
    click.echo(f"Domain {domain} migrated (now id {reply['target_domain']} on {reply['target_host']})", err=True)


def _pool_member(host: str) -> bool:
    """Whether HOST is a member of this host's pool (then the pool link carries the migration)."""
    with daemon_client() as client:
        if "pool-list" not in client.features:
            return False
        try:
            return any(h["name"] == host for h in client.call("pool-list")["hosts"])
        except ApiError:
            return False  # in no pool


@click.command("migrate-receive")
def migrate_receive() -> None:
    """The target's end of `slimvisor migrate HOST` (run by it over ssh): relays stdin and stdout to
    this host's slimvisord, which takes the domain."""
    try:
        Client().close()  # started on demand, as for every command
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_path()))
    except (ApiError, OSError) as e:
        fail(f"slimvisord: {e}")
        return
    _relay(sock)


def _relay(sock: socket.socket) -> None:
    """Copy stdin to `sock` and `sock` to stdout until both directions ended."""
    inbound, outbound = 0, 1
    open_in, open_out = True, True
    while open_in or open_out:
        watch = ([inbound] if open_in else []) + ([sock.fileno()] if open_out else [])
        ready, _, _ = select.select(watch, [], [])
        if inbound in ready:
            data = os.read(inbound, RELAY_CHUNK)
            if data:
                sock.sendall(data)
            else:
                open_in = False
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        if sock.fileno() in ready:
            data = sock.recv(RELAY_CHUNK)
            if not data:
                open_out = False
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(outbound, view) :]


def _migration(client: Client, domain: str) -> dict[str, Any] | None:
    """The domain's migration as its supervisor reports it; None once the domain is gone from here."""
    try:
        info = client.call("domain-info", domain=domain)
    except ApiError as e:
        if e.code == "no-such-domain":
            return None
        return {"state": "dying"}  # its supervisor is ending (the daemon forgets it next)
    return {"state": info["domain"]["state"], **(info.get("migration") or {})}


def follow(client: Client, domain: str, doing: str, *, gone_is_done: bool) -> None:
    """A progress bar until the state is out: then the domain is gone (or, save -c/-p, runs or is
    paused again with status completed); a failure's reason ends the command with status 1."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn(f"{domain}: {doing}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("{task.fields[note]}"))  # fmt: skip
    deadline = time.monotonic() + FOLLOW_TIMEOUT
    with Progress(*columns, transient=True, disable=not os.isatty(2)) as bar:
        task = bar.add_task(doing, total=None, note="")
        while time.monotonic() < deadline:
            status = _migration(client, domain)
            if status is None:
                if gone_is_done:
                    return
                fail(f"{domain} is gone")
            assert status is not None
            if status.get("status") == "failed":
                fail(f"{domain} did not move: {status.get('error', 'failed')}; it is {status['state']} here")
            if status.get("status") == "completed" and status["state"] != "migrating" and not gone_is_done:
                return
            sent, left = status.get("bytes_sent"), status.get("bytes_remaining")
            if isinstance(sent, int):
                total = sent + left if isinstance(left, int) else None
                note = f"dirty {status['dirty_pages_rate']} pages/s" if status.get("dirty_pages_rate") else ""
                bar.update(task, completed=sent, total=total, note=note)
            time.sleep(0.1)
    fail(f"{domain}: still {doing} after {FOLLOW_TIMEOUT:.0f} s")


def _until_arrived(client: Client, domain: str) -> None:
    """Until a restored domain runs (or is paused, with -p); its failure's reason otherwise."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT
    while time.monotonic() < deadline:
        status = _migration(client, domain)
        if status is None:
            fail(f"{domain} could not be restored: see `slimvisor dmesg` and its console log")
        assert status is not None
        if status["state"] in ("running", "blocked", "paused"):
            return
        time.sleep(0.05)
    fail(f"{domain}: not restored after {FOLLOW_TIMEOUT:.0f} s")
