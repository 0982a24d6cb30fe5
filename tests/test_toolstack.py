"""The toolstack as a user drives it: slimvisord, xl-style commands, real UML domains."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from slimvisor.devices.balloon import VIRTIO_BALLOON_F_DEFLATE_ON_OOM
from slimvisor.host import procs
from slimvisor.testing.expect import ConsoleSession
from slimvisor.toolstack.api import Client
from tests import leaks
from tests.guest import balloon_features
from tests.toolstack import Toolstack

pytestmark = pytest.mark.guest


def test_create_list_console_destroy(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path) -> None:
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs)
    created = toolstack.sv("create", str(cfg))
    assert f"Domain {domname} created" in created.stderr
    row = toolstack.domains()[domname]
    assert row["domid"] >= 1 and row["memory_mib"] == 64 and row["vcpus"] == 1
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=60)
        assert console.run("echo $((6 * 7))").strip() == "42"
    finally:
        console.kill()
    toolstack.sv("destroy", domname)
    toolstack.wait_state(domname, ("gone",))
    assert toolstack.leftovers([domname]) == []


def test_relative_paths_are_the_clients(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path) -> None:
    """A relative disk path names a file beside where `slimvisor create` ran (as with xl), not
    beside the daemon: the config lives elsewhere and the daemon's directory has no such file."""
    cfgdir = tmp_path / "configs"
    cfgdir.mkdir()
    cfg = cfgdir / "d.cfg"
    cfg.write_text(f'name = "{domname}"\nmemory = 64\ndisk = [\'{rootfs.name},raw,xvda,rw\']\n')
    daemon = psutil.Process(toolstack.daemon_pid())  # started now, from the suite's own directory
    assert Path(daemon.cwd()) != tmp_path and not (Path(daemon.cwd()) / rootfs.name).exists()
    created = toolstack.sv("create", os.path.relpath(cfg, tmp_path), cwd=tmp_path)
    assert f"Domain {domname} created" in created.stderr
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
    finally:
        console.kill()
    destroy_and_check(toolstack, domname)


# A guest boots in a few seconds; on a host busy with other work it can take minutes.
BOOT_TIMEOUT = 240


# -- helpers -------------------------------------------------------------------------------------


def supervisor_proc(toolstack: Toolstack, name: str) -> psutil.Process:
    """`name`'s supervisor, by the pid the daemon reports for it (not by its process title)."""
    return psutil.Process(int(toolstack.domain_info(name)["supervisor"]))


def uml_proc(toolstack: Toolstack, name: str) -> psutil.Process:
    """The UML process of `name`: the first of the pids its supervisor reports (the engine, then the backend)."""
    pids = toolstack.domain_info(name)["pids"]
    assert pids, f"{name}: no UML process"
    return psutil.Process(int(pids[0]))


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def boot(toolstack: Toolstack, cfg: Path, name: str, *args: str) -> ConsoleSession:
    """Create the domain and wait on its console until the guest is up; returns the console."""
    created = toolstack.sv("create", *args, str(cfg))
    assert f"Domain {name} created" in created.stderr
    console = toolstack.console(name)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        console.run("true")  # the shell answers
    except BaseException:
        console.kill()
        raise
    return console


def list_row(toolstack: Toolstack, name: str) -> list[str]:
    """The `slimvisor list NAME` row as a user reads it: Name ID Mem VCPUs State Time(s)."""
    out = toolstack.sv("list", name).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, out
    return rows[0]


def destroy_and_check(toolstack: Toolstack, *names: str) -> None:
    for name in names:
        toolstack.sv("destroy", name)
    for name in names:
        toolstack.wait_state(name, ("gone",), timeout=60)
    assert not set(names) & set(toolstack.domains())
    wait_for(lambda: toolstack.leftovers(list(names)) == [], 30, f"nothing left of {names}")


def meminfo_kib(console: ConsoleSession, key: str = "MemTotal") -> int:
    out = console.run(f"grep '^{key}:' /proc/meminfo")
    return int(out.split()[1])


# -- 1. the daemon dies, domains do not ------------------------------------------------------------


