"""QEMU as a second, independent vhost-user front-end for slimvisor's vhost-user-blk back-end.

The back-end runs as its own process on a Unix socket, exactly as a user would start it; QEMU
(TCG, microvm with PCIe) boots Debian's cloud kernel with a busybox initramfs whose /init reads
the disk, writes a marker, checksums what it reads back and powers off (see
slimvisor/testing/cloudkernel.py). The assertions are on what the user sees: the guest's console,
the disk file on the host, and which processes and files are left afterwards.

The QEMU and back-end helpers here are shared with tests/test_qemu_devices.py (net, rng).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from slimvisor.engines.qemu.accel import tcg_boot_args
from slimvisor.testing.cloudkernel import default_cache_dir, ensure_cloud_kernel

REPO = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-system-x86_64")
QEMU_TIMEOUT = 90  # seconds for one boot, run and poweroff under TCG (about 5 s on a quiet machine)
DISK_SIZE = 64 << 20
CHECKED = 4 << 20  # the guest checksums the first 4 MiB
MARKER_OFFSET = 1 << 20
HEAD = b"SLIMVISOR-E2E-v1"  # the disk's first 16 bytes, which the guest prints

# The back-end without the CLI: the library calls behind `slimvisor backend blk --socket SOCK
# DISK[,readonly]`, taking the same arguments (kept to tell a CLI problem from a back-end one).
_LAUNCHER = r"""
import argparse, logging, signal, sys
from slimvisor.devices.blk import BlockDevice
from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.server import VhostUserServer
p = argparse.ArgumentParser()
p.add_argument("--socket", required=True)
p.add_argument("disk")
a = p.parse_args()
path, _, opt = a.disk.partition(",")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = VhostUserServer()
s.add(BlockDevice(path, readonly=opt == "readonly"), listen_unix(a.socket), "vda", a.socket)
try:
    s.serve_forever()
finally:
    s.close()
"""
# The back-end command, as a user runs it. To run without the CLI, this one line becomes:
#   BACKEND_CMD = [sys.executable, "-c", _LAUNCHER]
BACKEND_CMD = [sys.executable, "-m", "slimvisor", "backend", "blk"]

Kernel = tuple[Path, Path]  # (vmlinuz, initrd)

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"
    ),
]


# -- the cloud kernel ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cloud_kernel() -> Kernel:
    t0 = time.monotonic()
    kernel = ensure_cloud_kernel(default_cache_dir())
    print(f"\ncloud kernel ready in {time.monotonic() - t0:.1f}s: {kernel[0].parent}")
    return kernel


# -- the disk --------------------------------------------------------------------------------------
def make_disk(path: Path) -> bytes:
    """A sparse 64 MiB raw disk: HEAD, then seeded random bytes up to 4 MiB, then zeros."""
    data = HEAD + random.Random(0x51_1A_B1).randbytes(CHECKED - len(HEAD))
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(DISK_SIZE)
    return data


def sha256_file(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read() if length is None else f.read(length))
    return h.hexdigest()


# -- the back-end process --------------------------------------------------------------------------
def listening(sock: Path) -> bool:
    """Whether a listening Unix socket is bound at sock (from /proc/net/unix, no connect)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(sock) and int(fields[3], 16) & 0x10000:
                return True
    return False


@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def listening(self) -> bool:
        return listening(self.sock)

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"back-end ignored SIGTERM for {timeout}s\n{self.log_text()}") from None
        return self.proc.returncode


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # A short path: sun_path holds 108 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="sv-qemu-") as d:
        yield Path(d)


def launch_backend(argv: list[str], sock: Path, log: Path, cwd: Path) -> Backend:
    """Start a back-end process (argv, serving on sock, output to log); return once it listens."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    be = Backend(proc, sock, log)
    deadline = time.monotonic() + 15
    while not be.listening():
        if proc.poll() is not None:
            raise AssertionError(f"back-end exited ({proc.returncode}) before listening:\n{be.log_text()}")
        if time.monotonic() > deadline:
            be.proc.kill()
            be.proc.wait()
            raise AssertionError(f"back-end not listening on {sock} after 15s:\n{be.log_text()}")
        time.sleep(0.05)
    return be


StartBackend = Callable[..., Backend]


def kill_all(backends: list[Backend]) -> None:
    """Teardown: whatever a failed test left running."""
    for be in backends:
        if be.proc.poll() is None:
            be.proc.kill()
            be.proc.wait()


@pytest.fixture
def start_backend(tmp_path: Path, sockdir: Path) -> Iterator[StartBackend]:
    started: list[Backend] = []

    def start(disk: Path, readonly: bool = False) -> Backend:
        sock = sockdir / f"blk{len(started)}.sock"
        spec = f"{disk},readonly" if readonly else str(disk)
        argv = [*BACKEND_CMD, "--socket", str(sock), spec]
        started.append(launch_backend(argv, sock, tmp_path / f"backend{len(started)}.log", tmp_path))
        return started[-1]

    yield start
    kill_all(started)


# -- QEMU ------------------------------------------------------------------------------------------
@dataclass
class Run:
    rc: int
    console: str  # the guest's serial console (QEMU's stdout), \r removed
    stderr: str
    seconds: float

    def line(self, tag: str) -> str | None:
        """The rest of the first console line starting with 'SV-<tag>: '."""
        m = re.search(rf"^SV-{tag}: ?(.*?)\s*$", self.console, re.M)
        return m.group(1) if m else None

    def has(self, tag: str) -> bool:
        return re.search(rf"^SV-{tag}\s*$", self.console, re.M) is not None


def blk_args(sock: Path) -> list[str]:
    """QEMU options for a vhost-user-blk disk served on sock."""
    return ["-chardev", f"socket,id=c0,path={sock}", "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]


def qemu_argv(kernel: Kernel, devices: list[str], append: str) -> list[str]:
    """microvm under TCG with guest RAM in a shared memfd (vhost-user back-ends map it), plus devices."""
    vmlinuz, initrd = kernel
    return [
        str(QEMU), "-accel", "tcg", "-M", "microvm,acpi=on,pcie=on", "-cpu", "max", "-m", "512", "-smp", "1",
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-machine", "memory-backend=mem",
        *devices,
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 {tcg_boot_args()} {append}",
    ]  # fmt: skip


def run_qemu(kernel: Kernel, devices: list[str], append: str, logs: Callable[[], str]) -> Run:
    """Boot QEMU to its poweroff; `logs` gives the back-ends' logs for a failure message."""
    argv = qemu_argv(kernel, devices, append)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"QEMU did not finish within {QEMU_TIMEOUT}s\n--- console (tail)\n"
            f"{out.decode(errors='replace')[-4000:]}\n--- QEMU stderr\n{err.decode(errors='replace')}"
            f"\n--- back-end log\n{logs()}"
        ) from None
    run = Run(proc.returncode, out.decode(errors="replace").replace("\r", ""), err.decode(errors="replace"),
              time.monotonic() - t0)  # fmt: skip
    print(f"\nQEMU ran {run.seconds:.1f}s (rc={run.rc})")
    return run


