"""Save, restore and live migration as a user runs them (xl save/restore/migrate), with real guests.

Two "hosts" are two slimvisord daemons on this machine, each with its own run, state and log trees
(`Toolstack`); their switches of one name are joined as two hosts on one LAN are: each switch's TAP
uplink in one Linux bridge. Disks are shared storage (the same files). A PVH domain (QEMU, TCG
here) with `xen_platform_pci = 0` (no vsock: QEMU 7.2 cannot migrate vhost-user-vsock) moves
while it writes a counter to its disk and streams numbered lines over TCP to a PV domain that stays.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimvisor.engines.qemu.engine import host_accel
from slimvisor.testing.expect import ConsoleSession
from tests.test_hvm import cloud, hvm_config  # noqa: F401 - `cloud` is a fixture
from tests.test_toolstack import boot, destroy_and_check, wait_for
from tests.toolstack import Toolstack

pytestmark = [pytest.mark.guest]

PV_REFUSAL = "PV domains (User-Mode Linux) cannot be saved or migrated"


@pytest.fixture
def target() -> Iterator[Toolstack]:
    """A second host: a daemon with trees of its own, started as every command starts it."""
    ts = Toolstack()
    ts.sv("list")
    try:
        yield ts
    finally:
        ts.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def lan(toolstack: Toolstack, target: Toolstack, domname: str) -> Iterator[str]:
    """A switch of one name on both hosts, their TAP uplinks in one Linux bridge (the LAN)."""
    name = f"sw{domname}"
    tag = hashlib.sha256(domname.encode()).hexdigest()[:8]
    bridge, taps = f"svb{tag}", [f"sva{tag}", f"svz{tag}"]
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("link", "set", bridge, "up")
        for ts, tap in zip((toolstack, target), taps, strict=True):
            ts.sv("switch", "start", name, "--uplink", tap)
            _ip("link", "set", tap, "master", bridge, "up")
        yield name
    finally:
        for ts in (toolstack, target):
            ts.sv("switch", "stop", name, check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)


def migratable_config(toolstack: Toolstack, tmp_path: Path, name: str, rootfs: Path, kernel: tuple[Path, Path],
                      *extra: str, disks: tuple[Path, ...] = (), kind: str = "pvh") -> Path:  # fmt: skip
    """A migratable HVM or PVH domain: no xenstore link (xen_platform_pci=0), its root disk and `disks`."""
    root = tmp_path / f"{name}.ext4"
    shutil.copyfile(rootfs, root)
    return hvm_config(toolstack, tmp_path / f"{name}.cfg", name, root, kernel, kind, "xen_platform_pci = 0", *extra,
                      disks=disks)  # fmt: skip


def identity(console: ConsoleSession) -> tuple[str, float]:
    """The guest's boot id (new at every boot) and its uptime."""
    boot_id, uptime = console.run("cat /proc/sys/kernel/random/boot_id /proc/uptime").split()[:2]
    return boot_id, float(uptime)


# The peer's check of the stream, in awk: every line is the number of the line before plus one; the
# very last may be cut short (the sender is stopped mid-write), so it need only begin that number.
CHECK_LINES = (
    '$1 != NR - 1 { if (bad == "") bad = NR ": " $0; last = NR } '
    'NR % 5000 == 0 { print NR > "/tmp/got" } '
    'END { if (bad != "" && !(last == NR && bad == NR ": " $0 && index(NR - 1, $0) == 1)) print bad > "/tmp/bad"; '
    'print "end", NR > "/tmp/end" }'
)


def console_tail(toolstack: Toolstack, name: str) -> str:
    log = toolstack.log_dir / f"{name}.console.log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no console log)"


def counter(path: Path) -> int:
    """The counter the guest writes at the start of its second disk ("%08d\\n", flushed each time)."""
    head = path.read_bytes()[:9]
    assert re.fullmatch(rb"[0-9]{8}\n", head), f"the counter's sector holds {head!r}"
    return int(head)


