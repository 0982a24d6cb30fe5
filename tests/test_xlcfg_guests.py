"""xl.cfg files as Xen users write them, on real UML domains: phy: loop devices, qcow2 through
qemu-storage-daemon, vdev names with gaps and partitions, root= in Xen's names, console=hvc0,
maxmem above memory, create -n, and errors found after parsing naming file:line."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import MARK_PHY, make_disk
from tests.guest import Console
from tests.guest import leftovers as run_leftovers
from tests.test_toolstack import meminfo_kib, wait_for
from tests.toolstack import Toolstack

pytestmark = pytest.mark.guest
BOOT_TIMEOUT = 180

MARK_QCOW2 = b"qcow2-disk-mark!"


def qcow2_with(path: Path, data: bytes) -> Path:
    raw = make_disk(path.with_suffix(".raw"), 4 << 20, data)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def qsd_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "qemu-storage-daemon"]


def test_phy_loop_and_qcow2_disks_with_xen_names(toolstack: Toolstack, rootfs: Path, domname: str,
                                                 tmp_path: Path, loop_device: str) -> None:  # fmt: skip
    qcow2 = qcow2_with(tmp_path / "data.qcow2", MARK_QCOW2)
    before = set(qsd_pids())
    cfg = tmp_path / "xen.cfg"
    cfg.write_text(f"""\
name = "{domname}"
memory = 64
root = "/dev/sda"
extra = "console=hvc0"
localtime = 0
acpi = 1
disk = [ 'file:{rootfs},xvda,w',
         'phy:{loop_device},xvdb,w',
         'format=qcow2,vdev=xvdd,access=rw,target={qcow2}' ]
