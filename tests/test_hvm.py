"""HVM and PVH domains as a user runs them: Debian's cloud kernel in QEMU (TCG on this host), its
devices served by slimvisor's own backends, driven through the toolstack like PV domains.

The guest is the same busybox rootfs.ext4 PV domains boot, through slimvisor's boot initramfs built
with the cloud kernel's modules (`slimvisor image cloud`). Each test checks what a user sees:
the console, bytes on disk, packets between an HVM and a PV domain on one switch, the domain's
xenstore from inside, list/info, the host threads QEMU runs, and that nothing is left afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from slimvisor.images.cache import cloud_assets
from slimvisor.testing.expect import ConsoleSession
from slimvisor.toolstack.api import ApiError, Client
from tests.test_toolstack import AGENT_GONE, BOOT_TIMEOUT, boot, destroy_and_check, meminfo_kib, wait_for
from tests.toolstack import Toolstack

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"),
]  # fmt: skip


@pytest.fixture(scope="session")
def cloud() -> tuple[Path, Path]:
    """(vmlinuz, initrd) of Debian's cloud kernel with slimvisor's boot initramfs, built once."""
    return cloud_assets()


def hvm_config(toolstack: Toolstack, path: Path, name: str, rootfs: Path, cloud: tuple[Path, Path], kind: str,
               *extra: str, memory: int = 256, disks: tuple[Path, ...] = ()) -> Path:  # fmt: skip
    kernel, initrd = cloud
    return toolstack.config(path, name, rootfs, f'type = "{kind}"', "vcpus = 2", f'kernel = "{kernel}"',
                            f'ramdisk = "{initrd}"', *extra, memory=memory, disks=disks)  # fmt: skip


@pytest.fixture
def switch(toolstack: Toolstack, domname: str) -> Iterator[str]:
    name = f"sw{domname}"
    toolstack.sv("switch", "start", name)
    try:
        yield name
    finally:
        toolstack.sv("switch", "stop", name, check=False)


def qemu_of(toolstack: Toolstack, name: str) -> psutil.Process:
    """The domain's QEMU, among the pids the toolstack reports for it."""
    for pid in toolstack.domain_info(name)["pids"]:
        p = psutil.Process(int(pid))
        if p.exe() == os.path.realpath("/usr/bin/qemu-system-x86_64"):
            return p
    raise AssertionError(f"{name} has no QEMU process")


