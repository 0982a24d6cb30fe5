"""xl's save, restore and migrate: a domain's state into a file, or to another host's slimvisord.

What travels first is the domain's description (`describe`: its record, spec, disk sizes and
xenstore subtree), then its engine's state; the domain's supervisor runs the engine's part and the
handshake (domain.migration). The target checks everything it can before the source sends a byte:
the engine can migrate this domain, the disks are the same images (shared storage: same path, same
size), the kernel and initramfs exist, the name and uuid are free. A domain arrives under the same
name and uuid, with a domid of the target's, its on_* policies, weight and cap, and its pinning
(CPUs the target lacks are dropped, and said so).

    migrate:          {"domain", "target": {"daemon": PATH} | {"command": SH} | {"pool": MEMBER | null},
                       "live", "paused"}
    migrate-receive:  {"image": DESCRIPTION, "paused"}  (the connection then carries the state)
    save:             {"domain", "path", "then": "destroy" | "keep" | "pause"}
    restore:          {"path", "paused"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
from typing import Any

from slimvisor.domain import supervisor
from slimvisor.domain.check import check_spec
from slimvisor.domain.supervisor import Record, domains_dir
from slimvisor.engines import Unsupported, engine_for
from slimvisor.model.lifecycle import Policies
from slimvisor.model.spec import NAME, DomainSpec, SpecError
from slimvisor.toolstack import api, xenstore
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.registry import Domain, Operation, Toolstack, call, find_domain

log = logging.getLogger("slimvisord")

IMAGE_VERSION = 1
SAVE_MAGIC = "slimvisor-save"  # a save file's first line: {"magic": SAVE_MAGIC, "image": DESCRIPTION}
MAX_IMAGE = api.MAX_LINE // 2  # a description (its xenstore subtree) beyond this is refused
CONNECT_TIMEOUT = 60.0  # to reach the target and have it ready (its engine started, waiting)


# -- what travels ahead of the state -------------------------------------------------------------
def describe(ts: Toolstack, dom: Domain) -> dict[str, Any]:
    """The domain as the other side needs it to start an engine that can take its state."""
    if dom.crashed is not None or dom.record.spec is None:
        raise ApiError(api.E_FAILED, f"{dom.name} is not running")
    spec = DomainSpec.from_json(dom.record.spec)
    try:
        engine_for(spec).check_migratable(spec)
    except Unsupported as e:
        raise ApiError(api.E_NOT_SUPPORTED, f"{dom.name}: {e}") from None
    from slimvisor.storage import probe_disk

    r = dom.record
    image = {
        "version": IMAGE_VERSION, "from": {"host": platform.node(), "domid": r.domid},
        "record": {"name": r.name, "uuid": r.uuid, "memory_mib": r.memory_mib, "maxmem_mib": r.maxmem_mib,
                   "vcpus": r.vcpus, "policies": r.policies.__dict__, "config_file": r.config_file,
                   "cpu_weight": r.cpu_weight, "cap": r.cap, "cpus": r.cpus, "vcpu_cpus": r.vcpu_cpus,
                   "spec": r.spec, "initrd": r.initrd},
        "disks": [probe_disk(d.path, d.format, d.readonly, locked_ok=True) for d in spec.disks],
        "xenstore": xenstore.subtree(ts, r.domid),
    }  # fmt: skip
    if len(json.dumps(image)) > MAX_IMAGE:
        raise ApiError(api.E_FAILED, f"{dom.name}: its xenstore subtree is too large to carry (over {MAX_IMAGE} bytes)")
    return image


def _checked(image: Any) -> tuple[Record, DomainSpec, list[int], dict[str, str], list[str]]:
    """A description from elsewhere (another host, a file), checked as untrusted: the record, the
    spec, the disk sizes, the xenstore nodes, and what was dropped (warnings)."""
    def bad(why: str) -> ApiError:
        return ApiError(api.E_CONFIG, f"not a slimvisor domain image: {why}")

    if not isinstance(image, dict) or image.get("version") != IMAGE_VERSION:
        version = image.get("version") if isinstance(image, dict) else None
        raise bad(f"version {version!r}, this host reads {IMAGE_VERSION}")
    r, sizes, nodes = image.get("record"), image.get("disks"), image.get("xenstore")
    if not isinstance(r, dict) or not isinstance(sizes, list) or not isinstance(nodes, dict):
        raise bad("record, disks or xenstore missing")
    try:
        spec = DomainSpec.from_json(r["spec"])
        if not NAME.fullmatch(str(r["name"])) or r["name"] != spec.name:
            raise bad(f"name {r['name']!r}")
        record = Record(domid=0, name=spec.name, uuid=str(r["uuid"]), memory_mib=int(r["memory_mib"]),
                        maxmem_mib=int(r["maxmem_mib"]), vcpus=int(r["vcpus"]), policies=Policies(**r["policies"]),
                        config_file=r.get("config_file"), cpu_weight=r.get("cpu_weight"), cap=r.get("cap"),
                        cpus=r.get("cpus"), vcpu_cpus=r.get("vcpu_cpus"), spec=r["spec"],
                        initrd=r.get("initrd"))  # fmt: skip
    except (KeyError, TypeError, ValueError, SpecError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if record.initrd is not None and not isinstance(record.initrd, str):
        raise bad("initrd")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in nodes.items()):
        raise bad("xenstore nodes are not strings")
    if len(sizes) != len(spec.disks) or not all(isinstance(n, int) for n in sizes):
        raise bad("disk sizes do not match the disks")
    warnings = []
    ncpus = os.cpu_count() or 1
    if record.cpus is not None:
        kept = [c for c in record.cpus if isinstance(c, int) and 0 <= c < ncpus]
        if kept != record.cpus:
            warnings.append(f"cpus: {sorted(set(record.cpus) - set(kept))} are not on this host ({ncpus} CPUs): "
                            f"{'pinned to ' + str(kept) if kept else 'not pinned'}")  # fmt: skip
        record.cpus = kept or None
    if record.vcpu_cpus:
        pins = {v: [c for c in cs if isinstance(c, int) and 0 <= c < ncpus] for v, cs in record.vcpu_cpus.items()}
        dropped = sorted(v for v, cs in pins.items() if not cs)
        if dropped:
            warnings.append(f"vcpu-pin of vCPU {', '.join(dropped)}: none of its CPUs is on this host: dropped")
        record.vcpu_cpus = {v: cs for v, cs in pins.items() if cs} or None
    return record, spec, sizes, nodes, warnings


def arrive(ts: Toolstack, image: Any, fd: int, *, peer: bool, paused: bool) -> tuple[Domain, list[str]]:
    """Start the domain `image` describes, its engine waiting for the state on `fd` (its supervisor
    takes a copy); on any failure nothing of it is left here."""
    record, spec, sizes, nodes, warnings = _checked(image)
    if spec.name in ts.domains:
        raise ApiError(api.E_EXISTS, f"domain {spec.name!r} already exists here")
    if any(d.record.uuid == record.uuid for d in ts.domains.values()):
        raise ApiError(api.E_EXISTS, f"a domain with uuid {record.uuid} already exists here")
    try:
        if ts.pool is not None:
            for net in spec.nets:  # a switch name is pool-wide: this member's joins the others'
                ts.pool.switch_up(net.switch)
        engine_for(spec).check_migratable(spec)
        warnings += check_spec(spec, locked_ok=True)
    except Unsupported as e:
        raise ApiError(api.E_NOT_SUPPORTED, str(e)) from None
    except SpecError as e:
        raise ApiError(api.E_CONFIG, f"{spec.name} cannot run here: {e}") from None
    from slimvisor.storage import probe_disk

    for i, (disk, size) in enumerate(zip(spec.disks, sizes, strict=True)):
        if (here := probe_disk(disk.path, disk.format, disk.readonly, locked_ok=True)) != size:
            raise ApiError(api.E_CONFIG, f"disk {i} ({disk.path}) is {here} bytes here and {size} bytes where the "
                           "domain runs: disks must be shared storage (the same image under the same path)")
    from slimvisor.toolstack.domains import launch, next_domid

    record.domid = next_domid(ts)
    record.fence = ts.pool.fence_path(record.policies.on_crash.value) if ts.pool is not None else None
    rundir = domains_dir() / spec.name
    try:
        rundir.mkdir(mode=0o700)
    except FileExistsError:
        raise ApiError(api.E_EXISTS, f"domain {spec.name!r} already exists here (run dir {rundir})") from None
    starting = supervisor.hold_starting(rundir)
    try:
        dom = launch(ts, record, rundir, paused, spec, incoming=(fd, peer))
        xenstore.carry_over(ts, record, nodes)
    except BaseException:
        xenstore.forget(ts, record.domid, release=False)
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    finally:
        os.close(starting)
    log.info("%s arriving (domain %d) from %s", spec.name, record.domid, "a peer" if peer else "a file")
    return dom, warnings


# -- operations ------------------------------------------------------------------------------------
def op_migrate(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    dom = find_domain(ts, req)
    image = describe(ts, dom)
    member = _member(ts, dom, req.get("target"))
    channel = ts.pool.channel(member) if member is not None else _connect(req.get("target"))
    try:
        target = api.Client(sock=channel, timeout=CONNECT_TIMEOUT)
        reply = target.call("migrate-receive", image=image, paused=bool(req.get("paused")))
        if member is not None:
            ts.pool.moving(dom.name, member)  # the target adopts its pool record once the domain runs there
        channel.settimeout(None)
        started = call(dom, "migrate", fds=(channel.fileno(),), live=bool(req.get("live", True)), peer=True)
    finally:
        channel.close()  # the supervisor has its own copy; the target sees EOF if it has none
    log.info("%s migrating to domain %s of %s", dom.name, reply.get("domain"), reply.get("host"))
    return {"target_domain": reply.get("domain"), "target_host": member or reply.get("host"),
            "warnings": [*started.get("warnings", []), *reply.get("warnings", [])]}  # fmt: skip


def _member(ts: Toolstack, dom: Domain, target: Any) -> str | None:
    """The pool member a migration goes to (`{"pool": NAME}`, or `{"pool": None}`: placement's
    choice among the others), or None for a target outside the pool."""
    if not (isinstance(target, dict) and "pool" in target):
        return None
    if ts.pool is None:
        raise ApiError(api.E_CONFIG, "this host is in no pool: give the target's daemon or a command")
    name = target["pool"]
    if name is not None and not isinstance(name, str):
        raise ApiError(api.E_BAD_REQUEST, "target {'pool': NAME} names a member")
    if name == ts.pool.m.host:
        raise ApiError(api.E_CONFIG, f"{dom.name} already runs on {name}")
    spec = dom.record.spec or {}
    return str(ts.pool.place(dom.record.memory_mib, str(spec.get("type", "pv")), name, exclude=(ts.pool.m.host,)).name)


def _connect(target: Any) -> socket.socket:
    """A stream to the target's slimvisord: its API socket, or a command's stdin and stdout
    (`ssh HOST slimvisor migrate-receive`, which relays to the daemon there)."""
    if isinstance(target, dict) and isinstance(target.get("daemon"), str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(target["daemon"])
        except OSError as e:
            sock.close()
            raise ApiError(api.E_FAILED, f"target slimvisord {target['daemon']}: {e.strerror or e}") from None
        return sock
    if isinstance(target, dict) and isinstance(target.get("command"), str):
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", target["command"]], stdin=theirs.fileno(), stdout=theirs.fileno(),
                                    stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        except OSError as e:
            ours.close()
            raise ApiError(api.E_FAILED, f"{target['command']}: {e.strerror or e}") from None
        finally:
            theirs.close()
        _reap_later(proc)
        return ours
    raise ApiError(api.E_BAD_REQUEST, "target is {'daemon': SOCKET}, {'command': SHELL COMMAND} or {'pool': MEMBER}")


_children: list[subprocess.Popen[bytes]] = []


def _reap_later(proc: subprocess.Popen[bytes]) -> None:
    """The relay command lives as long as the migration; it is reaped on a later call (no zombies pile up)."""
    _children[:] = [p for p in _children if p.poll() is None]
    _children.append(proc)


def op_migrate_receive(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """The target's side: the connection this request came on carries the state next (the daemon
    hands it to the new domain's supervisor and stops reading it)."""
    conn = req.get("_connection")
    if not isinstance(conn, socket.socket):
        raise ApiError(api.E_BAD_REQUEST, "migrate-receive is for a migration's source over a connection")
    dom, warnings = arrive(ts, req.get("image"), conn.fileno(), peer=True, paused=bool(req.get("paused")))
    return {"domain": dom.record.domid, "host": platform.node(), "warnings": warnings, "_handoff": True}


