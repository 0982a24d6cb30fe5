"""A domain's part of the daemon's xenstore: the nodes libxl writes for it, its channel, its removal."""

from __future__ import annotations

import contextlib
from pathlib import Path

from slimvisor.domain.supervisor import Record
from slimvisor.model import units
from slimvisor.toolstack.registry import Toolstack
from slimvisor.xenstore import XENSTORE_VSOCK_PORT
from slimvisor.xenstore.store import domain_path
from slimvisor.xenstore.wire import Perm


def introduce(ts: Toolstack, record: Record, cid: int | None) -> None:
    """The nodes libxl writes for a new domain, readable by it; data/ is the guest's to write.
    `cid`: its vsock's, the guest's way to its xenstore (None: it has none, xen_platform_pci=0)."""
    base = domain_path(record.domid)
    guest_reads = [Perm(0, "n"), Perm(record.domid, "r")]
    entries = {
        "": b"", "name": record.name.encode(), "domid": str(record.domid).encode(),
        "vm": f"/vm/{record.uuid}".encode(), "memory/target": str(units.kib(record.memory_mib * units.MiB)).encode(),
        "memory/static-max": str(units.kib(record.maxmem_mib * units.MiB)).encode(),
        **{f"cpu/{n}/availability": b"online" for n in range(record.vcpus)},
        "control/shutdown": b"", **({"device/vsock/cid": str(cid).encode()} if cid is not None else {}),
    }  # fmt: skip
    with contextlib.suppress(Exception):
        ts.dom0.rm(base)
    for key, value in entries.items():
        path = f"{base}/{key}".rstrip("/")
        ts.dom0.write(path, value)
        ts.dom0.set_perms(path, guest_reads)
    for writable in ("data", "attr", "control/shutdown", "control/feature-poweroff", "control/feature-reboot"):
        ts.dom0.write(f"{base}/{writable}", b"") if not ts.dom0.exists(f"{base}/{writable}") else None
        ts.dom0.set_perms(f"{base}/{writable}", [Perm(record.domid, "n")])
    ts.dom0.write(f"/vm/{record.uuid}/name", record.name.encode())
    with contextlib.suppress(Exception):
        ts.store.introduce(record.domid)


def serve_domain(ts: Toolstack, domid: int, rundir: Path) -> None:
    """Serve the domain's xenstore channel (its vsock port, a Unix socket in its run directory)."""
    if domid not in ts.xenstore.domain_listeners():
        ts.xenstore.listen_domain(str(rundir / f"vsock_{XENSTORE_VSOCK_PORT}"), domid)


def forget(ts: Toolstack, domid: int, *, release: bool = True) -> None:
    """Close the domain's channel and remove its subtree (and its quota's connection, `release`)."""
    ts.xenstore.forget_domain(domid)
    with contextlib.suppress(Exception):
        ts.dom0.rm(domain_path(domid))
    if release:
        with contextlib.suppress(Exception):
            ts.store.release(domid)


def set_memory_target(ts: Toolstack, domid: int, nbytes: int) -> None:
    """memory/target, in KiB as libxl writes it."""
    ts.dom0.write(f"{domain_path(domid)}/memory/target", str(units.kib(nbytes)).encode())


def subtree(ts: Toolstack, domid: int) -> dict[str, str]:
    """The domain's nodes (relative path -> value) as they are now: what a migration carries along."""
    base = domain_path(domid)
    out: dict[str, str] = {}

    def walk(rel: str) -> None:
        path = f"{base}/{rel}".rstrip("/")
        with contextlib.suppress(Exception):
            out[rel] = ts.dom0.read(path).decode(errors="replace")
            for child in ts.dom0.directory(path):
                walk(f"{rel}/{child}".lstrip("/"))

    walk("")
    return out


def carry_over(ts: Toolstack, record: Record, nodes: dict[str, str]) -> None:
    """Write what another host's `subtree` held under the arrived domain's own (new) domid: what
    the guest and the tools wrote (data/, control/, ...); the nodes `introduce` made are its own."""
    base = domain_path(record.domid)
    made = {"", "name", "domid", "vm"}
    for rel, value in sorted(nodes.items()):
        if rel in made or rel.startswith("memory/") or rel.startswith("cpu/") or rel.startswith("device/vsock"):
            continue
        path = f"{base}/{rel}"
        with contextlib.suppress(Exception):
            new = not ts.dom0.exists(path)
            ts.dom0.write(path, value.encode())
            if new:
                ts.dom0.set_perms(path, [Perm(0, "n"), Perm(record.domid, "r")])