def test_daemon_sigkill_then_restarted_on_demand(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                                  consoles: list[ConsoleSession]) -> None:  # fmt: skip
    a, b = f"{domname}a", f"{domname}b"
    rootfs_b = tmp_path / "rootfs-b.ext4"
    rootfs_b.write_bytes(rootfs.read_bytes())
    consoles.append(ca := boot(toolstack, toolstack.config(tmp_path / "a.cfg", a, rootfs), a))
    consoles.append(boot(toolstack, toolstack.config(tmp_path / "b.cfg", b, rootfs_b), b))
    before = toolstack.domains()
    ida, idb = before[a]["domid"], before[b]["domid"]
    assert ida != idb
    # xenstore: dom0's own value, and one the guest writes through its own path
    toolstack.sv("xenstore-write", "/tool/slimvisor-test/key", "kept-value")
    assert ca.run("xenstore-write data/before ok-before && xenstore-read name").strip() == a
    assert toolstack.sv("xenstore-read", f"/local/domain/{ida}/data/before").stdout.strip() == "ok-before"
    uml_a, uml_b = uml_proc(toolstack, a).pid, uml_proc(toolstack, b).pid

    old = psutil.Process(toolstack.daemon_pid())
    old.send_signal(signal.SIGKILL)
    old.wait(10)
    # the domains did not notice; the console that was attached still works without the daemon
    assert ca.run("echo alive-$((3 * 5))").strip() == "alive-15"

    after = toolstack.domains()  # any command starts the daemon again
    new_pid = toolstack.daemon_pid()
    assert new_pid != old.pid
    assert {n: r["domid"] for n, r in after.items()} == {a: ida, b: idb}
    assert all(after[n]["state"] in ("running", "blocked") for n in (a, b))
    assert (uml_proc(toolstack, a).pid, uml_proc(toolstack, b).pid) == (uml_a, uml_b)
    assert f"{a} " in toolstack.sv("list").stdout
    consoles.append(cb := toolstack.console(b))
    assert cb.run("echo $((6 * 7))").strip() == "42"
    assert toolstack.sv("xenstore-read", "/tool/slimvisor-test/key").stdout.strip() == "kept-value"
    assert toolstack.sv("xenstore-read", f"/local/domain/{ida}/data/before").stdout.strip() == "ok-before"
    assert toolstack.sv("xenstore-read", f"/local/domain/{idb}/name").stdout.strip() == b
    # the guests' xenstore channel is served by the new daemon
    assert cb.run("xenstore-read name").strip() == b
    assert cb.run("xenstore-read domid").strip() == str(idb)
    cb.run("xenstore-write data/after ok-after")
    assert cb.last_status == 0
    assert toolstack.sv("xenstore-read", f"/local/domain/{idb}/data/after").stdout.strip() == "ok-after"
    assert "re-attached" in toolstack.sv("dmesg").stdout
    destroy_and_check(toolstack, a, b)


def test_daemon_stop_leaves_domains_running(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                            consoles: list[ConsoleSession]) -> None:  # fmt: skip
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    domid = toolstack.domains()[domname]["domid"]
    supervisor, uml = supervisor_proc(toolstack, domname), uml_proc(toolstack, domname)
    pid = toolstack.daemon_pid()
    lock, sock, log = toolstack.run_dir / "slimvisord.lock", toolstack.run_dir / "slimvisord.sock", toolstack.log_dir
    assert int(lock.read_text()) == pid  # found by its lock file: its command line and environment are blank
    assert psutil.Process(pid).cmdline()[0] == "slimvisord"
    daemon = os.pidfd_open(pid)
    try:
        stopped = toolstack.sv("daemon", "stop")
        assert stopped.stderr == f"slimvisord (pid {pid}) stopped\n"
        assert select.select([daemon], [], [], 0)[0], "the command returned before the daemon exited"
    finally:
        os.close(daemon)
    assert lock.read_text() == "" and not sock.exists()
    assert (log / "slimvisord.log").read_text().count("stopping on request; 1 domains keep running") == 1
    assert supervisor.is_running() and uml.is_running()
    assert console.run("echo alive-$((3 * 5))").strip() == "alive-15"
    again = toolstack.sv("daemon", "stop")
    assert again.stderr == "slimvisord is not running\n"

    assert toolstack.domains()[domname]["domid"] == domid  # the next command starts a daemon; it re-attaches
    new = toolstack.daemon_pid()
    assert new != pid and uml_proc(toolstack, domname).pid == uml.pid
    sock.unlink()  # no API to ask: SIGTERM through the pid in the lock file does the same
    assert toolstack.sv("daemon", "stop").stderr == f"slimvisord (pid {new}) stopped\n"
    assert (log / "slimvisord.log").read_text().count("stopping on request") == 1
    assert procs.process_id(new) is None and lock.read_text() == ""
    assert supervisor.is_running() and uml.is_running()
    destroy_and_check(toolstack, domname)


