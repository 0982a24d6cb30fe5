"""PV domains end to end: real User-Mode Linux guests whose disks are served by slimvisor."""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import make_disk
from tests.guest import Console, leftovers

pytestmark = pytest.mark.guest
UP = r"slimvisor: \S+ is up"


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


def _assert_clean(con: Console, pids: list[int]) -> None:
    assert _gone(pids), f"processes left behind: {pids}"
    assert leftovers(con.name) == []


def test_boot_to_init_and_poweroff(rootfs: Path, domname: str, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    con = Console("--disk", str(rootfs), "--memory", "128M", "--log", str(log), name=domname)
    try:
        con.expect(UP)
        pids = [con.uml_pid(), *con.backend_pids()]
        assert len(pids) == 2
        # The root file system is the vhost-user disk served by slimvisor.
        mounts = con.run("cat /proc/mounts")
        assert "/dev/vda / ext4 rw" in mounts
        assert "Linux" in con.run("uname -a")
        con.send("poweroff")
        assert con.wait() == 0
    finally:
        con.kill()
    assert "domain powered off" in con.err.decode()
    assert "reboot: System halted" in con.text
    assert log.read_bytes() == bytes(con.out)  # everything shown is also in the log
    _assert_clean(con, pids)


def test_reboot_boots_again(rootfs: Path, domname: str) -> None:
    con = Console("--disk", str(rootfs), name=domname)
    try:
        con.expect(UP)
        con.run("echo persisted > /root/marker; sync")
        start = len(con.out)
        con.send("reboot")
        con.expect(UP, start=start)  # the same domain came up a second time...
        assert con.run("cat /root/marker").strip() == "persisted"  # ...on the same disk
        con.send("poweroff")
        assert con.wait() == 0
    finally:
        con.kill()


def test_no_reboot_stops_on_reboot(rootfs: Path, domname: str) -> None:
    con = Console("--disk", str(rootfs), "--no-reboot", name=domname)
    try:
        con.expect(UP)
        pids = [con.uml_pid(), *con.backend_pids()]
        con.send("reboot")
        assert con.wait() == 0
    finally:
        con.kill()
    assert "rebooted" in con.err.decode()
    assert len(__import__("re").findall(UP, con.text)) == 1
    _assert_clean(con, pids)


def test_guest_panic_is_reported(rootfs: Path, domname: str) -> None:
    con = Console("--disk", str(rootfs), name=domname)
    try:
        con.expect(UP)
        pids = [con.uml_pid(), *con.backend_pids()]
        con.send("echo c > /proc/sysrq-trigger")
        assert con.wait() == 3
    finally:
        con.kill()
    err = con.err.decode()
    assert "guest kernel panic" in err and "sysrq" in err
    assert not list(Path(".").glob("core*"))
    _assert_clean(con, pids)


def test_uml_crash_is_reported(rootfs: Path, domname: str) -> None:
    con = Console("--disk", str(rootfs), name=domname)
    try:
        con.expect(UP)
        pids = [con.uml_pid(), *con.backend_pids()]
        os.kill(con.uml_pid(), signal.SIGKILL)
        assert con.wait() == 4
    finally:
        con.kill()
    assert "UML crashed (killed by SIGKILL)" in con.err.decode()
    _assert_clean(con, pids)


def test_guest_writes_64mib_host_sees_every_byte(rootfs: Path, domname: str, tmp_path: Path) -> None:
    data = make_disk(tmp_path / "data.raw", 80 << 20)
    con = Console("--disk", str(rootfs), "--disk", str(data), "--memory", "256M", name=domname)
    try:
        con.expect(UP)
        con.run("head -c 67108864 /dev/urandom > /tmp/blob")
        guest_md5 = con.run("md5sum /tmp/blob").split()[0]
        con.run("dd if=/tmp/blob of=/dev/vdb bs=1M oflag=direct conv=fsync 2>&1; sync")
        assert con.last_status == 0
        con.send("poweroff")
        assert con.wait() == 0
    finally:
        con.kill()
    with open(data, "rb") as f:
        host_md5 = hashlib.md5(f.read(64 << 20)).hexdigest()
        assert f.read() == bytes(16 << 20)  # nothing written past what the guest wrote
    assert host_md5 == guest_md5


def test_readonly_disk_refuses_writes(rootfs: Path, domname: str, tmp_path: Path) -> None:
    ro = make_disk(tmp_path / "ro.raw", 8 << 20, b"READ-ONLY-CONTENT" * 1000)
    before = hashlib.sha256(ro.read_bytes()).hexdigest()
    con = Console("--disk", str(rootfs), "--disk", f"{ro},readonly", name=domname)
    try:
        con.expect(UP)
        assert con.run("head -c 17 /dev/vdb") == "READ-ONLY-CONTENT"
        out = con.run("dd if=/dev/zero of=/dev/vdb bs=4096 count=4 oflag=direct conv=fsync 2>&1")
        assert con.last_status != 0, out
        assert con.run("cat /sys/block/vdb/ro").strip() == "1"
        con.send("poweroff")
        assert con.wait() == 0
    finally:
        con.kill()
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == before


def test_backend_killed_after_sync_loses_nothing(rootfs: Path, domname: str, tmp_path: Path) -> None:
    data = make_disk(tmp_path / "data.raw", 16 << 20)
    con = Console("--disk", str(rootfs), "--disk", str(data), name=domname)
    try:
        con.expect(UP)
        pids = [con.uml_pid(), *con.backend_pids()]
        con.run("head -c 4194304 /dev/urandom > /tmp/blob")
        guest_md5 = con.run("md5sum /tmp/blob").split()[0]
        con.run("dd if=/tmp/blob of=/dev/vdb bs=64k 2>/dev/null; sync")  # buffered writes, then sync
        for pid in con.backend_pids():
            os.kill(pid, signal.SIGKILL)
        assert con.wait() == 5
    finally:
        con.kill()
    assert "device backend died" in con.err.decode()
    with open(data, "rb") as f:
        assert hashlib.md5(f.read(4 << 20)).hexdigest() == guest_md5
    _assert_clean(con, pids)


def test_sigterm_of_slimvisor_leaves_nothing(rootfs: Path, domname: str) -> None:
    con = Console("--disk", str(rootfs), name=domname)
    try:
        con.expect(UP)
        pids = [con.uml_pid(), *con.backend_pids()]
        con.proc.send_signal(signal.SIGTERM)
        assert con.wait() == 128 + signal.SIGTERM
    finally:
        con.kill()
    _assert_clean(con, pids)


def test_interactive_console_escape(rootfs: Path, domname: str) -> None:
    """On a terminal the console is raw (the guest echoes) and Ctrl-] leaves."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "slimvisor", "run", "--name", domname, "--disk", str(rootfs)])
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b"is up" not in out and time.monotonic() < deadline:
            out += os.read(fd, 65536)
        time.sleep(0.5)
        os.write(fd, b"echo $((6*7))\r")
        while b"42" not in out.split(b"echo $((6*7))")[-1] and time.monotonic() < deadline:
            out += os.read(fd, 65536)
        os.write(fd, b"\x1d")
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            while chunk := os.read(fd, 65536):
                out += chunk
        except OSError:
            pass
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out[-2000:]
    assert b"console escape" in out
    assert leftovers(domname) == []


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slimvisor", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kernel", "/nonexistent/linux"], "kernel /nonexistent/linux: no such file"),
        (["--kernel", "/bin/true"], "not a User-Mode Linux kernel"),
        (["--disk", "/nonexistent/disk.img"], "disk /nonexistent/disk.img: no such file"),
        (["--memory", "12XB"], "--memory: '12XB' is not a size"),
        (["--memory", "8M"], "below the minimum"),
        (["--memory", "64T"], "more than this host's"),
        (["--disk", "x.img,bogus"], "unknown option 'bogus'"),
    ],
)
def test_bad_input_is_refused_cleanly(args: list[str], message: str, domname: str, rootfs: Path) -> None:
    argv = ["run", "--name", domname, *args]
    if "--disk" not in args:
        argv += ["--disk", str(rootfs)]
    before = set(os.listdir("/dev/shm"))
    r = _run_cli(*argv)
    assert r.returncode == 1, r
    assert message in r.stderr
    assert r.stderr.startswith("slimvisor: error:")
    assert leftovers(domname) == []
    assert set(os.listdir("/dev/shm")) <= before


def test_standalone_backend_serves_bare_uml(busybox: tuple[Path, Path], rootfs: Path, tmp_path: Path) -> None:
    """`slimvisor backend blk` works for a front-end slimvisor did not start (here: plain linux.uml)."""
    sock = tmp_path / "vda.sock"
    # a bare UML's memory file is an unsealable O_TMPFILE: the user vouches for this front-end
    argv = [sys.executable, "-m", "slimvisor", "backend", "blk", "--allow-unsealed-memory", "--socket", str(sock),
            str(rootfs)]  # fmt: skip
    backend = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = tmp_path / "uml.out"
        with open(out, "wb") as f:
            uml = subprocess.Popen(
                ["linux.uml", "mem=96M", f"initrd={busybox[0]}", "root=/dev/vda", "con=null", "con0=fd:0,fd:1",
                 f"virtio_uml.device={sock}:2", f"uml_dir={tmp_path}"],
                stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
            )  # fmt: skip
            assert uml.stdin is not None
            uml.stdin.write(b"echo ROOT=$(grep ' / ' /proc/mounts | cut -d' ' -f1)\npoweroff\n")
            uml.stdin.flush()
            assert uml.wait(60) == 0
            uml.stdin.close()
        assert b"ROOT=/dev/vda" in out.read_bytes(), out.read_bytes()[-2000:]
        assert backend.poll() is None  # the front-end left; the backend still serves
    finally:
        backend.terminate()
        backend.wait(10)
    assert backend.returncode == 0
    assert not sock.exists()


def _locked(image: Path) -> bool:
    """Does some open of `image` hold a write lock (a backend serving it read-write)?"""
    from slimvisor.storage.disk import ImageLockedError, RawDisk

    try:
        RawDisk(str(image), readonly=True).close()
    except ImageLockedError:
        return True
    return False


def test_two_backends_never_write_one_image(rootfs: Path, tmp_path: Path) -> None:
    """A second `slimvisor backend blk` on an image another one serves read-write is refused,
    naming the image and the backend holding it; so is a readonly one (QEMU's locking rules)."""
    first = subprocess.Popen([sys.executable, "-m", "slimvisor", "backend", "blk", "--socket",
                              str(tmp_path / "a.sock"), str(rootfs)])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _locked(rootfs):  # it locks the image once its device is built
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for extra in ("", ",readonly"):
            second = subprocess.run(
                [sys.executable, "-m", "slimvisor", "backend", "blk", "--socket", str(tmp_path / "b.sock"),
                 f"{rootfs}{extra}"], capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert second.returncode == 1
            assert second.stderr.startswith(f"slimvisor: error: disk {rootfs}: in use by pid {first.pid} ("), second
            assert not (tmp_path / "b.sock").exists()
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(10)
    assert first.returncode == 0 and not _locked(rootfs)