def test_hvm_domain_beside_a_pv_domain(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                       cloud: tuple[Path, Path], switch: str,
                                       consoles: list[ConsoleSession]) -> None:  # fmt: skip
    """One HVM domain (2 vCPUs) and one PV domain on one switch: the whole user-visible surface."""
    hvm, pv = f"{domname}h", f"{domname}p"
    hroot = tmp_path / "h.ext4"
    shutil.copyfile(rootfs, hroot)
    data = tmp_path / "data.raw"
    data.write_bytes(bytes(8 << 20))
    cfg = hvm_config(toolstack, tmp_path / "h.cfg", hvm, hroot, cloud, "hvm", f"vif = ['bridge={switch}']",
                     'extra = "sv.ip=10.61.0.1/24"', "balloon = 1", disks=(data,))  # fmt: skip
    pcfg = toolstack.config(tmp_path / "p.cfg", pv, rootfs, f"vif = ['bridge={switch}']",
                            'extra = "sv.ip=10.61.0.2/24"')  # fmt: skip
    h = boot(toolstack, cfg, hvm)
    consoles.append(h)
    p = boot(toolstack, pcfg, pv)
    consoles.append(p)
    row = toolstack.domains()[hvm]
    assert (row["vcpus"], row["memory_mib"]) == (2, 256)
    assert h.run("nproc").strip() == "2"
    assert re.match(r"qemu \((tcg|kvm): ", toolstack.json("info")["engines"]["hvm"])
    # The network: both ways, then 4 MiB over TCP from the HVM domain to the PV one.
    h.run("ping -c 2 -W 5 10.61.0.2 > /dev/null")
    assert h.last_status == 0, "the HVM domain cannot reach the PV domain"
    p.run("ping -c 2 -W 5 10.61.0.1 > /dev/null")
    assert p.last_status == 0, "the PV domain cannot reach the HVM domain"
    p.send("socat -u TCP-LISTEN:5001,reuseaddr OPEN:/tmp/got,creat,trunc &")
    p.run("i=0; while ! netstat -ltn | grep -q :5001 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done")
    h.run("dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null")
    sent = h.run("md5sum /tmp/blob").split()[0]
    h.run("socat -u OPEN:/tmp/blob TCP:10.61.0.2:5001")
    assert h.last_status == 0
    wait_for(lambda: p.run("md5sum /tmp/got").split()[0] == sent, 30, "the 4 MiB to arrive whole")
    # Its xenstore subtree, from inside, over vsock as PV guests reach theirs.
    assert h.run("xenstore-read name").strip() == hvm
    # Bytes on its second disk, flushed by the guest, are in the host's file.
    h.run("printf HVM-MARKER | dd of=/dev/vdb bs=512 seek=8 conv=fsync 2>/dev/null")
    assert h.last_status == 0
    with open(data, "rb") as f:
        f.seek(8 * 512)
        assert f.read(10) == b"HVM-MARKER"
    # mem-set moves QEMU's balloon: the guest's memory shrinks.
    before = meminfo_kib(h)
    toolstack.sv("mem-set", hvm, "128")
    wait_for(lambda: meminfo_kib(h) < before - (96 << 10), 60, "the balloon to inflate")
    assert toolstack.domains()[hvm]["memory_mib"] == 128
    # vcpu-pin moves one vCPU thread of QEMU.
    qemu = qemu_of(toolstack, hvm)
    with Client(toolstack.run_dir / "slimvisord.sock", autostart=False, timeout=60) as client:
        pinned = client.call("vcpu-pin", domain=hvm, vcpu=1, cpus=[0])["domains"][0]
    thread = int(pinned["thread"])
    assert thread in {t.id for t in qemu.threads()} and os.sched_getaffinity(thread) == {0}
    with (Client(toolstack.run_dir / "slimvisord.sock", autostart=False, timeout=60) as client,
          pytest.raises(ApiError, match="cpu 99 not available on this host")):  # checked before it is kept
        client.call("vcpu-pin", domain=hvm, vcpu=1, cpus=[99])
    assert os.sched_getaffinity(thread) == {0}
    # pause and unpause.
    toolstack.sv("pause", hvm)
    assert toolstack.domains()[hvm]["state"] == "paused"
    toolstack.sv("unpause", hvm)
    assert h.run("echo alive").strip() == "alive"
    # shutdown: the ACPI power button, as for an HVM guest without PV drivers (its agent for
    # Xen's control/shutdown stopped, and its feature flag cleared).
    h.run("kill -- -$(cat /run/xen-shutdown.pid) && xenstore-write control/feature-poweroff 0")
    assert h.last_status == 0 and h.run(AGENT_GONE) == ""
    toolstack.sv("shutdown", "-w", hvm, timeout=BOOT_TIMEOUT)
    assert hvm not in toolstack.domains()
    wait_for(lambda: not qemu.is_running(), 30, "QEMU to be gone")
    log = (toolstack.log_dir / f"{hvm}.console.log").read_text(errors="replace")
    assert "poweroff requested through the ACPI power button; domain powered off; on_poweroff=destroy" in log
    destroy_and_check(toolstack, pv)
    assert toolstack.leftovers([hvm, pv]) == []


def test_hvm_reboot_restarts_and_panic_is_a_crash(toolstack: Toolstack, rootfs: Path, domname: str,
                                                  tmp_path: Path, cloud: tuple[Path, Path]) -> None:  # fmt: skip
    cfg = hvm_config(toolstack, tmp_path / "h.cfg", domname, rootfs, cloud, "hvm", 'on_reboot = "restart"',
                     'on_crash = "preserve"')  # fmt: skip
    console = boot(toolstack, cfg, domname)
    try:
        domid = toolstack.domains()[domname]["domid"]
        first = qemu_of(toolstack, domname).pid
        console.send("reboot")
        start = len(console.out)
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT, start=start)
        assert toolstack.domains()[domname]["domid"] == domid
        assert qemu_of(toolstack, domname).pid != first  # a fresh incarnation, as Xen's on_reboot=restart
        console.run("true")
        console.send("echo c > /proc/sysrq-trigger")
        row = toolstack.wait_state(domname, ("crashed",), timeout=BOOT_TIMEOUT)
        assert row is not None
        log = (toolstack.log_dir / f"{domname}.console.log").read_text(errors="replace")
        assert re.search(r"guest kernel panic: .*on_crash=preserve", log), log[-2000:]
    finally:
        console.kill()
    destroy_and_check(toolstack, domname)