def test_live_migration_keeps_the_disk_the_tcp_stream_and_the_guest(
        toolstack: Toolstack, target: Toolstack, lan: str, rootfs: Path, domname: str, tmp_path: Path,
        cloud: tuple[Path, Path], consoles: list[ConsoleSession]) -> None:  # noqa: F811  # fmt: skip
    mover, peer = f"{domname}m", f"{domname}p"
    data = tmp_path / "counter.raw"
    data.write_bytes(bytes(1 << 20))
    # An HVM domain (the other tests move PVH ones). Under TCG it is copied stopped, as QEMU 7.2 loses
    # guest writes in live migrations there (QemuEngine.why_not_live); the stream waits that long.
    cfg = migratable_config(toolstack, tmp_path, mover, rootfs, cloud, f"vif = ['bridge={lan},rate=2Mb/s']",
                            'extra = "sv.ip=10.62.0.1/24"', "cpu_weight = 512", 'on_crash = "preserve"',
                            disks=(data,), kind="hvm")  # fmt: skip
    pcfg = toolstack.config(tmp_path / "p.cfg", peer, rootfs, f"vif = ['bridge={lan}']", 'extra = "sv.ip=10.62.0.2/24"')
    m = boot(toolstack, cfg, mover)
    consoles.append(m)
    p = boot(toolstack, pcfg, peer)
    consoles.append(p)
    m.run("ping -c 2 -W 5 10.62.0.2 > /dev/null")
    assert m.last_status == 0, "the HVM domain cannot reach the PV domain"
    # A numbered line stream from the mover to the peer (its vif limited to 2 Mb/s), checked line by
    # line as it arrives (awk: every line is the one before plus one, else it stops, which breaks
    # the stream), and a counter flushed to the mover's second disk, until the mover stops them.
    p.send(f"socat -u TCP-LISTEN:5002,reuseaddr STDOUT | awk '{CHECK_LINES}' &")
    p.run("i=0; while ! netstat -ltn | grep -q :5002 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done")
    m.send("(seq 0 999999999 | socat -u STDIN TCP:10.62.0.2:5002; echo stream-exit=$? > /tmp/stream) > /dev/null"
           " 2>&1 &")  # fmt: skip
    m.send("(n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); printf '%08d\\n' $n |"
           " dd of=/dev/vdb bs=512 conv=fsync 2>/dev/null; done) > /dev/null 2>&1 &")  # fmt: skip

    def received() -> int:
        """Lines that arrived in order so far (to the last 5000)."""
        return int(p.run("tail -n 1 /tmp/got 2>/dev/null || echo 0").strip() or 0)

    wait_for(lambda: received() >= 10000, 60, "the stream to flow")
    wait_for(lambda: counter(data) > 3 if data.read_bytes()[:1] != b"\0" else False, 60, "the counter to count")
    boot_id, uptime = identity(m)
    before = counter(data)
    m.kill()
    consoles.remove(m)
    source = toolstack.domains()[mover]
    toolstack.sv("xenstore-write", f"/local/domain/{source['domid']}/data/mark", "carried")

    moved = toolstack.sv("migrate", mover, "--daemon", str(target.run_dir / "slimvisord.sock"), timeout=300)
    assert re.search(rf"Domain {mover} migrated \(now id \d+ on ", moved.stderr)
    assert mover not in toolstack.domains()
    arrived = target.domains().get(mover)
    assert arrived is not None, f"{mover} did not arrive; its console there ends: {console_tail(target, mover)}"
    assert arrived["state"] in ("running", "blocked")
    # Its name, uuid, xenstore nodes, weight and policies came along; its domid is the target's.
    assert arrived["uuid"] == source["uuid"]
    assert target.sv("xenstore-read", f"/local/domain/{arrived['domid']}/data/mark").stdout.strip() == "carried"
    record = target.domain_info(mover)["record"]
    assert record["cpu_weight"] == 512 and record["policies"]["on_crash"] == "preserve"
    assert target.domain_info(mover)["migration"]["status"] == "completed"
    # The source left nothing of the domain: no process, run directory or cgroup.
    assert [x for x in toolstack.leftovers([mover]) if peer not in x] == []

    m = target.console(mover)
    consoles.append(m)
    after_id, after_uptime = identity(m)
    assert after_id == boot_id and after_uptime > uptime, "the guest rebooted instead of moving"
    # Both kept going on the target: more lines arrive, the counter counts on.
    flowed = received()
    wait_for(lambda: received() >= flowed + 10000, 60, "the stream to flow after the migration")
    wait_for(lambda: counter(data) > before, 60, "the counter to count on after the migration")
    m.run("touch /tmp/stop; killall seq")
    wait_for(lambda: m.run("cat /tmp/stream 2>/dev/null").strip(), 60, "the stream to end")
    assert m.run("cat /tmp/stream").strip() == "stream-exit=0", "the TCP stream broke"
    # Every line arrived once and in order: 0, 1, 2, ... (no reset, no loss, no corruption).
    wait_for(lambda: p.run("cat /tmp/end /tmp/bad 2>/dev/null").strip(), 30, "the stream's end at the peer")
    assert p.run("cat /tmp/bad 2>/dev/null").strip() == ""
    lines = int(p.run("cat /tmp/end").split()[1])
    assert lines > flowed + 10000
    # The counter on the disk is whole and went on from where it was.
    assert counter(data) > before
    destroy_and_check(target, mover)
    destroy_and_check(toolstack, peer)


