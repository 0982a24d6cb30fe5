"""What slimvisord's operations work on: its registry of domains, and the daemon as they see it.

The daemon (`daemon.py`) is framing and life cycle; its operations live in modules by topic
(`domains`, `scheduling`, `cluster`, `xenstore`), each with an `OPERATIONS` table of
`(toolstack, request) -> reply` functions. They type the daemon with the `Toolstack` protocol
below and never import `daemon.py`, which imports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from slimvisor.domain import supervisor
from slimvisor.domain.supervisor import Record
from slimvisor.model.lifecycle import RestartLimiter
from slimvisor.runtime.build import build_id
from slimvisor.runtime.control import ControlError
from slimvisor.runtime.loop import EventLoop
from slimvisor.toolstack import api
from slimvisor.toolstack.api import ApiError
from slimvisor.xenstore.server import XenstoreServer
from slimvisor.xenstore.store import Connection, Store


@dataclass
class Domain:
    record: Record
    rundir: Path
    pidfd: int = -1
    last_pids: list[int] = field(default_factory=list)
    foreign: str | None = None  # the build of a supervisor this daemon may not drive (lock-step)
    crashed: str | None = None  # why, when the supervisor died and on_crash=preserve kept the domain
    destroying: bool = False
    restarts: RestartLimiter = field(default_factory=RestartLimiter)
    last_state: str = "running"  # what the supervisor said last (a busy one may not answer `list` in time)

    @property
    def name(self) -> str:
        return self.record.name


class Toolstack(Protocol):
    """The daemon, as its operations see it."""

    domains: dict[str, Domain]
    loop: EventLoop
    store: Store
    dom0: Connection
    xenstore: XenstoreServer
    xenstore_path: Path
    started: float
    stopping: bool
    pool: Any  # toolstack.pool.Pool when this host is a pool member, else None

    def enter_pool(self, membership: Any, first: bool) -> Any:
        """Become a member (`pool.Membership`): serve the pool link, keep the lease; the `pool.Pool`."""
        ...

    def leave_pool(self) -> None: ...

    def watch(self, dom: Domain) -> None:
        """Register a started domain and follow its supervisor."""
        ...

    def supervisor_gone(self, dom: Domain) -> None:
        """Forget a domain whose supervisor has ended (or act on its crash)."""
        ...

    def log_lines(self) -> list[str]: ...


Operation = Callable[[Toolstack, dict[str, Any]], dict[str, Any]]


def find_domain(ts: Toolstack, req: dict[str, Any]) -> Domain:
    """The domain a request names, by name or by id (as xl takes either)."""
    key = req.get("domain")
    if not isinstance(key, str | int):
        raise ApiError(api.E_BAD_REQUEST, "missing 'domain' (a name or an id)")
    for dom in ts.domains.values():
        if dom.name == str(key) or str(dom.record.domid) == str(key):
            return dom
    raise ApiError(api.E_NO_DOMAIN, f"no domain {key!r}")


def call(dom: Domain, op: str, fds: tuple[int, ...] = (), **args: Any) -> dict[str, Any]:
    """One request to the domain's supervisor (with `fds`); refused for one this daemon may not drive."""
    if dom.crashed is not None:
        raise ApiError(api.E_FAILED, f"{dom.name} crashed ({dom.crashed}): only destroy works on it")
    if dom.foreign is not None:
        raise ApiError(api.E_FAILED, f"{dom.name} runs under slimvisor build {dom.foreign}, this daemon is "
                       f"{build_id()}: only destroy works on it")  # fmt: skip
    try:
        return supervisor.call(dom.rundir, op, fds=fds, **args)
    except ControlError as e:
        raise ApiError(api.E_FAILED, f"{dom.name}: {e}") from None


def is_supervisor(pid: int) -> bool:
    try:
        return " ".join(psutil.Process(pid).cmdline()).startswith("slimvisor-supervisor")
    except psutil.Error:
        return False


def processes(pids: list[int]) -> list[psutil.Process]:
    """The domain's processes: each engine process with its children (UML's helpers), the backend."""
    out: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
    return out
