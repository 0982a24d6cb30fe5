"""The xl-style commands: `slimvisor create|list|console|pause|...`, each one call of the public API.

Nothing here touches a domain, a process or a file of dom0's directly: every command is a
request to slimvisord (started on demand), so scripts and other clients get the same behaviour.
The one exception is `mem-set` on a `slimvisor run` domain, which no daemon knows: it asks that
domain's runner over its control socket.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import click

from slimvisor.cli.fail import fail
from slimvisor.model.spec import SpecError
from slimvisor.toolstack.api import ApiError, Client
from slimvisor.toolstack.errors import exit_status

# xl list's State column: one letter a state, in this order (xl(1), "list").
_STATE_FLAGS = "rbpscd"
_STATES = ("running", "blocked", "paused", "shutdown", "crashed", "dying")


@contextmanager
def daemon_client() -> Iterator[Client]:
    try:
        with Client() as client:
            yield client
    except ApiError as e:
        fail(e.message, exit_status(e))
    except OSError as e:
        fail(f"slimvisord: {e.strerror or e}")


def table_console() -> Any:
    """rich's Console for tables; into a pipe or a file (a script) names are never cut to 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=4096)


def xl_state(state: str) -> str:
    """xl's letters; a state xl has no letter for (migrating) is spelled out."""
    if state not in _STATES:
        return state
    return "".join(f if state == s else "-" for f, s in zip(_STATE_FLAGS, _STATES, strict=True))


def register(cli: click.Group) -> None:
    for command in (create, list_, console, pause, unpause, shutdown, reboot, destroy, mem_set, sched_credit,
                    vcpu_pin, top, info, dmesg, xenstore_read, xenstore_write, xenstore_ls, xenstore_rm,
                    xenstore_watch, cluster, daemon):  # fmt: skip
        cli.add_command(command)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("-c", "attach", is_flag=True, help="Attach to the console once created.")
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused after creating it.")
@click.option("-n", "--dryrun", is_flag=True, help="Check the config as create would, print the domain as JSON, "
              "start nothing.")  # fmt: skip
@click.option("--host", default=None, help="In a pool: the member to create it on [default: placement's choice].")
def create(config: Path, overrides: tuple[str, ...], attach: bool, paused: bool, dryrun: bool,
           host: str | None) -> None:  # fmt: skip
    """Create a domain from an xl.cfg file; KEY=VALUE pairs override the file, as with `xl create`."""
    try:
        text = config.read_text()
    except OSError as e:
        fail(f"{config}: {e.strerror}")
        return
    if dryrun:  # in this process, as xl -n needs no hypervisor: same parser and checks as the daemon's
        from slimvisor.model.spec import SpecError
        from slimvisor.toolstack.xlcfg import config_json, load

        try:
            parsed = load(text, str(config), list(overrides), os.getcwd())
        except SpecError as e:
            fail(str(e))
        for warning in parsed.warnings:
            click.echo(f"slimvisor: warning: {warning}", err=True)
        click.echo(json.dumps(config_json(parsed), indent=2))
        return
    with daemon_client() as client:
        reply = client.call("create", config=text, filename=str(config), overrides=list(overrides),
                            cwd=os.getcwd(), paused=paused, **({"host": host} if host else {}))  # fmt: skip
        for warning in reply.get("warnings", []):
            click.echo(f"slimvisor: warning: {warning}", err=True)
        on = f" on {reply['host']}" if "host" in reply else ""
        click.echo(f"Domain {reply['name']} created (id {reply['domain']}){on}", err=True)
        if "host" in reply and reply["host"] != client.call("pool-list")["host"]:
            if attach:  # a member's consoles are its own, as with xl console on that host
                fail(f"{reply['name']} runs on {reply['host']}: its console is there "
                     f"(slimvisor console {reply['name']})")  # fmt: skip
            return
        if paused:  # the daemon pauses it once its mconsole answers: return only when it is paused
            _until_state(client, reply["name"], "paused", 70)
    if attach:
        _attach(reply["name"])