""")
    dry = toolstack.sv("create", "-n", str(cfg))
    described = json.loads(dry.stdout)
    assert [(d["vdev"], d["backend"]) for d in described["disks"]] == [("xvda", "blk"), ("xvdb", "blk"),
                                                                      ("xvdd", "qsd")]  # fmt: skip
    assert "localtime is ignored" in dry.stderr and toolstack.domains().get(domname) is None
    toolstack.sv("create", str(cfg))
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert console.run("head -c 16 /dev/xvdb").strip() == MARK_PHY.decode()
        assert console.run("head -c 16 /dev/vdc").strip() == MARK_QCOW2.decode()
        assert console.run("readlink /dev/xvdd").strip() == "vdc"
        assert console.run("cat /sys/block/vdb/size").strip() == str((8 << 20) // 512)  # the device's size
        assert console.run("mount | grep ' / '").startswith("/dev/vda")  # root=/dev/sda: the disk xvda
        console.run("echo -n written-by-guest > /dev/vdc; sync")
        mark = len(console.out)
        toolstack.sv("reboot", domname)  # the daemon keeps serving the qcow2 disk; UML connects again
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT, start=mark)
        assert console.run("head -c 16 /dev/xvdd").strip() == "written-by-guest"
    finally:
        console.kill()
    toolstack.sv("destroy", domname)
    toolstack.wait_state(domname, ("gone",))
    assert toolstack.leftovers([domname]) == []
    assert set(qsd_pids()) == before
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -v 0 16", str(qcow2)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    assert b"written-by-guest".hex(" ") in read  # qemu-io's dump of the image's first bytes


def test_create_errors_name_file_and_line(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path) -> None:
    bad = tmp_path / "not.qcow2"
    bad.write_bytes(b"x" * 65536)
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(f"name = '{domname}'\nkernel = '{rootfs}'\ndisk = [ '{tmp_path}/none.raw,raw,xvda,w',\n"
                   f"  '{bad},qcow2,xvdb,w' ]\nvif = [ 'bridge=no{domname}' ]\n")  # fmt: skip
    for args in (("create", "-n", str(cfg)), ("create", str(cfg))):
        failed = toolstack.sv(*args, check=False)
        assert failed.returncode == 1
        assert failed.stderr.splitlines() == [
            f"slimvisor: error: {cfg}:2: kernel {rootfs}: not executable",
            f"{cfg}:3: disk {tmp_path}/none.raw: no such file or block device",
            f"{cfg}:4: disk {bad}: Image is not in qcow2 format",
            f"{cfg}:5: vif 0: switch no{domname} is not running (slimvisor switch start no{domname})",
        ]
    assert toolstack.domains().get(domname) is None
    assert toolstack.leftovers([domname]) == []
    with contextlib.suppress(FileNotFoundError):
        assert not any(Path("/run/slimvisor").glob(f"*{domname}*"))


def test_maxmem_above_memory_starts_ballooned(toolstack: Toolstack, rootfs: Path, domname: str,
                                              tmp_path: Path) -> None:  # fmt: skip
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs, "maxmem = 128")  # memory = 64
    toolstack.sv("create", str(cfg))
    assert toolstack.domains()[domname]["memory_mib"] == 64
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert "mem=128M" in console.text  # the guest has room for maxmem ...
        wait_for(lambda: meminfo_kib(console) < 64 * 1024, 30, "the balloon to hold maxmem - memory")
        low = meminfo_kib(console)
        toolstack.sv("mem-set", domname, "128M")  # ... and gets it when given
        wait_for(lambda: meminfo_kib(console) - low > 60 * 1024, 30, "the balloon to give back 64 MiB")
        above = toolstack.sv("mem-set", domname, "129M", check=False)
        assert above.returncode != 0 and "above maxmem (128 MiB)" in above.stderr
    finally:
        console.kill()
    toolstack.sv("destroy", domname)
    toolstack.wait_state(domname, ("gone",))
    assert toolstack.leftovers([domname]) == []


def partitioned(rootfs: Path, dest: Path) -> Path:
    """A disk with an MBR partition table and `rootfs` as its first partition (at 1 MiB)."""
    sectors = rootfs.stat().st_size // 512
    make_disk(dest, rootfs.stat().st_size + (2 << 20))
    with open(dest, "r+b") as f:  # one MBR entry: not active, CHS unused, type 0x83 (Linux), LBA 2048
        f.seek(446)
        f.write(struct.pack("<B3sB3sII", 0, b"\xff\xff\xff", 0x83, b"\xff\xff\xff", 2048, sectors))
        f.seek(510)
        f.write(b"\x55\xaa")
    subprocess.run(["dd", f"if={rootfs}", f"of={dest}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"],
                   check=True)  # fmt: skip
    return dest


def test_root_on_a_partition_in_xens_names(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path) -> None:
    disk = partitioned(rootfs, tmp_path / "parted.img")
    data = make_disk(tmp_path / "data.raw", 1 << 20, MARK_PHY)
    cfg = tmp_path / "d.cfg"
    cfg.write_text(f"name = '{domname}'\nmemory = 64\nextra = 'root=/dev/xvda1 console=xvc0'\n"
                   f"disk = [ '{data},raw,xvdc1,r', '{disk},raw,xvda,w' ]\n")  # fmt: skip
    toolstack.sv("create", str(cfg))
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert console.run("mount | grep ' / '").startswith("/dev/vda1 ")
        assert console.run("readlink /dev/xvda1").strip() == "vda1"
        assert console.run("head -c 16 /dev/xvdc1").strip() == MARK_PHY.decode()  # a partition vdev: a whole disk
        assert console.run("echo x 2>/dev/null > /dev/xvdc1 || echo refused").strip().endswith("refused")  # access=r
    finally:
        console.kill()
    toolstack.sv("destroy", domname)
    toolstack.wait_state(domname, ("gone",))
    assert toolstack.leftovers([domname]) == []


def test_run_serves_a_qcow2_disk_and_leaves_nothing(rootfs: Path, domname: str, tmp_path: Path) -> None:
    """`slimvisor run` (no daemon) starts and reaps the domain's qemu-storage-daemon too."""
    qcow2 = qcow2_with(tmp_path / "data.qcow2", MARK_QCOW2)
    before = set(qsd_pids())
    con = Console("--memory", "64", "--disk", str(rootfs), "--disk", f"{qcow2},format=qcow2", name=domname)
    try:
        con.expect(r"slimvisor: \S+ is up", timeout=BOOT_TIMEOUT)
        assert con.run("head -c 16 /dev/vdb").strip() == MARK_QCOW2.decode()
        (pid,) = set(qsd_pids()) - before
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        assert (status["CapEff"].strip(), status["CapBnd"].strip(), status["NoNewPrivs"].strip()) == (
            "0000000000000000", "0000000000000000", "1")  # jailed: no capability, no way to gain one
        for ns in ("mnt", "pid", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        assert sorted(os.listdir(f"/proc/{pid}/root")) == ["dev", "disk", "lib", "lib64", "sock", "tmp", "usr"]
        con.send("poweroff\n")
        assert con.wait(60) == 0
    finally:
        con.kill()
    assert run_leftovers(domname) == []
    assert set(qsd_pids()) == before


def test_a_storage_daemon_that_cannot_start_leaves_nothing(tmp_path: Path) -> None:
    from slimvisor.domain.qsd import StorageDaemon
    from slimvisor.model.spec import DiskSpec, DomainSpec, SpecError

    not_qcow2 = make_disk(tmp_path / "raw.img", 1 << 20, b"not a qcow2 header")
    rundir = tmp_path / "run"
    rundir.mkdir()
    before = set(qsd_pids())
    spec = DomainSpec("d", "/usr/bin/linux.uml", 64, disks=[DiskSpec(str(not_qcow2), format="qcow2")])
    with pytest.raises(SpecError, match=f"^disk {not_qcow2}: Image is not in qcow2 format$"):
        StorageDaemon(spec, rundir)
    assert list(rundir.iterdir()) == [] and set(qsd_pids()) == before


def test_a_block_device_disk(loop_device: str) -> None:
    """phy: as the blk backend opens it: the device's size (st_size is 0), O_DIRECT, and a transfer
    O_DIRECT refuses (a buffer not aligned to the device's blocks) done through the page cache."""
    import mmap

    from slimvisor.storage import open_disk

    assert os.stat(loop_device).st_size == 0
    disk = open_disk(loop_device)
    try:
        assert disk.size == 8 << 20
        assert disk.direct >= 0  # type: ignore[attr-defined]
        aligned = mmap.mmap(-1, 4096)
        disk.readv([memoryview(aligned)], 0)
        assert aligned[: len(MARK_PHY)] == MARK_PHY
        odd = bytearray(4096 + 1)
        disk.writev([memoryview(odd)[1:1 + 512]], 4096)  # not aligned: O_DIRECT says EINVAL
        disk.readv([memoryview(odd)[1:1 + len(MARK_PHY)]], 0)
        assert bytes(odd[1:1 + len(MARK_PHY)]) == MARK_PHY
        disk.flush()
    finally:
        disk.close()
