"""QEMU as a vhost-user front-end for slimvisor's virtio-net (through the dom0 switch) and virtio-rng.

The same Debian cloud kernel and busybox initramfs as tests/test_qemu_frontend.py, with /init
running `sv.test=net` or `sv.test=rng` (slimvisor/testing/cloudkernel.py). For net, QEMU takes a
port on a slimvisor switch exactly as a domain's runner does (add-port over the control socket),
and talks to a User-Mode Linux domain plugged into the same switch: two independent front-ends on
one back-end process. For rng, the back-end is RngDevice in a small process of its own.
QEMU's virtio-net card runs without MSI-X, working around a QEMU crash (see net_args).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from slimvisor.runtime.control import ControlError, request
from slimvisor.runtime.paths import log_dir
from slimvisor.testing.cloudkernel import default_cache_dir, ensure_cloud_kernel
from tests.guest import Console, copy_image, leftovers
from tests.test_qemu_frontend import (
    QEMU,
    Backend,
    Kernel,
    Run,
    assert_clean_shutdown,
    explain,
    kill_all,
    launch_backend,
    listening,
    qemu_processes_on,
    run_qemu,
)

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"
    ),
]
UP = r"slimvisor: \S+ is up"
UML_IP, QEMU_IP = "10.7.0.1", "10.7.0.2"
NC_PORT = 5001

# The rng back-end: RngDevice on a vhost-user socket, as `_LAUNCHER` in test_qemu_frontend.py
# serves BlockDevice; SIGTERM ends it cleanly (the Server removes its socket).
_RNG_LAUNCHER = r"""
import logging, signal, sys
from slimvisor.devices.rng import RngDevice
from slimvisor.runtime.unix import listen_unix
from slimvisor.vhostuser.server import VhostUserServer
sock = sys.argv[1]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = VhostUserServer()
s.add(RngDevice(), listen_unix(sock), "rng", sock)
try:
    s.serve_forever()
finally:
    s.close()