def op_save(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    dom = find_domain(ts, req)
    path, then = req.get("path"), req.get("then", "destroy")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ApiError(api.E_BAD_REQUEST, "save takes an absolute 'path'")
    if then not in ("destroy", "keep", "pause"):
        raise ApiError(api.E_BAD_REQUEST, "then is destroy, keep or pause")
    image = describe(ts, dom)
    part = f"{path}.part"
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ApiError(api.E_FAILED, f"{path}: {e.strerror}") from None
    try:
        os.write(fd, json.dumps({"magic": SAVE_MAGIC, "image": image}).encode() + b"\n")
        call(dom, "migrate", fds=(fd,), live=False, peer=False, then=then, file=[part, path])
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    finally:
        os.close(fd)
    return {"path": path}


def op_restore(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    path = req.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ApiError(api.E_BAD_REQUEST, "restore takes an absolute 'path'")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ApiError(api.E_CONFIG, f"{path}: {e.strerror}") from None
    try:
        head = os.pread(fd, MAX_IMAGE + 1, 0)
        line, nl, _ = head.partition(b"\n")
        try:
            saved = json.loads(line) if nl else None
        except ValueError:
            saved = None
        if not isinstance(saved, dict) or saved.get("magic") != SAVE_MAGIC:
            raise ApiError(api.E_CONFIG, f"{path}: not a slimvisor save file")
        os.lseek(fd, len(line) + 1, os.SEEK_SET)  # the engine's state follows the description
        dom, warnings = arrive(ts, saved.get("image"), fd, peer=False, paused=bool(req.get("paused")))
    except ApiError as e:
        raise ApiError(e.code, f"{path}: {e.message}" if not e.message.startswith(path) else e.message) from None
    finally:
        os.close(fd)
    return {"domain": dom.record.domid, "name": dom.name, "warnings": warnings}


OPERATIONS: dict[str, Operation] = {
    "migrate": op_migrate, "migrate-receive": op_migrate_receive, "save": op_save, "restore": op_restore,
}  # fmt: skip
HANDOFF = frozenset({"migrate-receive"})  # operations given the request's connection ("_connection")


__all__ = ["HANDOFF", "OPERATIONS", "arrive", "describe"]