def test_daemon_stop_bad_input_and_timeout(toolstack: Toolstack) -> None:
    for bad in ("0", "-1", "abc", "nan", "inf"):
        result = toolstack.sv("daemon", "stop", "--timeout", bad, check=False)
        assert result.returncode == 1, bad
        assert result.stderr == f"slimvisor: error: --timeout {bad!r}: give a positive number of seconds\n"
    pid = toolstack.daemon_pid()
    os.kill(pid, signal.SIGSTOP)  # a daemon that neither answers nor handles SIGTERM
    try:
        hung = toolstack.sv("daemon", "stop", "--timeout", "2", check=False)
        assert hung.returncode == 1
        assert hung.stderr == f"slimvisor: error: slimvisord (pid {pid}) is still running after 2 s\n"
        assert procs.process_id(pid) is not None
    finally:
        os.kill(pid, signal.SIGCONT)  # the SIGTERM it was sent is handled now
    assert procs.wait_gone([pid], 30) == []
    assert toolstack.sv("daemon", "stop").stderr == "slimvisord is not running\n"


def test_daemon_as_systemd_runs_it(toolstack: Toolstack) -> None:
    """contrib/slimvisord.service: the daemon in the foreground; `systemctl stop` is SIGTERM to it."""
    lock = toolstack.run_dir / "slimvisord.lock"
    for how in ("SIGTERM", "slimvisor daemon stop"):
        daemon = subprocess.Popen([sys.executable, "-m", "slimvisor.toolstack.daemon"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **toolstack.env})  # fmt: skip
        try:
            assert daemon.stderr is not None and "serving" in daemon.stderr.readline()  # its first line, once it serves
            assert int(lock.read_text()) == daemon.pid
            if how == "SIGTERM":
                daemon.send_signal(signal.SIGTERM)
            else:
                assert toolstack.sv("daemon", "stop").stderr == f"slimvisord (pid {daemon.pid}) stopped\n"
            assert daemon.wait(30) == 0, how
        finally:
            daemon.kill()
            daemon.wait()
            if daemon.stderr is not None:
                daemon.stderr.close()
        assert lock.read_text() == "", how


def test_a_daemon_left_behind_is_found(toolstack: Toolstack) -> None:
    """What the old teardown left: a daemon whose run tree was removed under it, holding only deleted files."""
    pid = toolstack.daemon_pid()
    shutil.rmtree(toolstack.root)  # the old teardown's end, with the daemon it never found still running
    try:
        found = leaks.survivors([f"{toolstack.root}/"], settle=0)
        assert set(found) == {pid} and found[pid].endswith(" (deleted)"), found
    finally:
        assert procs.kill([pid]) == []


# -- 2. a domain's processes die -------------------------------------------------------------------


@pytest.mark.parametrize("on_crash", ["preserve", "restart", None])
def test_killed_uml_follows_on_crash(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                     consoles: list[ConsoleSession], on_crash: str | None) -> None:  # fmt: skip
    extra = [f'on_crash = "{on_crash}"'] if on_crash else []
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs, *extra), domname))
    domid = toolstack.domains()[domname]["domid"]
    old_uml = uml_proc(toolstack, domname)
    mark = len(console.out)
    old_uml.send_signal(signal.SIGKILL)

    if on_crash == "preserve":
        row = toolstack.wait_state(domname, ("crashed",), timeout=60)
        assert row is not None and row["domid"] == domid
        assert list_row(toolstack, domname)[4] == "----c-"
        console.expect(r"on_crash=preserve", timeout=30, start=mark)
        assert not psutil.pid_exists(old_uml.pid) or old_uml.status() == psutil.STATUS_ZOMBIE
        destroy_and_check(toolstack, domname)
    elif on_crash == "restart":
        console.expect(r"on_crash=restart", timeout=60, start=mark)
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT, start=mark)
        assert uml_proc(toolstack, domname).pid != old_uml.pid
        assert toolstack.domains()[domname]["domid"] == domid
        assert console.run("echo back-$((2 + 2))").strip() == "back-4"
        destroy_and_check(toolstack, domname)
    else:
        console.expect(r"on_crash=destroy", timeout=60, start=mark)
        toolstack.wait_state(domname, ("gone",), timeout=60)
        assert console.wait(10) == 0  # the viewer is told the console is gone
        wait_for(lambda: toolstack.leftovers([domname]) == [], 30, "nothing left")
        assert domname not in toolstack.sv("list").stdout