def _until_state(client: Client, domain: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        row = next((r for r in client.call("list")["domains"] if r["name"] == domain), None)
        if row is not None and row["state"] == state:
            return
        if row is None or time.monotonic() > deadline:
            fail(f"{domain} is {row['state'] if row else 'gone'}, not {state}")
        time.sleep(0.05)


@click.command("list")
@click.argument("domains", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--pool", "pool", is_flag=True, help="Every domain of this host's pool, with its host.")
def list_(domains: tuple[str, ...], as_json: bool, pool: bool) -> None:
    """Domains with their id, memory, vCPUs, state and CPU time, like `xl list`."""
    with daemon_client() as client:
        if pool:
            _pool_domains(client, as_json)
            return
        rows = client.call("list")["domains"]
    if domains:
        rows = [r for r in rows if r["name"] in domains or str(r["domid"]) in domains]
        missing = set(domains) - {r["name"] for r in rows} - {str(r["domid"]) for r in rows}
        if missing:
            fail(f"no domain {', '.join(sorted(missing))}")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("Name", "ID", "Mem", "VCPUs", "State", "Time(s)", box=None, header_style="bold")
    for r in rows:
        table.add_row(r["name"], str(r["domid"]), str(r["memory_mib"]), str(r["vcpus"]), xl_state(r["state"]),
                      f"{r['time_s']:.1f}")  # fmt: skip
    table_console().print(table)


def _pool_domains(client: Client, as_json: bool) -> None:
    """`slimvisor list --pool`: every domain of the pool with its host."""
    try:
        rows = client.call("pool-list")["domains"]
    except ApiError as e:
        fail(e.message)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("Name", "Host", "Type", "Mem", "State", box=None, header_style="bold")
    for r in rows:
        table.add_row(str(r["name"]), str(r["host"]) + (f" -> {r['moving_to']}" if r.get("moving_to") else ""),
                      str(r["type"]), str(r["memory_mib"]), xl_state(str(r["state"])))  # fmt: skip
    table_console().print(table)


@click.command()
@click.argument("domain")
def console(domain: str) -> None:
    """Attach to a domain's console; Ctrl-] detaches. Several viewers may attach at once."""
    _attach(domain)


def _attach(domain: str) -> None:
    import selectors
    import socket

    from slimvisor.domain.console import ESCAPE, raw_terminal

    with daemon_client() as client:
        _, fds = client.call_with_fds("console", domain=domain)
    if not fds:
        fail(f"{domain}: the daemon sent no console")
    sock = socket.socket(fileno=fds[0])
    for extra in fds[1:]:
        os.close(extra)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    with raw_terminal(0) as interactive:
        with suppress(ValueError, OSError):
            sel.register(0, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return
                    os.write(1, data)
                    continue
                data = os.read(0, 4096)
                if not data:
                    sel.unregister(0)  # piped input ended: keep showing output
                    continue
                if interactive and ESCAPE in data:
                    data = data.split(ESCAPE, 1)[0]
                    if data:
                        sock.sendall(data)
                    return
                sock.sendall(data)


def _simple(op: str, help_text: str) -> click.Command:
    @click.command(op, help=help_text)
    @click.argument("domain")
    def command(domain: str) -> None:
        with daemon_client() as client:
            client.call(op, domain=domain)

    return command


pause = _simple("pause", "Pause a domain (UML's mconsole stop).")
unpause = _simple("unpause", "Resume a paused domain (mconsole go).")
destroy = _simple("destroy", "Stop a domain at once, whatever state it is in.")


def _until_gone(client: Client, domain: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.call("list")["domains"]
        row = next((r for r in rows if domain in (r["name"], str(r["domid"]))), None)
        if row is None or row["state"] in ("shutdown", "crashed"):
            return
        time.sleep(0.2)
    fail(f"{domain} did not go down within {timeout:.0f} s")


@click.command()
@click.argument("domain")
@click.option("-w", "wait", is_flag=True, help="Wait until the domain is down.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds before the domain is destroyed instead.")
def shutdown(domain: str, wait: bool, timeout: float) -> None:
    """Ask the guest to power off through its own path (ctrl-alt-del); destroy it after --timeout."""
    with daemon_client() as client:
        client.call("shutdown", domain=domain, timeout=timeout)
        if wait:
            _until_gone(client, domain, timeout + 10)


@click.command()
@click.argument("domain")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds before the domain is destroyed instead.")
def reboot(domain: str, timeout: float) -> None:
    """Ask the guest to reboot; its on_reboot policy then applies."""
    with daemon_client() as client:
        client.call("reboot", domain=domain, timeout=timeout)


@click.command("mem-set")
@click.argument("name")
@click.argument("size")
def mem_set(name: str, size: str) -> None:
    """Set a running domain's memory target (balloon); SIZE like 128M, as `xl mem-set`."""
    from slimvisor.model import units
    from slimvisor.runtime.control import ControlError, request
    from slimvisor.runtime.paths import runtime_base

    try:
        target = units.parse_size(size, "size", multiple_of=units.MiB)
    except units.SizeError as e:
        fail(str(e))
    if _mem_set_via_daemon(name, target):
        return
    # A `slimvisor run` domain, which no daemon knows: its runner's control socket.
    controls = sorted(runtime_base().glob(f"{name}-*/control.sock"))
    if not controls:
        fail(f"no running domain {name} with a control socket (was it started with --balloon?)")
    try:
        request(str(controls[0]), {"op": "balloon-set", "target_bytes": target})
    except ControlError as e:
        fail(f"{name}: {e}")


def _mem_set_via_daemon(domain: str, target: int) -> bool:
    """`mem-set` for a domain the daemon runs; False when no daemon knows it (a `slimvisor run` domain)."""
    try:
        with Client(autostart=False) as client:
            client.call("mem-set", domain=domain, target_bytes=target)
    except ApiError as e:
        if e.code == "no-such-domain" or "not running" in e.message:
            return False
        fail(e.message, exit_status(e))
    return True


@click.command("sched-credit")
@click.option("-d", "--domain", help="Domain (name or id); all domains when omitted.")
@click.option("-w", "--weight", type=int, help="Credit weight 1..65535 (default 256): cgroup cpu.weight.")
@click.option("-c", "--cap", type=int, help="Cap in percent of one CPU, 0 for none: cgroup cpu.max.")
def sched_credit(domain: str | None, weight: int | None, cap: int | None) -> None:
    """Show or set a domain's CPU weight and cap, as `xl sched-credit`."""
    if domain is None and (weight is not None or cap is not None):
        fail("-w and -c need -d DOMAIN")
    with daemon_client() as client:
        rows = client.call("sched-credit", domain=domain, weight=weight, cap=cap)["domains"]
    click.echo(f"{'Name':<20} {'ID':>5} {'Weight':>7} {'Cap':>5}")
    for r in rows:
        click.echo(f"{r['name']:<20} {r['domid']:>5} {r.get('cpu_weight', '-')!s:>7} {r.get('cap', '-')!s:>5}")


@click.command("vcpu-pin")
@click.argument("domain")
@click.argument("vcpu")
@click.argument("cpus")
def vcpu_pin(domain: str, vcpu: str, cpus: str) -> None:
    """Pin a domain's vCPU to host CPUs (like `xl vcpu-pin d 0 1-3`; `all` unpins)."""
    from slimvisor.toolstack.xlcfg import parse_cpulist

    try:
        pinned = parse_cpulist(cpus, os.cpu_count() or 1)
        cpu_list: Any = "all" if pinned is None else sorted(pinned)
    except SpecError as e:
        fail(str(e))
        return
    with daemon_client() as client:
        client.call("vcpu-pin", domain=domain, vcpu="all" if vcpu == "all" else int(vcpu) if vcpu.isdigit() else vcpu,
                    cpus=cpu_list)  # fmt: skip


@click.command()
@click.option("-d", "--delay", default=1.0, show_default=True, help="Seconds between updates.")
@click.option("-b", "--batch", is_flag=True, help="Print plain text and exit after --iterations (for scripts).")
@click.option("-i", "--iterations", default=0, help="Updates before exiting (0: until Ctrl-C).")
def top(delay: float, batch: bool, iterations: int) -> None:
    """Live CPU, memory and I/O per domain, like xentop."""
    from rich.live import Live
    from rich.table import Table

    def table(prev: dict[str, Any] | None, now: dict[str, Any]) -> Table:
        t = Table("Name", "ID", "State", "CPU(sec)", "CPU(%)", "Mem(MiB)", "RSS(MiB)", "Read(KiB/s)",
                  "Write(KiB/s)", box=None, header_style="bold")  # fmt: skip
        before = {r["name"]: r for r in prev["domains"]} if prev else {}
        span = (now["time"] - prev["time"]) if prev else 0
        for r in now["domains"]:
            p = before.get(r["name"])
            rate = (lambda k: (r[k] - p[k]) / span) if p and span > 0 else (lambda k: 0.0)  # noqa: B023
            t.add_row(r["name"], str(r["domid"]), xl_state(r["state"]), f"{r['time_s']:.1f}",
                      f"{100 * rate('time_s'):.1f}", str(r["memory_mib"]), f"{r['rss_bytes'] / 2**20:.1f}",
                      f"{rate('read_bytes') / 1024:.0f}", f"{rate('write_bytes') / 1024:.0f}")  # fmt: skip
        return t

    with daemon_client() as client:
        prev = None
        count = 0
        out = table_console()
        live = None if batch else Live(console=out, auto_refresh=False)
        try:
            if live is not None:
                live.start()
            while True:
                now = client.call("top")
                if live is not None:
                    live.update(table(prev, now), refresh=True)
                else:
                    out.print(table(prev, now))
                prev = now
                count += 1
                if iterations and count >= iterations:
                    return
                time.sleep(delay)
        except KeyboardInterrupt:
            return
        finally:
            if live is not None:
                live.stop()


@click.command()
@click.argument("domain", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(domain: str | None, as_json: bool) -> None:
    """The host and the toolstack, like `xl info`; with DOMAIN, that domain: its jail's uid and
    root, its processes and limits."""
    with daemon_client() as client:
        reply = client.call("domain-info", domain=domain) if domain else client.call("info")
    reply.pop("id", None)
    reply.pop("ok", None)
    if domain:
        record = reply.pop("record")
        reply = {**reply.pop("domain"), **{k: record[k] for k in ("uid", "jail", "config_file")}, **reply}
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    for key, value in reply.items():
        click.echo(f"{key:<20}: {', '.join(map(str, value)) if isinstance(value, list) else value}")


@click.command()
def dmesg() -> None:
    """The toolstack daemon's log, as `xl dmesg` shows the hypervisor's."""
    with daemon_client() as client:
        for line in client.call("dmesg")["lines"]:
            click.echo(line)


@contextmanager
def _xenstore() -> Iterator[Any]:
    from slimvisor.xenstore.client import XenstoreClient
    from slimvisor.xenstore.wire import XenstoreError

    with daemon_client() as client:
        path = client.info["xenstore"]
    try:
        with XenstoreClient(path) as xs:
            yield xs
    except XenstoreError as e:
        fail(f"xenstore: {e}")
    except OSError as e:
        fail(f"xenstore: {path}: {e.strerror or e}")


@click.command("xenstore-read")
@click.argument("paths", nargs=-1, required=True)
def xenstore_read(paths: tuple[str, ...]) -> None:
    """Print the values at PATHS."""
    with _xenstore() as xs:
        for path in paths:
            click.echo(xs.read(path).decode(errors="replace"))


@click.command("xenstore-write")
@click.argument("pairs", nargs=-1, required=True, metavar="PATH VALUE [PATH VALUE]...")
def xenstore_write(pairs: tuple[str, ...]) -> None:
    """Write VALUE at PATH (several pairs are written in order)."""
    if len(pairs) % 2:
        fail("xenstore-write takes PATH VALUE pairs")
    with _xenstore() as xs:
        for path, value in zip(pairs[::2], pairs[1::2], strict=True):
            xs.write(path, value.encode())


@click.command("xenstore-ls")
@click.argument("path", default="/")
def xenstore_ls(path: str) -> None:
    """Every node below PATH with its value."""
    with _xenstore() as xs:
        for node, value in xs.ls(path):
            depth = node.count("/") - path.rstrip("/").count("/") - 1
            click.echo(f"{' ' * depth}{node.rsplit('/', 1)[1]} = \"{value.decode(errors='replace')}\"")


@click.command("xenstore-rm")
@click.argument("paths", nargs=-1, required=True)
def xenstore_rm(paths: tuple[str, ...]) -> None:
    """Remove PATHS and everything below them."""
    with _xenstore() as xs:
        for path in paths:
            xs.rm(path)


@click.command("xenstore-watch")
@click.argument("path")
@click.option("-n", "count", default=0, help="Exit after this many events (0: until Ctrl-C).")
def xenstore_watch(path: str, count: int) -> None:
    """Print the path of every change at or below PATH (the first event fires at once, as in Xen)."""
    with _xenstore() as xs:
        xs.sock.settimeout(None)
        xs.watch(path, "slimvisor")
        seen = 0
        try:
            for changed, _ in xs.watch_events():
                click.echo(changed)
                seen += 1
                if count and seen >= count:
                    return
        except KeyboardInterrupt:
            return


@click.group()
def cluster() -> None:
    """Clusters of domains from one template: one switch, CoW overlay root disks, names that resolve."""


@cluster.command("up")
@click.argument("count", type=int)
@click.option("--template", type=click.Path(dir_okay=False, path_type=Path),
              help="xl.cfg every node starts from; its first disk is the base image [default: busybox, 64 MiB].")
@click.option("--name", "name", default="cluster", show_default=True, help="Cluster (and switch) name.")
@click.option("--prefix", default="node", show_default=True, help="Node names: PREFIX1..PREFIXN.")
@click.option("--subnet", default="10.77.0.0/24", show_default=True, help="Addresses of the nodes, in order.")
def cluster_up(count: int, template: Path | None, name: str, prefix: str, subnet: str) -> None:
    """Start COUNT nodes; `cluster down` removes all of it."""
    from rich.console import Console

    text = None
    if template is not None:
        try:
            text = template.read_text()
        except OSError as e:
            fail(f"{template}: {e.strerror}")
    with daemon_client() as client, Console(stderr=True).status(f"starting {count} nodes of cluster {name}"):
        reply = client.call("cluster-up", cluster=name, count=count, template=text, cwd=os.getcwd(),
                            filename=str(template or "<default template>"), prefix=prefix, subnet=subnet)  # fmt: skip
    for node in reply["nodes"]:
        click.echo(f"{node['name']}\t{node['ip']}")


@cluster.command("down")
@click.argument("name", default="cluster")
def cluster_down(name: str) -> None:
    """Destroy the cluster's nodes, its switch and overlays."""
    with daemon_client() as client:
        reply = client.call("cluster-down", cluster=name)
    click.echo(f"cluster {name}: {len(reply['destroyed'])} nodes destroyed", err=True)


@cluster.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cluster_list(as_json: bool) -> None:
    """Clusters and their nodes."""
    with daemon_client() as client:
        clusters = client.call("cluster-list")["clusters"]
    if as_json:
        click.echo(json.dumps(clusters, indent=2))
        return
    for c in clusters:
        click.echo(f"{c['name']}: switch {c['switch']}, {c['subnet']}, nodes {' '.join(c['nodes'])}")


@click.group()
def daemon() -> None:
    """The toolstack daemon itself, slimvisord (any other command starts it on demand)."""


@daemon.command("stop")
@click.option("--timeout", default="30", show_default=True, metavar="S", help="Seconds to wait for it to exit.")
def daemon_stop(timeout: str) -> None:
    """Stop this run tree's slimvisord and return once it has exited; its domains keep running.

    It is found by the pid in its lock file (RUN/slimvisord.lock), asked over the API, and sent
    SIGTERM if it cannot be asked. The next command starts a daemon that re-attaches to the domains.
    """
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        fail(f"--timeout {timeout!r}: give a positive number of seconds")
    from slimvisor.toolstack import daemonctl

    try:
        pid = daemonctl.stop(timeout=seconds)
    except TimeoutError as e:
        fail(str(e))
        return
    except PermissionError:
        fail(f"slimvisord of {daemonctl.lock_path()}: not allowed to stop it (run as its user)")
        return
    if pid is None:
        click.echo("slimvisord is not running", err=True)
    else:
        click.echo(f"slimvisord (pid {pid}) stopped", err=True)
