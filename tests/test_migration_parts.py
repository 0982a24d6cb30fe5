"""The parts of save, restore and migration that run without a guest: the handshake on a channel,
a description from elsewhere checked as untrusted, fds along control requests and QMP, QEMU's
command line and figures, and what each engine refuses to move."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from slimvisor.domain.migration import GO, RECEIVED, Incoming, Outgoing
from slimvisor.engines.base import EngineError, Unsupported
from slimvisor.engines.qemu import accel
from slimvisor.engines.qemu.engine import HVM, PVH, _progress, _translate, host_accel, qemu_argv
from slimvisor.engines.qemu.qmp import Qmp
from slimvisor.engines.uml import UML
from slimvisor.model.spec import DiskSpec, DomainSpec, VsockSpec
from slimvisor.runtime.control import ControlServer, request
from slimvisor.runtime.loop import EventLoop
from slimvisor.toolstack.api import ApiError
from slimvisor.toolstack.migration import IMAGE_VERSION, _checked
from tests.test_qemu_engine import FakeQemu, pump_until


class ScriptedEngine:
    """The engine side of a migration as QEMU answers it: figures on request, failures on demand."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_with: str | None = None

    def migrate_out(self, fd: int, live: bool, downtime_ms: int, failed: Callable[[str], None]) -> None:
        self.calls.append(f"out live={live} downtime={downtime_ms}")
        if self.fail_with:
            failed(self.fail_with)

    def migrate_in(self, fd: int, failed: Callable[[str], None]) -> None:
        self.calls.append("in")

    def migration_progress(self, done: Callable[[dict[str, object]], None]) -> None:
        done({"status": "completed", "bytes_sent": 123, "downtime_ms": 7})

    def cancel_migration(self) -> None:
        self.calls.append("cancel")


