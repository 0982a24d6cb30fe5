"""One-command clusters: N domains from one template on one dom0 switch, root disks CoW overlays.

`cluster up` makes, in order: a switch named after the cluster, one copy-on-write overlay per node
over the template's first disk (the base is only ever read), and the domains node1..N with an
address each (sv.ip=), every node's name resolvable on every node (sv.hosts=), and the addresses
recorded in the xenstore (/local/domain/ID/attr/ip, readable by the node itself, and
/tool/slimvisor/cluster/NAME). What it made is written down in STATE/clusters/NAME.json before it
is made, so `cluster down` removes exactly that, also after a daemon restart, and a failure half-way
rolls back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimvisor.model.spec import DiskSpec, NetSpec, SpecError, check_name
from slimvisor.runtime.paths import state_dir
from slimvisor.toolstack import api, domains
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.registry import Operation, Toolstack
from slimvisor.toolstack.xlcfg import DomainConfig, parse_xlcfg

MAX_NODES = 253  # one /24, the network and broadcast addresses and .254 left out
DEFAULT_SUBNET = "10.77.0.0/24"
XENSTORE_ROOT = "/tool/slimvisor/cluster"


@dataclass
class Cluster:
    name: str
    switch: str
    subnet: str
    nodes: list[str] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # in a pool: the other members running nodes of it

    @staticmethod
    def path(name: str) -> Path:
        directory = state_dir() / "clusters"
        directory.mkdir(exist_ok=True)
        return directory / f"{name}.json"

    def save(self) -> None:
        tmp = self.path(self.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        tmp.rename(self.path(self.name))

    @classmethod
    def load(cls, name: str) -> Cluster:
        try:
            return cls(**json.loads(cls.path(name).read_text()))
        except FileNotFoundError:
            raise SpecError(f"no cluster {name!r}") from None

    def overlay_dir(self) -> Path:
        return state_dir() / "clusters" / self.name


def default_template() -> str:
    """A 64 MiB busybox node on slimvisor's cached guest image."""
    from slimvisor.images.cache import busybox_assets

    _, rootfs = busybox_assets()
    return f'memory = 64\ndisk = ["{rootfs},raw,xvda,ro"]\n'