@pytest.mark.parametrize("on_crash", ["preserve", "restart", None])
def test_killed_device_backend_follows_on_crash(toolstack: Toolstack, rootfs: Path, domname: str,
                                                tmp_path: Path, consoles: list[ConsoleSession],
                                                on_crash: str | None) -> None:  # fmt: skip
    """The domain's devices are served by its supervisor process: killing it kills the backend."""
    extra = [f'on_crash = "{on_crash}"'] if on_crash else []
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs, *extra), domname))
    domid = toolstack.domains()[domname]["domid"]
    old_supervisor, old_uml = supervisor_proc(toolstack, domname), uml_proc(toolstack, domname)
    old_supervisor.send_signal(signal.SIGKILL)
    console.wait(30)  # the viewer's console went with the process
    wait_for(lambda: f"{domname}: crashed" in toolstack.sv("dmesg").stdout, 30, "the crash to be logged")
    assert f"on_crash={on_crash or 'destroy'}" in toolstack.sv("dmesg").stdout
    wait_for(lambda: not old_uml.is_running() or old_uml.status() == psutil.STATUS_ZOMBIE, 30, "the old UML to go")
    if on_crash == "preserve":
        row = toolstack.wait_state(domname, ("crashed",), timeout=60)
        assert row is not None and row["domid"] == domid
        assert list_row(toolstack, domname)[4] == "----c-"
        failed = toolstack.sv("pause", domname, check=False)
        assert failed.returncode == 1 and "crashed" in failed.stderr and "only destroy" in failed.stderr
        destroy_and_check(toolstack, domname)
    elif on_crash == "restart":
        wait_for(lambda: supervisor_proc(toolstack, domname).pid != old_supervisor.pid, 60, "a new supervisor")
        consoles.append(console := toolstack.console(domname))
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert console.run("echo back-$((2 + 2))").strip() == "back-4"
        assert toolstack.domains()[domname]["domid"] == domid
        destroy_and_check(toolstack, domname)
    else:
        toolstack.wait_state(domname, ("gone",), timeout=60)
        wait_for(lambda: toolstack.leftovers([domname]) == [], 30, "nothing left")


# -- 3. lifecycle ----------------------------------------------------------------------------------


def test_pause_unpause(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                       consoles: list[ConsoleSession]) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs, "balloon_deflate_on_oom = 1")
    consoles.append(console := boot(toolstack, cfg, domname))
    assert balloon_features(console)[VIRTIO_BALLOON_F_DEFLATE_ON_OOM] == "1"  # the config reached the guest
    toolstack.sv("pause", domname)
    assert toolstack.domains()[domname]["state"] == "paused"
    assert list_row(toolstack, domname)[4] == "--p---"
    mark = len(console.out)
    console.send("echo pong-$((20 + 3))")
    time.sleep(3)
    assert "pong-23" not in console.out[mark:].decode(errors="replace"), "a paused guest answered its console"
    uml = uml_proc(toolstack, domname)
    cpu = sum(uml.cpu_times()[:2])
    time.sleep(1)
    assert sum(uml.cpu_times()[:2]) - cpu < 0.2  # a paused guest does not run
    toolstack.sv("pause", domname)  # pausing twice is harmless
    toolstack.sv("unpause", domname)
    console.expect(r"pong-23", timeout=60, start=mark)
    assert toolstack.domains()[domname]["state"] in ("running", "blocked")
    assert console.run("echo $((1 + 1))").strip() == "2"
    again = toolstack.sv("unpause", domname, check=False)
    assert again.returncode != 0 and "not paused" in again.stderr
    destroy_and_check(toolstack, domname)


def test_shutdown_wait(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                       consoles: list[ConsoleSession]) -> None:  # fmt: skip
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    mark = len(console.out)
    down = toolstack.sv("shutdown", "-w", domname, timeout=150)
    assert down.returncode == 0
    assert domname not in toolstack.domains()
    text = console.out[mark:].decode(errors="replace")
    # the guest's own path down (its agent for Xen's control/shutdown powers off; ctrl-alt-del reboots),
    # then the policy of the shutdown that was asked for, not the timeout
    assert "The system is going down NOW!" in text, text
    assert re.search(r"reboot: (Restarting system|Power down|System halted)", text), text
    assert "on_poweroff=destroy" in text and "did not shut down" not in text, text[-2000:]
    assert console.wait(10) == 0
    log = (toolstack.log_dir / f"{domname}.console.log").read_text(errors="replace")
    assert "on_poweroff=destroy" in log
    wait_for(lambda: toolstack.leftovers([domname]) == [], 30, "nothing left")