"""


@pytest.fixture(scope="session")
def cloud_kernel() -> Kernel:
    return ensure_cloud_kernel(default_cache_dir())


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # A short path: sun_path holds 108 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="sv-qemu-") as d:
        yield Path(d)


# -- the switch ------------------------------------------------------------------------------------
def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "slimvisor", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r
    return r


@dataclass
class Switch:
    name: str

    @property
    def dir(self) -> Path:
        from slimvisor.network.switchd import switch_dir

        return switch_dir(self.name)

    def ask(self, **req: object) -> dict[str, object]:
        return request(str(self.dir / "control.sock"), dict(req))

    def ports(self) -> dict[str, dict[str, int]]:
        ports: dict[str, dict[str, int]] = json.loads(_cli("switch", "show", self.name, "--json").stdout)["ports"]
        return ports

    def log(self) -> str:
        try:
            text = (log_dir() / f"switch-{self.name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-6000:]


@pytest.fixture
def switch(domname: str) -> Iterator[Switch]:
    sw = Switch(f"sw{domname}")
    _cli("switch", "start", sw.name)
    try:
        yield sw
    finally:
        _cli("switch", "stop", sw.name, check=False)


def _qemu_mac() -> str:
    """A locally unique MAC for QEMU's port (52:54:00 is QEMU's own prefix)."""
    pid = os.getpid()
    return f"52:54:00:7e:{(pid >> 8) & 0xFF:02x}:{pid & 0xFF:02x}"


def net_args(sock: str, mac: str) -> list[str]:
    """QEMU options for a virtio-net card whose back-end is a switch port's vhost-user socket.

    vectors=0 (no MSI-X, the legacy INTx line) works around a QEMU 7.2 crash under TCG: for a
    vhost-user netdev vhost_net_start() clears use_guest_notifier_mask, so unmasking an MSI-X
    vector goes to kvm_virtio_pci_irqfd_use(), which indexes proxy->vector_irqfd, allocated only
    with KVM irqfds: a NULL dereference (SIGSEGV) as soon as the guest sets DRIVER_OK, whatever
    the back-end. vhost-user-blk (no mask hook, so no vector notifiers) and vhost-user-rng (keeps
    the flag) are not affected and keep MSI-X.
    """
    return [
        "-chardev", f"socket,id=n0,path={sock}", "-netdev", "vhost-user,id=net0,chardev=n0",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},vectors=0",
    ]  # fmt: skip


def _uml_domain(rootfs: Path, name: str, switch: Switch) -> Console:
    cmdline = f"quiet sv.hostname={name} sv.ip={UML_IP}/24"
    return Console("--disk", str(rootfs), "--memory", "128M", "--net", f"switch={switch.name}", "--cmdline", cmdline,
                   name=name)  # fmt: skip


def _poweroff(con: Console) -> None:
    try:
        if con.proc.poll() is None:
            con.send("poweroff")
        assert con.wait(60) == 0, con.err.decode(errors="replace")
    finally:
        con.kill()


# -- tests -----------------------------------------------------------------------------------------
def test_qemu_and_uml_domain_talk_through_a_slimvisor_switch(
    cloud_kernel: Kernel, switch: Switch, busybox: tuple[Path, Path], domname: str, tmp_path: Path
) -> None:
    mac = _qemu_mac()
    port = f"{domname}-qemu"
    sock = str(switch.ask(op="add-port", port=port, mac=mac, rate=None, owner=os.getpid())["socket"])
    assert listening(Path(sock)), f"switch does not serve {sock}\n{switch.log()}"
    uml = _uml_domain(copy_image(busybox[1], tmp_path / "uml.ext4"), domname, switch)
    try:
        uml.expect(UP, timeout=120)
        # In the background, so the console stays free whatever QEMU does. nc's stdin stays open
        # (sleep): at its EOF busybox nc shuts its sending side, and the sender stops at that FIN.
        listen = f"sleep 120 | {{ nc -l -p {NC_PORT} > /tmp/rx; md5sum < /tmp/rx > /tmp/rx.md5; }}"
        uml.run(f"{listen} & sleep 1", timeout=30)
        append = f"sv.test=net sv.ip={QEMU_IP}/24 sv.peer={UML_IP} sv.nc={NC_PORT}"
        run = run_qemu(cloud_kernel, net_args(sock, mac), append, switch.log)
        why = explain(run, switch.log())
        received = uml.run("for i in $(seq 20); do [ -s /tmp/rx.md5 ] && break; sleep 1; done; cat /tmp/rx.md5")
        size = uml.run("wc -c < /tmp/rx").strip()
        arp = uml.run("cat /proc/net/arp")
        stats = switch.ports()
    finally:
        _poweroff(uml)

    print(f"\nnet: QEMU {run.seconds:.1f}s; switch ports {stats}")
    assert run.rc == 0, why
    assert run.line("MAC") == mac, why
    assert run.line("PING") == "0%", why
    assert run.line("NC") == "rc=0", why
    sent = run.line("NC-MD5")
    assert sent and re.fullmatch(r"[0-9a-f]{32}", sent), why
    assert size == str(1 << 20) and received.split()[0] == sent, (
        f"UML received {size} bytes, md5 {received!r}; QEMU sent {sent}\n{why}"
    )
    assert re.search(rf"^{re.escape(QEMU_IP)}\s.*{mac}", arp, re.M), arp  # UML learned QEMU's MAC
    assert stats[port]["rx_bytes"] >= 1 << 20, stats  # the switch carried the megabyte from QEMU's port
    _assert_net_clean(switch, port, sock, domname)


def _assert_net_clean(switch: Switch, port: str, sock: str, domname: str) -> None:
    """QEMU gone, its port released, the domain's port gone with it; then the switch stops whole."""
    assert not qemu_processes_on(Path(sock)), "a QEMU process is still running"
    assert switch.ask(op="remove-port", port=port) == {"ok": True}
    assert not listening(Path(sock)) and not Path(sock).exists(), f"{sock} left after remove-port"
    assert switch.ports() == {}, "ports left on the switch"
    assert leftovers(domname) == []
    _cli("switch", "stop", switch.name)
    assert not switch.dir.exists(), f"{switch.dir} left after switch stop"
    with pytest.raises(ControlError):
        switch.ask(op="stats")
    assert "Traceback" not in switch.log(), switch.log()


@pytest.fixture
def rng_backend(tmp_path: Path, sockdir: Path) -> Iterator[Backend]:
    sock = sockdir / "rng.sock"
    backend = launch_backend([sys.executable, "-c", _RNG_LAUNCHER, str(sock)], sock, tmp_path / "rng.log", tmp_path)
    yield backend
    kill_all([backend])


def _rng_boot(cloud_kernel: Kernel, backend: Backend) -> tuple[bytes, Run]:
    devices = ["-chardev", f"socket,id=r0,path={backend.sock}", "-device", "vhost-user-rng-pci,chardev=r0"]
    run = run_qemu(cloud_kernel, devices, "sv.test=rng", backend.log_text)
    why = explain(run, backend.log_text())
    assert run.rc == 0, why
    assert run.has("DONE"), why
    assert run.line("RNG-CURRENT") == "virtio_rng.0", why
    data = bytes.fromhex(run.line("RNG") or "")
    assert len(data) == 64, why
    return data, run


def test_qemu_reads_randomness_from_slimvisor_rng(cloud_kernel: Kernel, rng_backend: Backend) -> None:
    first, run1 = _rng_boot(cloud_kernel, rng_backend)
    second, run2 = _rng_boot(cloud_kernel, rng_backend)  # the back-end serves a second front-end
    print(f"\nrng: boots {run1.seconds:.1f}s and {run2.seconds:.1f}s")
    assert first != bytes(64) and second != bytes(64)
    assert first != second
    assert_clean_shutdown(rng_backend)