def up(ts: Toolstack, name: str, count: int, template: str | None, filename: str, cwd: Path,
       prefix: str = "node", subnet: str = DEFAULT_SUBNET,
       only: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Make the cluster; in a pool, its nodes are spread over the members (placement), each member
    making its part (`only`: the nodes of this member's part, as the member that placed them said)."""
    check_name(name)
    if not 1 <= count <= MAX_NODES:
        raise SpecError(f"cluster size {count}: give 1..{MAX_NODES} nodes")
    if Cluster.path(name).exists():
        raise SpecError(f"cluster {name!r} exists (slimvisor cluster down {name})")
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as e:
        raise SpecError(f"subnet {subnet!r}: {e}") from None
    if net.version != 4 or net.num_addresses < count + 2:
        raise SpecError(f"subnet {subnet}: an IPv4 network with room for {count} nodes is needed")
    names = [f"{prefix}{k}" for k in range(1, count + 1)]
    for node in names:
        check_name(node)
        if node in ts.domains:
            raise SpecError(f"domain {node!r} already exists")
    text = template if template is not None else default_template()
    base_cfg = parse_xlcfg(text + f'\nname = "{names[0]}"\n', filename, cwd=str(cwd))
    if not base_cfg.disks:
        raise SpecError(f"{filename}: the template needs a disk (its first disk is the nodes' base image)")
    base = Path(base_cfg.disks[0].path).resolve()
    addresses = {node: str(net.network_address + k) for k, node in enumerate(names, start=1)}
    hosts = ",".join(f"{node}={addr}" for node, addr in addresses.items())
    parts = _spread(ts, names, base_cfg) if ts.pool is not None and only is None else {}
    here = only if only is not None else parts.get(ts.pool.m.host, []) if parts else names
    cluster = Cluster(name, switch=name, subnet=str(net))
    cluster.save()
    try:
        from slimvisor.network import switchd
        from slimvisor.storage.overlay import create_overlay

        if ts.pool is not None:
            ts.pool.switch_up(name)
        else:
            switchd.start(name, None)
        cluster.overlay_dir().mkdir(exist_ok=True)
        for member, nodes in parts.items():
            if member != ts.pool.m.host:
                cluster.members.append(member)
                cluster.save()
                with ts.pool.peer(member) as peer:
                    peer.call("cluster-up", cluster=name, count=count, template=text, filename=filename, cwd=str(cwd),
                              prefix=prefix, subnet=subnet, only=nodes)  # fmt: skip
        for node in here:
            overlay = cluster.overlay_dir() / f"{node}.overlay"
            cluster.overlays.append(str(overlay))
            cluster.save()
            create_overlay(str(overlay), str(base))
            cfg = _node_config(base_cfg, node, overlay, name, f"{addresses[node]}/{net.prefixlen}", hosts)
            cluster.nodes.append(node)
            cluster.save()
            dom = domains.create(ts, cfg, config_file=filename)
            _record(ts, cluster, node, dom.record.domid, addresses[node])
    except BaseException:
        down(ts, name)
        raise
    placed = {node: member for member, nodes in parts.items() for node in nodes}
    return {"cluster": name, "switch": name,
            "nodes": [{"name": n, "ip": addresses[n], **({"host": placed[n]} if n in placed else {})}
                      for n in (names if only is None else only)]}  # fmt: skip


def _spread(ts: Toolstack, names: list[str], cfg: DomainConfig) -> dict[str, list[str]]:
    """Each node's pool member, placed one after the other (each placed node counts against its member)."""
    parts: dict[str, list[str]] = {}
    planned: dict[str, int] = {}
    for node in names:
        member = ts.pool.place(cfg.memory_mib, cfg.type, planned=planned).name
        planned[member] = planned.get(member, 0) + cfg.memory_mib
        parts.setdefault(member, []).append(node)
    return parts


def _node_config(template: DomainConfig, node: str, overlay: Path, switch: str, address: str,
                 hosts: str) -> DomainConfig:  # fmt: skip
    disks = [DiskSpec(str(overlay), format="overlay"), *template.disks[1:]]
    cmdline = f"{template.cmdline} sv.hostname={node} sv.ip={address} sv.hosts={hosts}".strip()
    return dataclasses.replace(template, name=node, disks=disks, nets=[NetSpec(switch)], cmdline=cmdline,
                               uuid=None, warnings=[])  # fmt: skip


def _record(ts: Toolstack, cluster: Cluster, node: str, domid: int, address: str) -> None:
    from slimvisor.xenstore.store import domain_path

    ts.dom0.write(f"{domain_path(domid)}/attr/ip", address.encode())
    ts.dom0.write(f"{XENSTORE_ROOT}/{cluster.name}/{node}/ip", address.encode())
    ts.dom0.write(f"{XENSTORE_ROOT}/{cluster.name}/{node}/domid", str(domid).encode())


def down(ts: Toolstack, name: str) -> dict[str, Any]:
    """Remove every node, the switch, the overlays and the records; what is already gone is skipped."""
    check_name(name)
    cluster = Cluster.load(name)
    destroyed = [node for node in cluster.nodes if node in ts.domains]
    for member in cluster.members:  # the parts on other pool members first
        with contextlib.suppress(ApiError, OSError), ts.pool.peer(member) as peer:
            destroyed += peer.call("cluster-down", cluster=name)["destroyed"]
    for node in destroyed:
        if node in ts.domains:
            domains.destroy_and_wait(ts, node)
    from slimvisor.toolstack.pool import stop_switch

    with contextlib.suppress(SpecError, OSError):
        stop_switch(cluster.switch)
    shutil.rmtree(cluster.overlay_dir(), ignore_errors=True)
    with contextlib.suppress(Exception):
        ts.dom0.rm(f"{XENSTORE_ROOT}/{name}")
    Cluster.path(name).unlink(missing_ok=True)
    return {"cluster": name, "destroyed": destroyed}


def names() -> list[str]:
    directory = state_dir() / "clusters"
    return sorted(p.stem for p in directory.glob("*.json")) if directory.exists() else []


def op_cluster_up(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    count, template = req.get("count"), req.get("template")
    if not isinstance(count, int) or not (template is None or isinstance(template, str)):
        raise ApiError(api.E_BAD_REQUEST, "cluster-up takes 'count' (an integer) and 'template' (text or null)")
    try:
        return up(ts, str(req.get("cluster", "cluster")), count, template,
                          str(req.get("filename", "<template>")), Path(str(req.get("cwd", "/"))),
                          prefix=str(req.get("prefix", "node")),
                          subnet=str(req.get("subnet", DEFAULT_SUBNET)), only=_only(req.get("only")))  # fmt: skip
    except SpecError as e:
        raise ApiError(api.E_CONFIG, str(e)) from None


def _only(value: Any) -> list[str] | None:
    if value is not None and not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise ApiError(api.E_BAD_REQUEST, "'only' is a list of node names")
    return value


def op_cluster_down(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    try:
        return down(ts, str(req.get("cluster", "cluster")))
    except SpecError as e:
        raise ApiError(api.E_NO_DOMAIN, str(e)) from None


def op_cluster_list(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return {"clusters": [dataclasses.asdict(Cluster.load(n)) for n in names()]}


OPERATIONS: dict[str, Operation] = {"cluster-up": op_cluster_up, "cluster-down": op_cluster_down,
                                    "cluster-list": op_cluster_list}  # fmt: skip