# Waits (in the guest, 10 s at most) for the agent's xenstore-watch to be gone; prints its pid if not.
AGENT_GONE = ("i=0; while pidof xenstore-watch >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
              "pidof xenstore-watch")


def ignore_ctrl_alt_del(console: ConsoleSession) -> None:
    """Make the guest deaf to shutdown requests: stop its agent for Xen's control/shutdown (its
    feature flag stays: the toolstack asks there, and nobody answers), and for ctrl-alt-del point
    the kernel's cad_pid (init) at a process that ignores SIGINT."""
    console.run("kill -- -$(cat /run/xen-shutdown.pid)")
    assert console.last_status == 0 and console.run(AGENT_GONE) == ""
    pid = console.run("(trap '' INT; exec sleep 100000) & echo $!").split()[-1]
    console.run(f"echo {pid} > /proc/sys/kernel/cad_pid")
    assert console.run("cat /proc/sys/kernel/cad_pid").split()[-1] == pid


@pytest.mark.parametrize("command", ["shutdown", "reboot"])
def test_timeout_reaches_the_supervisor(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                        consoles: list[ConsoleSession], command: str) -> None:  # fmt: skip
    """A guest that ignores ctrl-alt-del is destroyed after --timeout (the supervisor waited 60 s
    whatever was asked: the daemon spent the value on its socket timeout)."""
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    ignore_ctrl_alt_del(console)
    mark = len(console.out)
    start = time.monotonic()
    if command == "shutdown":
        toolstack.sv("shutdown", "-w", "--timeout", "4", domname, timeout=60)  # -w waits at most timeout + 10 s
        elapsed = time.monotonic() - start
        assert domname not in toolstack.domains()
        assert "did not shut down within 4.0 s: destroyed" in console.out[mark:].decode(errors="replace")
    else:
        toolstack.sv("reboot", "--timeout", "4", domname)
        console.expect(r"did not reboot within 4.0 s: destroyed", timeout=60, start=mark)
        elapsed = time.monotonic() - start
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT, start=mark)  # then on_reboot=restart
        destroy_and_check(toolstack, domname)
    assert 4 <= elapsed < 30, elapsed
    wait_for(lambda: toolstack.leftovers([domname]) == [], 30, "nothing left")


def test_two_domains_never_write_one_disk(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                         consoles: list[ConsoleSession]) -> None:  # fmt: skip
    """The image a running domain writes is locked (OFD, as QEMU): another domain asking for it,
    read-write or readonly, is refused with the image and the backend holding it named."""
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "a.cfg", domname, rootfs), domname))
    other = domname + "b"
    for mode in ("rw", "ro"):
        cfg = tmp_path / "b.cfg"
        cfg.write_text(f"name = \"{other}\"\nmemory = 64\ndisk = ['{rootfs},raw,xvda,{mode}']\n")
        refused = toolstack.sv("create", str(cfg), check=False)
        assert refused.returncode != 0 and f"disk {rootfs}: in use by pid " in refused.stderr, refused.stderr
        assert other not in toolstack.domains()
    assert console.run("echo still-$((1 + 1))").strip() == "still-2"
    destroy_and_check(toolstack, domname)


def test_shutdown_on_poweroff_preserve(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                       consoles: list[ConsoleSession]) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs, 'on_poweroff = "preserve"')
    consoles.append(boot(toolstack, cfg, domname))
    domid = toolstack.domains()[domname]["domid"]
    toolstack.sv("shutdown", "-w", domname, timeout=150)
    row = toolstack.domains()[domname]
    assert row["state"] == "shutdown" and row["domid"] == domid
    assert list_row(toolstack, domname)[4] == "---s--"
    with pytest.raises(AssertionError):
        uml_proc(toolstack, domname)  # no UML runs any more
    destroy_and_check(toolstack, domname)