def run_until(loop: EventLoop, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "nothing happened"
        loop.run_once(0.05)


def test_source_and_target_handshake_over_one_channel() -> None:
    loop = EventLoop()
    src, dst = socket.socketpair()
    out_done: list[str | None] = []
    in_done: list[str | None] = []
    engine = ScriptedEngine()
    outgoing = Outgoing(loop, engine, os.dup(src.fileno()), peer=True, live=True, done=out_done.append)  # type: ignore[arg-type]
    incoming = Incoming(loop, os.dup(dst.fileno()), peer=True, done=in_done.append)
    incoming.start(engine)  # type: ignore[arg-type]
    assert engine.calls == ["out live=True downtime=100", "in"]
    # The engines finished their stream: the target says RECEIVED, the source takes it as done...
    incoming.engine_status("completed")
    outgoing.engine_status("completed")
    run_until(loop, lambda: bool(out_done))
    assert out_done == [None] and outgoing.progress["downtime_ms"] == 7 and not in_done
    # ...and only once the source let go (GO) does the target run.
    assert outgoing.go() is None
    run_until(loop, lambda: bool(in_done))
    assert in_done == [None] and incoming.status == "completed"
    assert incoming.figures == {"bytes_sent": 123, "bytes_remaining": 0, "downtime_ms": 7,
                                "elapsed_ms": outgoing.progress["elapsed_ms"]}


def test_a_target_that_hangs_up_or_babbles_leaves_the_source_in_charge() -> None:
    loop = EventLoop()
    for peer_says in (b"", b"slimvisor-migration: nonsense\n"):
        src, dst = socket.socketpair()
        done: list[str | None] = []
        engine = ScriptedEngine()
        outgoing = Outgoing(loop, engine, os.dup(src.fileno()), peer=True, live=True, done=done.append)  # type: ignore[arg-type]
        outgoing.engine_status("completed")
        if peer_says:
            dst.sendall(peer_says)
        else:
            dst.close()
        run_until(loop, lambda done=done: bool(done))
        assert done[0] is not None and ("closed the channel" in done[0] or "nonsense" in done[0])
        assert outgoing.progress["status"] == "failed"


def test_a_silent_source_or_a_failing_engine_ends_the_arrival() -> None:
    loop = EventLoop()
    src, dst = socket.socketpair()
    done: list[str | None] = []
    incoming = Incoming(loop, os.dup(dst.fileno()), peer=True, done=done.append)
    incoming.engine_status("completed")
    assert src.recv(64) == RECEIVED
    src.close()  # the source died before GO
    run_until(loop, lambda: bool(done))
    assert done == ["the peer closed the channel instead of 'slimvisor-migration: go'"]
    other: list[str | None] = []
    failing = Incoming(loop, os.dup(dst.fileno()), peer=False, done=other.append)
    failing.engine_status("failed")
    assert other == ["the engine could not load the domain's state (failed)"]
    engine = ScriptedEngine()
    engine.fail_with = "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."
    refused: list[str | None] = []
    Outgoing(loop, engine, os.dup(dst.fileno()), peer=False, live=True, done=refused.append)  # type: ignore[arg-type]
    assert refused == ["Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."] and "cancel" in engine.calls
    # A GO line longer than a handshake line may be: the arrival ends.
    src2, dst2 = socket.socketpair()
    babble: list[str | None] = []
    Incoming(loop, os.dup(dst2.fileno()), peer=True, done=babble.append).engine_status("completed")
    src2.sendall(GO + b" " + b"x" * 5000)
    run_until(loop, lambda: bool(babble))
    assert babble[0] is not None and "instead of 'slimvisor-migration: go'" in babble[0]


def test_a_save_file_is_renamed_only_when_complete(tmp_path: Any) -> None:
    loop = EventLoop()
    for result, exists in (("completed", True), ("failed", False)):
        part, final = tmp_path / f"{result}.part", tmp_path / result
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        done: list[str | None] = []
        outgoing = Outgoing(loop, ScriptedEngine(), fd, peer=False, live=False, done=done.append,  # type: ignore[arg-type]
                            file=(str(part), str(final)))  # fmt: skip
        outgoing.engine_status(result)
        run_until(loop, lambda done=done: bool(done))
        assert final.exists() == exists and not part.exists()


def image(**record: Any) -> dict[str, Any]:
    spec = DomainSpec(name="mover", kernel="/k", memory_mib=64, type="pvh", disks=[DiskSpec("/d")])
    base = {"name": "mover", "uuid": "u", "memory_mib": 64, "maxmem_mib": 64, "vcpus": 1,
            "policies": {"on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "destroy"},
            "spec": spec.to_json(), "cpus": None, "vcpu_cpus": None}  # fmt: skip
    return {"version": IMAGE_VERSION, "record": {**base, **record}, "disks": [4096], "xenstore": {"data/x": "1"}}


def test_a_description_from_elsewhere_is_checked_as_untrusted() -> None:
    record, spec, sizes, nodes, warnings = _checked(image(cpus=[0, 4096], vcpu_cpus={"0": [4097]}))
    assert (record.name, spec.type, sizes, nodes) == ("mover", "pvh", [4096], {"data/x": "1"})
    assert record.cpus == [0] and record.vcpu_cpus is None
    assert any("[4096] are not on this host" in w for w in warnings)
    assert any("vcpu-pin of vCPU 0" in w for w in warnings)
    cases = [
        ({**image(), "version": 99}, "version 99, this host reads 1"),
        ({**image(), "disks": [1, 2]}, "disk sizes do not match the disks"),
        ({**image(), "xenstore": {"a": 1}}, "xenstore nodes are not strings"),
        (image(name="../etc"), "name '../etc'"),
        (image(memory_mib="lots"), "ValueError"),
        ("nonsense", "version None"),
    ]
    for bad, why in cases:
        with pytest.raises(ApiError, match=f"not a slimvisor domain image: .*{why}"):
            _checked(bad)


def test_fds_travel_with_a_control_request(tmp_path: Any) -> None:
    loop = EventLoop()
    kept: list[int] = []

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["op"] == "keep":
            kept.append(req["_fds"].pop())
        return {"fds": len(req["_fds"]) + len(kept)}

    server = ControlServer(loop, str(tmp_path / "c.sock"), handler)
    r, w = os.pipe()
    replies: list[dict[str, Any]] = []
    path = str(tmp_path / "c.sock")
    for op in ("keep", "drop"):
        t = threading.Thread(target=lambda op=op: replies.append(request(path, {"op": op}, fds=(w,))))
        t.start()
        run_until(loop, lambda t=t: not t.is_alive())
    os.write(kept[0], b"x")  # the kept copy still writes into the pipe
    assert os.read(r, 1) == b"x" and len(replies) == 2
    assert sorted(os.listdir("/proc/self/fd")).count(str(kept[0])) == 1
    server.close()


def test_getfd_passes_the_channel_to_qemu() -> None:
    fake = FakeQemu({})
    qmp = Qmp(fake.ours)
    pump_until(qmp, lambda: qmp.ready)
    answered: list[tuple[Any, str | None]] = []
    _, w = os.pipe()
    qmp.call("getfd", {"fdname": "migration"}, lambda ret, err: answered.append((ret, err)), fd=w)
    pump_until(qmp, lambda: bool(answered))
    assert answered == [({}, None)] and fake.seen[-1] == {"execute": "getfd", "arguments": {"fdname": "migration"},
                                                          "id": 2}  # fmt: skip


def test_qemu_incoming_command_line_and_figures() -> None:
    s = DomainSpec(name="h", kernel="/k", memory_mib=256, type="pvh")
    argv = qemu_argv("pvh", s, [], "/boot/kernel", False, paused=False, acc=accel.Accel("tcg", ""), incoming=True)
    assert argv[argv.index("-incoming") + 1] == "defer" and "-S" in argv  # paused once it arrived
    assert _translate({"event": "MIGRATION", "data": {"status": "completed"}})[0][1] == "completed"
    assert _progress({"status": "active", "ram": {"transferred": 5, "remaining": "x", "dirty-pages-rate": 9},
                      "expected-downtime": 30, "error-desc": "e" * 1000}) == {
        "status": "active", "bytes_sent": 5, "dirty_pages_rate": 9, "expected_downtime_ms": 30, "error": "e" * 500}
    assert _progress({"ram": "nonsense"}) == {"status": ""}


def test_what_each_engine_refuses_to_move() -> None:
    with pytest.raises(Unsupported, match=r"PV domains \(User-Mode Linux\) cannot be saved or migrated: .*ptraces"):
        UML.check_migratable(DomainSpec(name="p", kernel="/k", memory_mib=64))
    with pytest.raises(Unsupported, match=r"QEMU 7\.2 cannot migrate vhost-user-vsock .* xen_platform_pci=0"):
        PVH.check_migratable(DomainSpec(name="h", kernel="/k", memory_mib=64, type="pvh", vsock=VsockSpec(3, "/v")))
    with pytest.raises(Unsupported, match="served by qemu-storage-daemon"):
        HVM.check_migratable(DomainSpec(name="h", kernel="", memory_mib=64, type="hvm",
                                        disks=[DiskSpec("/d.qcow2", format="qcow2")]))  # fmt: skip
    HVM.check_migratable(DomainSpec(name="h", kernel="", memory_mib=64, type="hvm", disks=[DiskSpec("/d")], rng=True))
    hvm = DomainSpec(name="h", kernel="", memory_mib=64, type="hvm", vcpus=1)
    if host_accel().name == "tcg":  # QEMU 7.2 loses writes in live migrations under TCG: copied stopped
        assert "copied stopped instead" in str(HVM.why_not_live(hvm))
    else:
        assert HVM.why_not_live(hvm) is None
    assert "ptraces" in str(UML.why_not_live(hvm))
    assert issubclass(Unsupported, EngineError) and json.dumps(_progress({}))
