"""slimvisord's scheduling operations: credit weight and cap (cgroup CPU shares and quota) and vCPU pinning."""

from __future__ import annotations

import os
from typing import Any

from slimvisor.toolstack import api
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.registry import Domain, Operation, Toolstack, call, find_domain


def sched(dom: Domain, **args: Any) -> dict[str, Any]:
    """Weight and cap (the domain's cgroup) and pinning, checked here, applied by its supervisor
    and kept in the record, so a restart keeps them."""
    args = {k: v for k, v in args.items() if v is not None}
    if "cpu_weight" in args and not (isinstance(args["cpu_weight"], int) and 1 <= args["cpu_weight"] <= 65535):
        raise ApiError(api.E_BAD_REQUEST, "weight must be an integer 1..65535 (xl's credit weight)")
    if "cap" in args and not (isinstance(args["cap"], int) and 0 <= args["cap"] <= 100 * dom.record.vcpus):
        raise ApiError(api.E_BAD_REQUEST, f"cap must be 0 (none) .. {100 * dom.record.vcpus} (% of one CPU)")
    reply = call(dom, "sched", **args)
    for key in ("cpu_weight", "cap", "cpus"):
        if key in args:
            setattr(dom.record, key, args[key])
    return reply


def op_sched_credit(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    if req.get("domain") is None:
        return {"domains": [{"name": d.name, "domid": d.record.domid, **sched(d)}
                            for d in ts.domains.values()]}  # fmt: skip
    dom = find_domain(ts, req)
    return {"domains": [{"name": dom.name, "domid": dom.record.domid,
                         **sched(dom, cpu_weight=req.get("weight"), cap=req.get("cap"))}]}  # fmt: skip


def op_vcpu_pin(ts: Toolstack, req: dict[str, Any]) -> dict[str, Any]:
    """xl vcpu-pin: `all` (or the one vCPU of a PV domain) pins the whole domain; one vCPU of an
    HVM/PVH domain pins that vCPU's QEMU thread."""
    dom = find_domain(ts, req)
    vcpu, count = req.get("vcpu"), dom.record.vcpus
    if vcpu != "all" and not (isinstance(vcpu, int) and not isinstance(vcpu, bool) and 0 <= vcpu < count):
        raise ApiError(api.E_BAD_REQUEST, f"{dom.name} has {count} vCPU{'s' if count > 1 else ''} "
                       f"(0..{count - 1}, or all); got {vcpu!r}")  # fmt: skip
    cpus = req.get("cpus")
    if cpus == "all":
        cpus = sorted(os.sched_getaffinity(0))
    if not isinstance(cpus, list) or not cpus or not all(isinstance(c, int) for c in cpus):
        raise ApiError(api.E_BAD_REQUEST, "cpus must be a non-empty list of host CPU numbers, or 'all'")
    if vcpu == "all" or count == 1:
        return sched(dom, cpus=cpus)
    reply = call(dom, "vcpu-pin", vcpu=vcpu, cpus=cpus)
    if "error" in reply:
        raise ApiError(api.E_BAD_REQUEST, f"{dom.name}: {reply['error']}")
    return {"domains": [{"name": dom.name, "domid": dom.record.domid, "vcpu": vcpu, **reply}]}


OPERATIONS: dict[str, Operation] = {"sched-credit": op_sched_credit, "vcpu-pin": op_vcpu_pin}