def test_reboot_keeps_domain(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                             consoles: list[ConsoleSession]) -> None:  # fmt: skip
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    domid = toolstack.domains()[domname]["domid"]
    uml = uml_proc(toolstack, domname).pid
    console.run("echo first > /tmp/boot-marker")
    mark = len(console.out)
    toolstack.sv("reboot", domname)
    console.expect(r"on_reboot=restart", timeout=90, start=mark)
    console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT, start=mark)
    assert len(re.findall(r"slimvisor: \S+ is up", console.text)) == 2
    assert toolstack.domains()[domname]["domid"] == domid
    assert uml_proc(toolstack, domname).pid != uml
    assert console.run("cat /tmp/boot-marker 2>/dev/null || echo fresh").strip() == "fresh"  # tmpfs: a new boot
    destroy_and_check(toolstack, domname)


def test_create_paused(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                       consoles: list[ConsoleSession]) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs)
    created = toolstack.sv("create", "-p", str(cfg))
    assert f"Domain {domname} created" in created.stderr
    assert toolstack.domains()[domname]["state"] == "paused"  # when create -p returns, it is paused
    assert list_row(toolstack, domname)[4] == "--p---"
    consoles.append(console := toolstack.console(domname))
    time.sleep(3)
    assert toolstack.domains()[domname]["state"] == "paused"
    assert "is up" not in console.text
    toolstack.sv("unpause", domname)
    console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
    destroy_and_check(toolstack, domname)


def test_create_override_and_mem_set(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                     consoles: list[ConsoleSession]) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs)  # says memory = 64
    toolstack.sv("create", str(cfg), "memory=96")
    assert toolstack.domains()[domname]["memory_mib"] == 96
    assert list_row(toolstack, domname)[2] == "96"
    consoles.append(console := toolstack.console(domname))
    console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
    assert "mem=96M" in console.text
    total = meminfo_kib(console)
    assert total > 60 * 1024, total  # more than a 64 MiB domain can have (its kernel takes some too)

    toolstack.sv("mem-set", domname, "80M")
    assert toolstack.domains()[domname]["memory_mib"] == 80
    assert list_row(toolstack, domname)[2] == "80"
    wait_for(lambda: total - meminfo_kib(console) > 12 * 1024, 30, "the balloon to take 16 MiB")
    assert total - meminfo_kib(console) < 18 * 1024
    assert console.run("xenstore-read memory/target").strip() == str(80 * 1024)
    daemon = psutil.Process(toolstack.daemon_pid())
    daemon.kill()  # a restarted daemon knows the new target too
    daemon.wait(10)
    wait_for(lambda: toolstack.domains()[domname]["memory_mib"] == 80, 30, "memory 80 after a daemon restart")
    above = toolstack.sv("mem-set", domname, "200M", check=False)
    assert above.returncode != 0 and "maxmem" in above.stderr
    destroy_and_check(toolstack, domname)