def test_save_and_restore_keep_the_guests_memory(toolstack: Toolstack, rootfs: Path, domname: str,
                                                tmp_path: Path, cloud: tuple[Path, Path]) -> None:  # noqa: F811  # fmt: skip
    cfg = migratable_config(toolstack, tmp_path, domname, rootfs, cloud)
    saved = tmp_path / "domain.save"
    c = boot(toolstack, cfg, domname)
    try:
        # 32 MiB of random bytes in guest memory (a tmpfs), and their checksum.
        c.run("mkdir -p /run/mem && mount -t tmpfs none /run/mem && dd if=/dev/urandom of=/run/mem/blob bs=1M count=32"
              " 2>/dev/null")  # fmt: skip
        sum_before = c.run("md5sum /run/mem/blob").split()[0]
        boot_id, uptime = identity(c)
    finally:
        c.kill()
    out = toolstack.sv("save", domname, str(saved))
    assert f"Domain {domname} saved to {saved}" in out.stderr
    assert domname not in toolstack.domains()
    assert toolstack.leftovers([domname]) == []
    assert saved.stat().st_size > 32 << 20 and not Path(f"{saved}.part").exists()
    restored = toolstack.sv("restore", str(saved))
    assert re.search(rf"Domain {domname} restored \(id \d+\)", restored.stderr)
    c = toolstack.console(domname)
    try:
        assert c.run("md5sum /run/mem/blob").split()[0] == sum_before
        after_id, after_uptime = identity(c)
        assert after_id == boot_id and after_uptime > uptime
        # It runs on: its disk is its own again (written and read back).
        c.run("echo restored > /root/mark && sync && cat /root/mark")
        assert c.last_status == 0
    finally:
        c.kill()
    # A second restore of the same file while the domain runs: refused, nothing started.
    again = toolstack.sv("restore", str(saved), check=False)
    assert again.returncode != 0 and f"domain {domname!r} already exists" in again.stderr
    destroy_and_check(toolstack, domname)


RELAY = textwrap.dedent("""
    # Relays stdin/stdout to the target's slimvisord (as `ssh HOST slimvisor migrate-receive`
    # does), but kills the target's domain (its supervisor, SIGKILL) after CUT bytes of the state.
    import os, select, signal, socket, sys, json, pathlib
    run, cut = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    s = socket.socket(socket.AF_UNIX); s.connect(str(run / "slimvisord.sock"))
    sent = 0
    while True:
        r, _, _ = select.select([0, s], [], [])
        if 0 in r:
            data = os.read(0, 65536)
            if not data:
                break
            s.sendall(data)
            sent += len(data)
            if sent > cut:
                for state in (run / "domains").glob("*/state.json"):
                    os.kill(json.loads(state.read_text())["supervisor_pid"], signal.SIGKILL)
                break
        if s in r:
            data = s.recv(65536)
            if not data:
                break
            os.write(1, data)
""")


def test_a_migration_whose_target_dies_leaves_the_domain_running(
        toolstack: Toolstack, target: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
        cloud: tuple[Path, Path]) -> None:  # noqa: F811  # fmt: skip
    """The target (reached through a command, as over ssh) dies once 4 MiB of state went over."""
    cfg = migratable_config(toolstack, tmp_path, domname, rootfs, cloud)
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    c = boot(toolstack, cfg, domname)
    try:
        boot_id, _ = identity(c)
        command = f"{sys.executable} {relay} {target.run_dir} {4 << 20}"
        failed = toolstack.sv("migrate", "-s", "", domname, command, check=False, timeout=300)
        assert failed.returncode == 1
        if host_accel().name == "tcg":  # copied stopped under TCG, and said so
            assert "loses guest writes in live migrations under TCG" in failed.stderr
        assert re.search(rf"{domname} did not move: .*; it is (running|blocked) here", failed.stderr), failed.stderr
        assert toolstack.domains()[domname]["state"] in ("running", "blocked")
        assert identity(c)[0] == boot_id and c.run("echo still-here").strip() == "still-here"
        wait_for(lambda: domname not in target.domains(), 30, "the target to forget the domain")
        assert target.leftovers([domname]) == []
    finally:
        c.kill()
    destroy_and_check(toolstack, domname)


def test_save_and_migrate_of_a_pv_domain_are_refused(toolstack: Toolstack, target: Toolstack, rootfs: Path,
                                                    domname: str, tmp_path: Path) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "pv.cfg", domname, rootfs)
    c = boot(toolstack, cfg, domname)
    c.kill()
    saved = tmp_path / "pv.save"
    refused = toolstack.sv("save", domname, str(saved), check=False)
    assert refused.returncode != 0 and PV_REFUSAL in refused.stderr and "ptrace" in refused.stderr
    assert not saved.exists() and not Path(f"{saved}.part").exists()
    refused = toolstack.sv("migrate", domname, "--daemon", str(target.run_dir / "slimvisord.sock"), check=False)
    assert refused.returncode != 0 and PV_REFUSAL in refused.stderr
    assert toolstack.domains()[domname]["state"] in ("running", "blocked")
    assert target.domains() == {}
    destroy_and_check(toolstack, domname)


def test_restore_of_a_file_that_is_not_a_save_leaves_nothing(toolstack: Toolstack, tmp_path: Path) -> None:
    junk = tmp_path / "junk.save"
    junk.write_bytes(b'{"magic": "something else"}\n' + os.urandom(4096))
    out = toolstack.sv("restore", str(junk), check=False)
    assert out.returncode != 0 and f"{junk}: not a slimvisor save file" in out.stderr
    assert toolstack.domains() == {}
    assert not (toolstack.run_dir / "domains").exists() or not any((toolstack.run_dir / "domains").iterdir())