def test_pvh_created_paused_runs_nothing_until_unpaused(toolstack: Toolstack, rootfs: Path, domname: str,
                                                        tmp_path: Path, cloud: tuple[Path, Path]) -> None:  # fmt: skip
    cfg = hvm_config(toolstack, tmp_path / "p.cfg", domname, rootfs, cloud, "pvh")
    created = toolstack.sv("create", "-p", str(cfg))
    assert f"Domain {domname} created" in created.stderr
    assert toolstack.domains()[domname]["state"] == "paused"
    qemu = qemu_of(toolstack, domname)
    log = toolstack.log_dir / f"{domname}.console.log"
    # QEMU started with -S: its vCPUs have not run one instruction, so the guest printed nothing.
    wait_for(lambda: qemu.status() in (psutil.STATUS_SLEEPING, psutil.STATUS_IDLE), 30, "QEMU to idle")
    assert "Linux version" not in log.read_text(errors="replace")
    toolstack.sv("unpause", domname)
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert console.run("nproc").strip() == "2"
        assert "Linux version" in log.read_text(errors="replace")
        assert console.run("xenstore-read control/feature-poweroff").strip() == "1"
        # The domain outlives its daemon, as PV domains do: a new daemon finds it running.
        old = toolstack.daemon_pid()
        toolstack.sv("daemon", "stop")
        assert toolstack.domains()[domname]["state"] in ("running", "blocked")
        assert toolstack.daemon_pid() != old and qemu.is_running()
        assert console.run("echo still-here").strip() == "still-here"
    finally:
        console.kill()
    destroy_and_check(toolstack, domname)


def test_pv_config_with_an_ordinary_kernel_runs_as_pvh(toolstack: Toolstack, rootfs: Path, domname: str,
                                                      tmp_path: Path, cloud: tuple[Path, Path]) -> None:  # fmt: skip
    """A Xen user's PV config with a distribution kernel and two vCPUs starts unchanged, as PVH."""
    kernel, initrd = cloud
    cfg = toolstack.config(tmp_path / "pv.cfg", domname, rootfs, f'kernel = "{kernel}"', f'ramdisk = "{initrd}"',
                           "vcpus = 2", 'root = "/dev/vda"', memory=256)  # fmt: skip
    created = toolstack.sv("create", str(cfg))
    assert re.search(r"warning: kernel .* is not User-Mode Linux: this PV domain runs as PVH", created.stderr)
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert console.run("nproc").strip() == "2"
        # Xen's PV shutdown protocol: the guest's agent takes part, so the toolstack asks it there.
        assert console.run("xenstore-read control/feature-poweroff").strip() == "1"
        toolstack.sv("shutdown", "-w", domname, timeout=BOOT_TIMEOUT)
        assert domname not in toolstack.domains()
        text = (toolstack.log_dir / f"{domname}.console.log").read_text(errors="replace")
        assert "poweroff requested through xenstore control/shutdown; domain powered off" in text, text[-1500:]
    finally:
        console.kill()
    wait_for(lambda: toolstack.leftovers([domname]) == [], 30, "nothing left")


def test_hvm_errors_leave_nothing(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path,
                                  cloud: tuple[Path, Path]) -> None:  # fmt: skip
    """A PVH domain needs a kernel with the PVH note; a PV one has one vCPU: refused at create."""
    not_pvh = tmp_path / "vmlinux"
    not_pvh.write_bytes(b"\x7fELF\x02\x01" + bytes(200))
    cfg = toolstack.config(tmp_path / "a.cfg", domname, rootfs, 'type = "pvh"', f'kernel = "{not_pvh}"')
    r = toolstack.sv("create", str(cfg), check=False)
    assert r.returncode != 0 and "has no Xen PVH entry note" in r.stderr and f"{cfg}" in r.stderr
    uml = toolstack.config(tmp_path / "b.cfg", domname, rootfs, "vcpus = 2")
    r = toolstack.sv("create", str(uml), check=False)
    assert r.returncode != 0 and "PV domains (User-Mode Linux) have exactly one vCPU" in r.stderr
    assert domname not in toolstack.domains() and toolstack.leftovers([domname]) == []


CORPUS = Path(__file__).parent / "data" / "xlcfg"