def test_sched_credit_and_vcpu_pin(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                   consoles: list[ConsoleSession]) -> None:  # fmt: skip
    consoles.append(console := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    # Either branch asserts: a host without cgroups must refuse weight and cap, not pass silently.
    cgroups = json.loads(toolstack.sv("info", "--json").stdout)["cgroups"]
    setting = toolstack.sv("sched-credit", "-d", domname, "-w", "512", "-c", "50", check=False)
    if cgroups:
        assert setting.returncode == 0, setting.stderr
        shown = toolstack.sv("sched-credit", "-d", domname).stdout.splitlines()
        assert shown[0].split() == ["Name", "ID", "Weight", "Cap"]
        assert shown[1].split()[0] == domname and shown[1].split()[2:] == ["512", "50"]
        assert domname in toolstack.cgroups()
        bad = toolstack.sv("sched-credit", "-d", domname, "-w", "0", check=False)
        assert bad.returncode != 0 and "weight" in bad.stderr
    else:
        assert setting.returncode != 0 and "not supported on this host" in setting.stderr, setting
    toolstack.sv("vcpu-pin", domname, "0", "0")
    console.run("sleep 1 & wait")  # a guest process started after pinning
    uml = uml_proc(toolstack, domname)
    for proc in [uml, *uml.children(recursive=True)]:
        for thread in proc.threads():
            status = Path(f"/proc/{proc.pid}/task/{thread.id}/status")
            with contextlib.suppress(FileNotFoundError):
                allowed = re.search(r"Cpus_allowed_list:\s*(\S+)", status.read_text())
                assert allowed and allowed.group(1) == "0", f"{proc.pid}/{thread.id}: {allowed}"
    bad = toolstack.sv("vcpu-pin", domname, "1", "0", check=False)
    assert bad.returncode != 0 and "vCPU" in bad.stderr
    destroy_and_check(toolstack, domname)


def test_two_console_viewers(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                             consoles: list[ConsoleSession]) -> None:  # fmt: skip
    consoles.append(first := boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    consoles.append(second := toolstack.console(domname))
    second.expect(r"slimvisor: \S+ is up", timeout=30)  # the new viewer gets the history first
    mark1, mark2 = len(first.out), len(second.out)
    assert first.run("echo both-$((7 * 6))").strip() == "both-42"
    second.expect(r"both-42", timeout=30, start=mark2)
    assert second.run("echo other-$((1 + 2))").strip() == "other-3"
    first.expect(r"other-3", timeout=30, start=mark1)
    assert toolstack.json("list") and first.proc.poll() is None and second.proc.poll() is None
    destroy_and_check(toolstack, domname)


def test_top_info_dmesg(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                        consoles: list[ConsoleSession]) -> None:  # fmt: skip
    consoles.append(boot(toolstack, toolstack.config(tmp_path / "d.cfg", domname, rootfs), domname))
    domid = toolstack.domains()[domname]["domid"]
    top = toolstack.sv("top", "-b", "-i", "2", "-d", "0.5")
    rows = [line.split() for line in top.stdout.splitlines() if line.split()[:1] == [domname]]
    assert len(rows) == 2 and all(r[1] == str(domid) for r in rows), top.stdout
    assert top.stdout.count("CPU(%)") == 2
    info = toolstack.sv("info").stdout
    for key in ("host", "nr_cpus", "total_memory_mib", "free_memory_mib", "features", "cgroups", "xenstore"):
        assert re.search(rf"^{key}\s+:", info, re.M), info
    info_json = toolstack.json("info")
    assert info_json["domains"] == 1 and info_json["pid"] == toolstack.daemon_pid()
    dmesg = toolstack.sv("dmesg").stdout
    assert f"created {domname} (domain {domid}, 64 MiB)" in dmesg
    assert "serving" in dmesg.splitlines()[0]
    destroy_and_check(toolstack, domname)


# -- 4. the API on a raw socket --------------------------------------------------------------------


class _Raw:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> dict[str, Any]:
        self.sock.sendall(data)
        line = self.file.readline()
        assert line, "the daemon closed the connection"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, **req: Any) -> dict[str, Any]:
        return self.send(json.dumps(req).encode() + b"\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_api_raw_socket(toolstack: Toolstack) -> None:
    pid = toolstack.daemon_pid()  # started on demand
    path = toolstack.run_dir / "slimvisord.sock"
    raw = _Raw(path)
    try:
        reply = raw.call(id=1, op="hello", version=99)
        assert reply["id"] == 1 and reply["error"]["code"] == "version" and "99" in reply["error"]["message"]
        reply = raw.call(id=2, op="list")
        assert reply["id"] == 2 and reply["error"]["code"] == "bad-request"
        reply = raw.call(id=3, op="hello", version=1)
        assert reply["ok"] is True and reply["version"] == 1 and "list" in reply["features"]
        reply = raw.call(id=4, op="frobnicate")
        assert reply["id"] == 4 and reply["error"]["code"] == "not-supported"
        assert "frobnicate" in reply["error"]["message"]
        reply = raw.call(id=5, op="list")
        assert reply["id"] == 5 and reply["ok"] is True and reply["domains"][0]["name"] == "Domain-0"
        reply = raw.send(b'{"id": 6, "op": "list"\n')  # malformed JSON
        assert reply["error"]["code"] == "bad-request"
        reply = raw.send(b"[1, 2]\n")
        assert reply["error"]["code"] == "bad-request"
        reply = raw.call(id=7, op="destroy", domain="no-such-domain-here")
        assert reply["error"]["code"] == "no-such-domain"
        reply = raw.call(id=8, op="mem-set")
        assert reply["error"]["code"] == "bad-request"
        reply = raw.call(id=9, op="list")  # the same connection still works
        assert reply["id"] == 9 and reply["ok"] is True
    finally:
        raw.close()
    other = _Raw(path)  # and the daemon serves others
    try:
        assert other.send(b"\xff\xfe garbage\n")["error"]["code"] == "bad-request"
        assert other.call(id=1, op="hello", version=1)["ok"] is True
    finally:
        other.close()
    assert toolstack.daemon_pid() == pid
    assert toolstack.sv("list").returncode == 0
    stopper = _Raw(path)  # what `slimvisor daemon stop` sends
    daemon = os.pidfd_open(pid)
    try:
        assert "daemon-stop" in stopper.call(id=1, op="hello", version=1)["features"]
        assert stopper.call(id=2, op="daemon-stop") == {"id": 2, "ok": True, "pid": pid}
        assert select.select([daemon], [], [], 30)[0], "the daemon did not exit after daemon-stop"
    finally:
        os.close(daemon)
        stopper.close()


# -- 5. bad configurations -------------------------------------------------------------------------


BAD_CONFIGS = {
    "unknown-key": (["frobnicate = 3"], None, [r":4:", r"frobnicate"]),
    "missing-kernel": (['kernel = "/nonexistent"'], None, [r":4:", r"bad\.cfg:4: kernel /nonexistent: no such file"]),
    "too-much-memory": ([], 100000000, [r"memory", r"100000000", r"more than"]),
    "malformed-disk": (None, None, [r":3:", r"disk", r"zzz"]),
    "vcpus": (["vcpus = 4"], None, [r":4:", r"vcpus", r"one vCPU"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_rejected(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path, case: str) -> None:
    extra, memory, patterns = BAD_CONFIGS[case]
    cfg = tmp_path / "bad.cfg"
    if extra is None:
        cfg.write_text(f"name = \"{domname}\"\nmemory = 64\ndisk = ['{rootfs},raw,xvda,rw,zzz']\n")
    else:
        toolstack.config(cfg, domname, rootfs, *extra, memory=memory or 64)
    before = toolstack.domains()
    result = toolstack.sv("create", str(cfg), check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("slimvisor: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for pattern in patterns:
        assert re.search(pattern, result.stderr), f"{pattern!r} not in {result.stderr!r}"
    if any(p.startswith(":") for p in patterns):
        assert f"{cfg}:" in result.stderr
    assert toolstack.domains() == before
    assert toolstack.leftovers([domname]) == []
    assert domname not in toolstack.cgroups()


def test_duplicate_name_rejected(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                 consoles: list[ConsoleSession]) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs)
    consoles.append(console := boot(toolstack, cfg, domname))
    first = toolstack.domains()[domname]
    uml = uml_proc(toolstack, domname).pid
    again = toolstack.sv("create", str(cfg), check=False)
    assert again.returncode != 0 and domname in again.stderr and "already exists" in again.stderr
    assert toolstack.domains() == {domname: toolstack.domains()[domname]}
    assert toolstack.domains()[domname]["domid"] == first["domid"]
    assert uml_proc(toolstack, domname).pid == uml  # the running domain was not touched
    assert console.run("echo still-$((4 + 4))").strip() == "still-8"
    destroy_and_check(toolstack, domname)


# -- 6. no leaks -----------------------------------------------------------------------------------


def test_create_destroy_cycles_do_not_leak(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path) -> None:
    cycles, warmup = 50, 5
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs)
    text = cfg.read_text()
    pid = toolstack.daemon_pid()
    daemon = psutil.Process(pid)

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    booted = 0
    baseline: tuple[int, int] = (0, 0)
    with Client(toolstack.run_dir / "slimvisord.sock", autostart=False) as client:
        for i in range(cycles):
            if i == warmup:
                baseline = (fds(), daemon.memory_info().rss)
            reply = client.call("create", config=text, filename=str(cfg), cwd=str(tmp_path))
            assert reply["name"] == domname
            if i % 10 == 9:  # some boot all the way and use the xenstore before going
                console = toolstack.console(domname)
                try:
                    console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
                    assert console.run("xenstore-read name").strip() == domname
                finally:
                    console.kill()
                booted += 1
            client.call("destroy", domain=domname)
            wait_for(lambda: all(d["name"] != domname for d in client.call("list")["domains"]), 15, "destroyed")
    assert booted == 5
    time.sleep(0.5)
    assert toolstack.daemon_pid() == pid
    assert toolstack.domains() == {}
    assert toolstack.leftovers([domname]) == []
    end = (fds(), daemon.memory_info().rss)
    assert end[0] <= baseline[0], f"daemon fds {baseline[0]} -> {end[0]}"
    assert end[1] - baseline[1] < 8 << 20, f"daemon RSS {baseline[1] >> 20} -> {end[1] >> 20} MiB"
