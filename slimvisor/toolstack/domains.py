"""slimvisord's domain operations: create (and start again after a crash), list, control, destroy.

Each `op_*` takes the daemon (`registry.Toolstack`) and one API request and returns the reply
(docs/api.md); `OPERATIONS` names them for the daemon's dispatch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import psutil

from slimvisor.domain import supervisor
from slimvisor.domain.check import check_spec, fill_defaults
from slimvisor.domain.supervisor import Record, domains_dir
from slimvisor.model import units
from slimvisor.model.lifecycle import Action, Policies
from slimvisor.model.spec import DomainSpec, SpecError, VsockSpec
from slimvisor.runtime.control import ControlError
from slimvisor.runtime.paths import state_dir
from slimvisor.toolstack import api, scheduling, xenstore
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.registry import Domain, Operation, Toolstack, call, find_domain, is_supervisor, processes
from slimvisor.toolstack.xlcfg import DomainConfig, check_host, parse_xlcfg
from slimvisor.xenstore import XENSTORE_VSOCK_PORT
from slimvisor.xenstore.store import domain_path
from slimvisor.xenstore.wire import XenstoreError

log = logging.getLogger("slimvisord")

FIRST_VSOCK_CID = 3  # 0-2 are reserved (virtio spec 5.10.4); a domain's CID is domid + 2


def op_create(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    text, filename = req.get("config"), req.get("filename", "<config>")
    overrides, cwd = req.get("overrides", []), req.get("cwd", "/")
    if not isinstance(text, str) or not isinstance(overrides, list) or not isinstance(cwd, str):
        raise ApiError(api.E_BAD_REQUEST, "create takes 'config' (the file's text), 'overrides' and 'cwd'")
    host = req.get("host")
    if host is not None and not isinstance(host, str):
        raise ApiError(api.E_BAD_REQUEST, "'host' is a pool member's name")
    try:
        cfg = parse_xlcfg(text, str(filename), [str(o) for o in overrides], cwd)
        if cfg.name in ts.domains:  # before the host checks: the running domain holds its disks
            raise ApiError(api.E_EXISTS, f"domain {cfg.name!r} already exists")
        if ts.pool is not None and not req.get("placed"):  # a pool places it, maybe on another member
            chosen = ts.pool.place(cfg.memory_mib, cfg.type, host).name
            if chosen != ts.pool.m.host:
                with ts.pool.peer(chosen) as peer:
                    reply = peer.call("create", **{k: v for k, v in req.items() if k not in ("id", "op", "host")},
                                      placed=True)  # fmt: skip
                return {**{k: v for k, v in reply.items() if k not in ("id", "ok")}, "host": chosen}
        elif host is not None:
            raise ApiError(api.E_CONFIG, f"--host {host}: this host is in no pool")
        if ts.pool is not None:
            for net in cfg.nets:  # a switch name is pool-wide: this member's joins the others'
                ts.pool.switch_up(net.switch)
        check_host(cfg)
    except SpecError as e:
        raise ApiError(api.E_CONFIG, str(e)) from None
    try:
        dom = create(ts, cfg, config_file=str(filename), paused=bool(req.get("paused")))
    except SpecError as e:  # found when the domain is built (a missing kernel): name the file too
        raise ApiError(api.E_CONFIG, f"{filename}: {e}") from None
    reply = {"domain": dom.record.domid, "name": dom.name, "warnings": cfg.warnings}
    return reply if ts.pool is None else {**reply, "host": ts.pool.m.host}


def create(ts: Toolstack, cfg: DomainConfig, config_file: str | None = None, paused: bool = False,
           claimed: bool = False) -> Domain:  # fmt: skip
    """Start a domain from a parsed config (its paths absolute); on any failure nothing of it is left.
    In a pool its name and uuid are claimed pool-wide first (unless `claimed`: an HA restart's)."""
    if cfg.name in ts.domains:
        raise ApiError(api.E_EXISTS, f"domain {cfg.name!r} already exists")
    total_mib = units.mib(psutil.virtual_memory().total)
    if cfg.memory_mib > total_mib or (cfg.maxmem_mib or 0) > total_mib:
        raise ApiError(api.E_CONFIG, f"{config_file}: memory: {max(cfg.memory_mib, cfg.maxmem_mib or 0)} MiB "
                       f"is more than this host has ({total_mib} MiB)")  # fmt: skip
    spec = cfg.to_domain_spec()
    uuid = cfg.uuid or str(uuidlib.uuid4())
    if ts.pool is not None and not claimed:
        from slimvisor.storage import probe_disk

        sizes = [probe_disk(d.path, d.format, d.readonly, locked_ok=True) for d in spec.disks]
        ts.pool.claim(cfg, uuid, spec.type, sizes)
    try:
        return _create(ts, cfg, spec, uuid, config_file, paused)
    except BaseException:
        if ts.pool is not None and not claimed:
            with contextlib.suppress(Exception):
                ts.pool.store.release_domain(cfg.name, host=ts.pool.m.host)
        raise


def _create(ts: Toolstack, cfg: DomainConfig, spec: DomainSpec, uuid: str, config_file: str | None,
            paused: bool) -> Domain:  # fmt: skip
    maxmem = max(cfg.maxmem_mib or cfg.memory_mib, cfg.memory_mib)
    spec.maxmem_mib = maxmem  # the engine's RAM; the balloon holds maxmem - memory from the start
    spec.balloon = True
    domid = next_domid(ts)
    rundir = domains_dir() / cfg.name
    try:
        rundir.mkdir(mode=0o700)
    except FileExistsError:
        raise ApiError(api.E_EXISTS, f"domain {cfg.name!r} already exists (run dir {rundir})") from None
    starting = supervisor.hold_starting(rundir)  # until the supervisor wrote state.json (or we die)
    try:
        xenstore_link = cfg.xen_platform_pci or spec.type == "pv"
        if spec.vsock is None and xenstore_link:
            spec.vsock = VsockSpec(cid=domid + FIRST_VSOCK_CID - 1, uds=str(rundir / "vsock"))
        if cfg.bootloader is not None:
            cfg.warnings.append(_pygrub(cfg, spec, rundir))
        if xenstore_link:
            spec.cmdline = f"{spec.cmdline} sv.xenstore={XENSTORE_VSOCK_PORT} sv.domid={domid}".strip()
        cfg.warnings += check_spec(spec)
        initrd = fill_defaults(spec)
        record = Record(
            domid=domid, name=cfg.name, uuid=uuid, memory_mib=cfg.memory_mib,
            maxmem_mib=maxmem, vcpus=cfg.vcpus, config_file=config_file, cpu_weight=cfg.cpu_weight, cap=cfg.cap,
            cpus=sorted(cfg.cpus) if cfg.cpus is not None else None,
            policies=Policies(*map(Action, (cfg.on_poweroff, cfg.on_reboot, cfg.on_crash))), spec=spec.to_json(),
            initrd=initrd, fence=ts.pool.fence_path(cfg.on_crash) if ts.pool is not None else None,
        )  # fmt: skip
        dom = launch(ts, record, rundir, paused, spec)
    except BaseException:
        xenstore.forget(ts, domid, release=False)
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    finally:
        os.close(starting)
    log.info("created %s (domain %d, %d MiB)", cfg.name, domid, cfg.memory_mib)
    return dom


def _pygrub(cfg: DomainConfig, spec: DomainSpec, rundir: Path) -> str:
    """bootloader = "pygrub": the first disk's GRUB entry becomes the spec's kernel, initrd and
    command line (xl.cfg's root= and extra= after its own), kept in the run directory."""
    from slimvisor.domain import pygrub

    if not spec.disks:
        raise SpecError("bootloader: pygrub reads the first disk: give one")
    found = pygrub.boot(spec.disks[0].path, rundir / "pygrub", cfg.bootloader_args, cfg.name)
    spec.kernel, spec.initrd = str(found.kernel), str(found.initrd) if found.initrd else None
    spec.cmdline = f"{found.args} {spec.cmdline}".strip()
    return f"bootloader: booting {found.title!r} from {spec.disks[0].path}"


def launch(ts: Toolstack, record: Record, rundir: Path, paused: bool = False, spec: DomainSpec | None = None,
           incoming: tuple[int, bool] | None = None) -> Domain:  # fmt: skip
    """Start the domain `record` describes (a new one, with its `spec` as built, or one restarted
    after a crash, whose spec is read back from the record); `incoming` (fd, peer): one arriving
    (migration.receive)."""
    if spec is None:
        assert record.spec is not None
        spec = DomainSpec.from_json(record.spec)
    xenstore.introduce(ts, record, spec.vsock.cid if spec.vsock is not None else None)
    xenstore.serve_domain(ts, record.domid, rundir)
    record.supervisor_pid = supervisor.spawn(spec, record, rundir, record.initrd, paused=paused, incoming=incoming)
    jailed = Record.load(rundir / "state.json")  # what the supervisor leased for the domain
    record.uid, record.jail = jailed.uid, jailed.jail
    dom = Domain(record, rundir)
    ts.watch(dom)
    dom.last_pids = call(dom, "info")["pids"]
    if record.cpu_weight is not None or record.cap is not None or record.cpus is not None:
        try:
            scheduling.sched(dom, cpu_weight=record.cpu_weight, cap=record.cap, cpus=record.cpus)
        except ApiError as e:
            log.warning("%s: scheduling parameters not applied: %s", record.name, e.message)
    return dom  # its supervisor balloons it down to record.memory_mib itself, at every boot


def next_domid(ts: Toolstack) -> int:
    """Xen's way: ids go up and are not reused while the daemon's state lives (a file)."""
    path = state_dir() / "next-domid"
    try:
        domid = int(path.read_text())
    except (OSError, ValueError):
        domid = 1
    used = {d.record.domid for d in ts.domains.values()}
    while domid in used or not 0 < domid < 0x7FF0:
        domid = domid + 1 if domid < 0x7FF0 else 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(domid + 1))
    tmp.rename(path)
    return domid