@pytest.mark.parametrize("example", ["xen-xlexample.hvm.cfg", "xen-xlexample.pvhlinux.cfg"])
def test_xen_examples_start(toolstack: Toolstack, domname: str, tmp_path: Path, cloud: tuple[Path, Path],
                            example: str) -> None:  # fmt: skip
    """Xen's own tools/examples/xlexample.hvm and .pvhlinux, with only their paths changed (and the
    name, unique to this run): the HVM one boots its disk through SeaBIOS and GRUB (a bootable busybox
    disk), the PVH one the cloud kernel with root=/dev/xvda1 on that disk's first partition. The PVH
    one gets a ramdisk= line too: Debian's cloud kernel has virtio-blk as a module."""
    from slimvisor.images.cache import bootable_disk

    disk = tmp_path / "guest.img"
    shutil.copyfile(bootable_disk(), disk)
    kernel, initrd = cloud
    text = (CORPUS / example).read_text()
    text = re.sub(r"disk = \[ '[^,]*,", f"disk = [ '{disk},", text)
    text = re.sub(r'name = "[^"]*"', f'name = "{domname}"', text)
    text = text.replace('kernel = "/boot/vmlinuz"', f'kernel = "{kernel}"\nramdisk = "{initrd}"')
    cfg = tmp_path / example
    cfg.write_text(text)
    toolstack.sv("switch", "start", "xenbr0")  # vif = [ '' ]: xl's default bridge
    try:
        console = boot(toolstack, cfg, domname)
        try:
            kind = "hvm" if example.endswith("hvm.cfg") else "pvh"
            vcpus = 2 if kind == "hvm" else 4
            assert toolstack.domains()[domname]["vcpus"] == vcpus
            assert console.run("nproc").strip() == str(vcpus)
            assert console.run("mount | grep ' / '").startswith("/dev/vda1 on / type ext4")
            assert console.run("cat /sys/class/net/eth0/operstate").strip() in ("up", "unknown", "down")
            if kind == "hvm":
                assert "BOOT_IMAGE=/boot/vmlinuz" in console.run("cat /proc/cmdline")  # GRUB booted it
        finally:
            console.kill()
        destroy_and_check(toolstack, domname)
    finally:
        toolstack.sv("switch", "stop", "xenbr0", check=False)


def test_pygrub_boots_the_disks_grub_entry_with_phy_and_qcow2_disks(
        toolstack: Toolstack, domname: str, tmp_path: Path, cloud: tuple[Path, Path], loop_device: str) -> None:
    """bootloader = "pygrub" with a distribution-style disk (GRUB, its kernel and initramfs in
    /boot), a phy: loop device and a qcow2 image: the domain boots the disk's GRUB entry as PVH (a PV
    config with an ordinary kernel) with its vCPUs, and reads all three disks."""
    from slimvisor.images.cache import bootable_disk
    from tests.conftest import MARK_PHY
    from tests.test_xlcfg_guests import MARK_QCOW2, qcow2_with

    disk = tmp_path / "guest.img"
    shutil.copyfile(bootable_disk(), disk)
    qcow2 = qcow2_with(tmp_path / "data.qcow2", MARK_QCOW2)
    cfg = tmp_path / "pygrub.cfg"
    cfg.write_text(f"""\
name = "{domname}"
bootloader = "/usr/lib/xen-4.17/bin/pygrub"
memory = 256
vcpus = 2
disk = [ 'file:{disk},xvda,w', 'phy:{loop_device},xvdb,w', 'format=qcow2,vdev=xvdc,access=rw,target={qcow2}' ]
""")
    created = toolstack.sv("create", str(cfg))
    assert "bootloader: booting 'slimvisor guest'" in created.stderr
    assert "this PV domain runs as PVH" in created.stderr
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert console.run("nproc").strip() == "2"
        assert console.run("mount | grep ' / '").startswith("/dev/vda1 on / type ext4")  # GRUB's root=
        assert console.run("head -c 16 /dev/vdb").strip() == MARK_PHY.decode()
        assert console.run("head -c 16 /dev/vdc").strip() == MARK_QCOW2.decode()
    finally:
        console.kill()
    destroy_and_check(toolstack, domname)


@pytest.fixture(scope="session")
def debian_bootable() -> Path:
    """`slimvisor image debian --bootable` (mmdebstrap with Debian's cloud kernel, GRUB in the MBR),
    built once through the CLI and cached."""
    import subprocess
    import sys

    from slimvisor.images import debian
    from slimvisor.images.cache import cache_dir

    path = cache_dir() / f"debian-bootable-{debian.fingerprint()}.img"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "slimvisor", "image", "debian", str(path), "--bootable", "--size",
                        "1G"], check=True, timeout=900)  # fmt: skip
    return path


def test_debian_bootable_disk_reaches_its_login(toolstack: Toolstack, domname: str, tmp_path: Path,
                                                debian_bootable: Path) -> None:  # fmt: skip
    """An HVM domain with no kernel: SeaBIOS boots the disk's GRUB, GRUB Debian's kernel and
    initramfs, systemd a getty on the serial console, which logs root in."""
    disk = tmp_path / "debian.img"
    shutil.copyfile(debian_bootable, disk)
    cfg = toolstack.config(tmp_path / "d.cfg", domname, disk, 'type = "hvm"', "vcpus = 2", memory=512)
    toolstack.sv("create", str(cfg))
    console = toolstack.console(domname)
    try:
        console.expect(r"login: root \(automatic login\)|root@\S+:~#", timeout=BOOT_TIMEOUT * 2)
        console.expect(r"root@\S+:~#", timeout=BOOT_TIMEOUT)
        assert "Debian" in console.run("cat /etc/os-release")
    finally:
        console.kill()
    destroy_and_check(toolstack, domname)