def explain(run: Run, logs: str) -> str:
    return (
        f"QEMU rc={run.rc} after {run.seconds:.1f}s\n--- QEMU stderr\n{run.stderr}\n--- console (tail)\n"
        f"{run.console[-4000:]}\n--- back-end log\n{logs}"
    )


def qemu_processes_on(sock: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("qemu" in c for c in cmd[:1]) and any(str(sock) in c for c in cmd):
            found.append(p)
    return found


def assert_clean_shutdown(backend: Backend) -> None:
    """The back-end outlives QEMU and keeps listening; stopped, it leaves nothing behind."""
    deadline = time.monotonic() + 30  # it has seen the hang-up once it logs it
    while not re.search("front-end disconnected|closing the connection", backend.log_text()):
        assert time.monotonic() < deadline and backend.proc.poll() is None, backend.log_text()
        time.sleep(0.05)
    assert backend.proc.poll() is None, f"back-end died when QEMU disconnected:\n{backend.log_text()}"
    assert backend.listening(), f"back-end stopped listening after QEMU left:\n{backend.log_text()}"
    assert not qemu_processes_on(backend.sock), "a QEMU process is still running"
    rc = backend.stop()
    assert rc in (0, -signal.SIGTERM), f"back-end exit status {rc} on SIGTERM:\n{backend.log_text()}"
    assert not backend.sock.exists(), f"{backend.sock} left behind by the back-end"
    assert "Traceback" not in backend.log_text(), backend.log_text()


# -- tests -----------------------------------------------------------------------------------------
def test_qemu_reads_and_writes_a_slimvisor_disk(
    cloud_kernel: Kernel, start_backend: StartBackend, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    original = make_disk(disk)
    marker = f"SV-MARKER-{uuid.uuid4().hex}"
    backend = start_backend(disk)

    run = run_qemu(cloud_kernel, blk_args(backend.sock), f"sv.test=blk sv.marker={marker}", backend.log_text)

    why = explain(run, backend.log_text())
    assert run.rc == 0, why
    assert run.has("DONE"), why
    assert run.line("DISK") == f"sectors={DISK_SIZE // 512} ro=0", why
    assert run.line("HEAD") == HEAD.hex(), why
    assert run.line("WRITE") == "ok", why
    # The host file after QEMU is gone: the marker at 1 MiB, every other byte as it was.
    expected = bytearray(original)
    expected[MARKER_OFFSET : MARKER_OFFSET + len(marker)] = marker.encode()
    with open(disk, "rb") as f:
        f.seek(MARKER_OFFSET)
        assert f.read(len(marker)) == marker.encode(), "marker not on the host disk"
    assert os.path.getsize(disk) == DISK_SIZE
    assert sha256_file(disk, CHECKED) == hashlib.sha256(expected).hexdigest(), "host disk differs from expected"
    # What the guest read back from the device is what the host file holds.
    assert run.line("SHA256") == sha256_file(disk, CHECKED), why
    with open(disk, "rb") as f:
        f.seek(CHECKED)
        assert f.read().count(0) == DISK_SIZE - CHECKED, "bytes past 4 MiB changed"

    assert_clean_shutdown(backend)


def test_qemu_cannot_write_a_readonly_slimvisor_disk(
    cloud_kernel: Kernel, start_backend: StartBackend, tmp_path: Path
) -> None:
    disk = tmp_path / "ro.img"
    original = make_disk(disk)
    before = sha256_file(disk)
    mtime = os.stat(disk).st_mtime_ns
    backend = start_backend(disk, readonly=True)

    append = f"sv.test=blk sv.marker=SV-MARKER-{uuid.uuid4().hex}"
    run = run_qemu(cloud_kernel, blk_args(backend.sock), append, backend.log_text)

    why = explain(run, backend.log_text())
    assert run.rc == 0, why
    assert run.has("DONE"), why
    assert run.line("DISK") == f"sectors={DISK_SIZE // 512} ro=1", why
    assert run.line("HEAD") == HEAD.hex(), why
    assert (run.line("WRITE") or "").startswith("failed"), why
    assert run.line("SHA256") == hashlib.sha256(original).hexdigest(), why
    assert sha256_file(disk) == before, "the read-only disk changed on the host"
    assert os.stat(disk).st_mtime_ns == mtime, "the read-only disk was written to"

    assert_clean_shutdown(backend)