def op_list(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    out = [{"name": "Domain-0", "domid": 0, "memory_mib": units.mib(psutil.virtual_memory().total),
            "vcpus": os.cpu_count() or 1, "state": "running", "time_s": round(time.process_time(), 1)}]  # fmt: skip
    for dom in sorted(ts.domains.values(), key=lambda d: d.record.domid):
        out.append(summary(dom))
    return {"domains": out}


def summary(dom: Domain) -> dict[str, Any]:
    try:
        if dom.crashed is not None:
            raise ControlError("crashed")
        if dom.foreign is not None:
            raise ControlError("another build")
        info = supervisor.call(dom.rundir, "info", reply_timeout=2)
        state = dom.last_state = info["state"]
        dom.last_pids = info["pids"]
    except ControlError:
        state = "crashed" if dom.crashed is not None else "running" if dom.foreign is not None else "dying"
        if state == "dying" and not dom.destroying and is_supervisor(dom.record.supervisor_pid):
            state = dom.last_state  # alive but busy (blocked on UML's mconsole): not dying
    cpu = 0.0
    for i, p in enumerate(processes(dom.last_pids)):
        with contextlib.suppress(psutil.Error):
            cpu += sum(p.cpu_times()[:2])
            if i == 0 and state == "running" and p.status() == psutil.STATUS_SLEEPING:
                state = "blocked"  # xl's b: the engine waits for something to do
    return {"name": dom.name, "domid": dom.record.domid, "uuid": dom.record.uuid,
            "memory_mib": dom.record.memory_mib, "maxmem_mib": dom.record.maxmem_mib,
            "vcpus": dom.record.vcpus, "state": state, "time_s": round(cpu, 1),
            "uid": dom.record.uid, "jail": dom.record.jail}  # fmt: skip


def op_domain_info(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    dom = find_domain(ts, req)
    info = call(dom, "info")
    return {"domain": summary(dom), "record": info["record"], "reason": info["reason"],
            "pids": info["pids"], "supervisor": info["supervisor"], "viewers": info["viewers"],
            "limits": info.get("limits", {}), "migration": info.get("migration")}  # fmt: skip


def op_pause(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return call(find_domain(ts, req), "pause")


def op_unpause(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return call(find_domain(ts, req), "unpause")


def op_shutdown(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return shutdown(ts, find_domain(ts, req), "poweroff", req.get("timeout", 60))


def op_reboot(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    return shutdown(ts, find_domain(ts, req), "reboot", req.get("timeout", 60))


def shutdown(ts: Toolstack, dom: Domain, action: str, timeout: Any) -> dict[str, Any]:
    """Xen's way first: a guest that says it takes part (control/feature-ACTION = 1, written by its
    agent) is asked through control/shutdown; any other through its engine (ctrl-alt-del for UML,
    the ACPI power button for QEMU). The supervisor learns of the request first, so it names the
    guest's poweroff as asked for, and destroys the domain after `timeout` if the guest ignores it."""
    control = f"{domain_path(dom.record.domid)}/control"
    try:
        pv = ts.dom0.read(f"{control}/feature-{action}") == b"1"
    except XenstoreError:
        pv = False
    reply = call(dom, "shutdown", reboot=action == "reboot", timeout=timeout,
                 via="xenstore control/shutdown" if pv else None)  # fmt: skip
    if pv and "error" not in reply:
        ts.dom0.write(f"{control}/shutdown", action.encode())
    return reply


def op_destroy(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    destroy_and_wait(ts, find_domain(ts, req).name)
    return {}


def destroy_and_wait(ts: Toolstack, name: str, timeout: float = 20.0) -> None:
    """Always works, and returns once the domain is gone (as `xl destroy`): asks the supervisor,
    kills it if it does not answer or does not finish in time, then clears what is left."""
    dom = ts.domains[name]
    dom.destroying = True
    try:
        if dom.crashed is not None:
            pass  # nothing runs: only the record is left
        elif dom.foreign is not None:
            os.kill(dom.record.supervisor_pid, signal.SIGTERM)  # every build destroys its domain on SIGTERM
        else:
            supervisor.call(dom.rundir, "destroy", reply_timeout=5)
        if dom.pidfd >= 0 and not select.select([dom.pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"not gone after {timeout} s")
    except (ControlError, ProcessLookupError, TimeoutError) as e:
        log.warning("%s: supervisor did not destroy the domain (%s): killing it", dom.name, e)
        with contextlib.suppress(ProcessLookupError):
            os.kill(dom.record.supervisor_pid, signal.SIGKILL)
    ts.supervisor_gone(dom)


def op_mem_set(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    dom = find_domain(ts, req)
    target = req.get("target_bytes")
    if not isinstance(target, int) or target <= 0:
        raise ApiError(api.E_BAD_REQUEST, "mem-set takes 'target_bytes', a positive integer")
    if target > dom.record.maxmem_mib * units.MiB:
        raise ApiError(api.E_BAD_REQUEST, f"{dom.name}: {units.mib(target)} MiB is above maxmem "
                       f"({dom.record.maxmem_mib} MiB)")  # fmt: skip
    call(dom, "mem-set", target_bytes=target)
    dom.record.memory_mib = units.mib(target)
    xenstore.set_memory_target(ts, dom.record.domid, target)
    return {}


def op_console(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """Hand the client a connection to the domain's console (several viewers may attach)."""
    dom = find_domain(ts, req)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(dom.rundir / "console.sock"))
    except OSError as e:
        sock.close()
        raise ApiError(api.E_FAILED, f"{dom.name}: console: {e.strerror or e}") from None
    return {"name": dom.name, "_fds": [sock.detach()]}


def op_top(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """Every domain's summary with the memory and I/O of its processes, for `slimvisor top`."""
    rows = []
    for dom in sorted(ts.domains.values(), key=lambda d: d.record.domid):
        row = summary(dom)
        rss = read = written = 0
        for p in processes(dom.last_pids):
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
                io = p.io_counters()
                read, written = read + io.read_bytes, written + io.write_bytes
        row |= {"rss_bytes": rss, "read_bytes": read, "write_bytes": written}
        rows.append(row)
    return {"domains": rows, "time": time.time()}


OPERATIONS: dict[str, Operation] = {
    "create": op_create, "list": op_list, "domain-info": op_domain_info, "pause": op_pause, "unpause": op_unpause,
    "shutdown": op_shutdown, "reboot": op_reboot, "destroy": op_destroy, "mem-set": op_mem_set,
    "console": op_console, "top": op_top,
}  # fmt: skip
