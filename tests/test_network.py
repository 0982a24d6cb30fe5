"""dom0 networking and the other PV devices, end to end with real UML domains."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from slimvisor.devices.balloon import VIRTIO_BALLOON_F_DEFLATE_ON_OOM
from tests.guest import Console, balloon_features, leftovers, poweroff

pytestmark = pytest.mark.guest
UP = r"slimvisor: \S+ is up"


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "slimvisor", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r
    return r


@pytest.fixture
def switch(domname: str) -> Iterator[str]:
    name = f"sw{domname}"
    _cli("switch", "start", name)
    try:
        yield name
    finally:
        _cli("switch", "stop", name, check=False)


def _stats(switch: str) -> dict[str, dict[str, int]]:
    ports: dict[str, dict[str, int]] = json.loads(_cli("switch", "show", switch, "--json").stdout)["ports"]
    return ports


def _domain(
    rootfs: Path, name: str, *args: str, ip: str | None = None, memory: str = "128M", cmdline: str = ""
) -> Console:
    cmdline = f"quiet sv.hostname={name}" + (f" sv.ip={ip}" if ip else "") + (f" {cmdline}" if cmdline else "")
    return Console("--disk", str(rootfs), "--memory", memory, "--cmdline", cmdline, *args, name=name)


def _copy(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes())
    return dest


@contextlib.contextmanager
def _pair(
    rootfs: Path,
    tmp_path: Path,
    domname: str,
    switch: str,
    subnet: str,
    *,
    rate: str = "",
    memory: str = "128M",
    cmdline: str = "",
) -> Iterator[tuple[Console, Console]]:
    """Domains <domname>a (subnet.1, `rate`, `memory` and `cmdline` apply to it) and <domname>b
    (subnet.2, on its own copy of the disk) on `switch`, both up; powered off when the block ends."""
    a_net = f"switch={switch}" + (f",rate={rate}" if rate else "")
    a = _domain(rootfs, f"{domname}a", "--net", a_net, ip=f"{subnet}.1/24", memory=memory, cmdline=cmdline)
    b = _domain(_copy(rootfs, tmp_path / "b.ext4"), f"{domname}b", "--net", f"switch={switch}", ip=f"{subnet}.2/24")
    try:
        a.expect(UP)
        b.expect(UP)
        yield a, b
    finally:
        poweroff(a, b)


def _recv_line(s: socket.socket) -> bytes:
    """Bytes up to a newline; EOF first is a failure (a loop on recv would spin on it)."""
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(4096 if got else 1)
        if not chunk:
            raise AssertionError(f"EOF after {got!r}, before a whole line")
        got += chunk
    return got


def _wait_listening(con: Console, port: int, timeout: int = 30) -> None:
    """Until a TCP socket in `con`'s guest listens on `port` (state 0A in /proc/net/tcp{,6})."""
    pattern = f":{port:04X} [0-9A-F]+:0000 0A "
    con.run(f"t={timeout * 10}; until grep -qE '{pattern}' /proc/net/tcp /proc/net/tcp6 2>/dev/null;"
            " do t=$((t-1)); [ $t -gt 0 ] || break; sleep 0.1; done", timeout=timeout + 10)  # fmt: skip
    assert "yes" in con.run(f"grep -qE '{pattern}' /proc/net/tcp /proc/net/tcp6 2>/dev/null && echo yes")


@contextlib.contextmanager
def _vsock_connect(uds: Path, port: int, timeout: float = 30) -> Iterator[socket.socket]:
    """A host-to-guest vsock stream (CONNECT <port> on uds); retried while the guest's listener
    is not up yet (the device then answers with a reset: EOF here)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(str(uds))
            s.sendall(f"CONNECT {port}\n".encode())
            ok = _recv_line(s)
        except (AssertionError, OSError):
            s.close()
            assert time.monotonic() < deadline, f"vsock port {port} never accepted"
            time.sleep(0.1)
            continue
        break
    with s:
        assert re.fullmatch(rb"OK \d+\n", ok)
        yield s


def test_two_domains_ping_and_move_100mib(rootfs: Path, tmp_path: Path, domname: str, switch: str) -> None:
    # The sender runs virtio-net as older kernels do by default: no transmit interrupts, its
    # buffers are taken back on the next transmit (a module parameter, passed as modprobe would).
    with _pair(rootfs, tmp_path, domname, switch, "10.9.0", memory="384M", cmdline="virtio_net.napi_tx=0") as (a, b):
        assert a.run("cat /sys/module/virtio_net/parameters/napi_tx").split()[-1] == "N"
        assert b.run("cat /sys/module/virtio_net/parameters/napi_tx").split()[-1] == "Y"
        assert "0% packet loss" in a.run("ping -c 3 -W 5 10.9.0.2")
        assert "0% packet loss" in b.run("ping -c 3 -W 5 10.9.0.1")
        # in the background, its stdin a pipe that stays open (as the console was) and says nothing
        b.run("(sleep 3600 | nc -l -p 5001 | md5sum > /tmp/rx.md5) & echo started")
        _wait_listening(b, 5001)
        # 100 MiB: 25 copies of 4 MiB of random bytes (UML's /dev/urandom is slow), sent from tmpfs
        a.run("head -c 4194304 /dev/urandom > /tmp/r4; for i in $(seq 25); do cat /tmp/r4; done > /tmp/tx")
        sent = a.run("md5sum /tmp/tx; nc -w 5 10.9.0.2 5001 < /tmp/tx", timeout=200)
        received = b.run("until [ -s /tmp/rx.md5 ]; do sleep 0.1; done; cat /tmp/rx.md5", timeout=60)
        assert sent.split()[0] == received.split()[0]
        stats = _stats(switch)
        assert stats[f"{domname}a.0"]["rx_bytes"] > 100 << 20  # the switch saw it all from a
    assert leftovers(f"{domname}a") == leftovers(f"{domname}b") == []
    assert _stats(switch) == {}  # the ports went with the domains


def test_forged_source_mac_is_dropped_and_counted(rootfs: Path, tmp_path: Path, domname: str, switch: str) -> None:
    with _pair(rootfs, tmp_path, domname, switch, "10.9.1") as (a, _):
        assert "0% packet loss" in a.run("ping -c 2 -W 5 10.9.1.2")
        mac = a.run("cat /sys/class/net/eth0/address").strip()
        a.run("ip link set eth0 down; ip link set eth0 address 52:54:00:66:66:66; ip link set eth0 up")
        assert "100% packet loss" in a.run("arp -d 10.9.1.2 2>/dev/null; ping -c 3 -W 2 10.9.1.2")
        assert _stats(switch)[f"{domname}a.0"]["forged"] > 0
        listed = [sw for sw in json.loads(_cli("switch", "list", "--json").stdout) if sw["name"] == switch]
        assert listed == [{"name": switch, "pid": listed[0]["pid"], "uplink": None, "ports": 2}]
        a.run(f"ip link set eth0 down; ip link set eth0 address {mac}; ip link set eth0 up")
        assert "0% packet loss" in a.run("ping -c 3 -W 5 10.9.1.2")  # legitimate traffic still flows


def test_rate_limited_port_stays_near_its_limit(rootfs: Path, tmp_path: Path, domname: str, switch: str) -> None:
    with _pair(rootfs, tmp_path, domname, switch, "10.9.2", rate="40M") as (a, b):
        b.run("iperf3 -s -1 -D")
        _wait_listening(b, 5201)
        out = a.run("iperf3 -c 10.9.2.2 -t 6 -J", timeout=120)
        result = json.loads(out[out.index("{") :])
        mbps = result["end"]["sum_received"]["bits_per_second"] / 1e6
        assert 36 <= mbps <= 44, f"{mbps:.1f} Mbit/s through a 40 Mbit/s port"


def test_host_reaches_domain_through_uplink_tap(rootfs: Path, domname: str) -> None:
    name, tap = f"sw{domname}", f"tap{os.getpid() % 100000}"
    _cli("switch", "start", name, "--uplink", tap)
    try:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap)[0]
            ipr.addr("add", index=idx, address="10.9.3.1", prefixlen=24)
        a = _domain(rootfs, domname, "--net", f"switch={name}", ip="10.9.3.2/24")
        try:
            a.expect(UP)
            r = subprocess.run(["ping", "-c", "3", "-W", "5", "10.9.3.2"], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout
            assert "0% packet loss" in a.run("ping -c 2 -W 5 10.9.3.1")
            listed = [sw for sw in json.loads(_cli("switch", "list", "--json").stdout) if sw["name"] == name]
            assert [(sw["uplink"], sw["ports"]) for sw in listed] == [(tap, 1)]
            assert name in _cli("switch", "list").stdout
        finally:
            poweroff(a)
    finally:
        _cli("switch", "stop", name)
    assert name not in _cli("switch", "list").stdout
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname=tap) == []
    assert not any(Path("/run/slimvisor/switch").glob(name))


def test_switch_bad_input(domname: str, busybox: tuple[Path, Path]) -> None:
    r = _cli("switch", "start", "bad/name", check=False)
    assert r.returncode == 1 and "switch name 'bad/name'" in r.stderr
    r = _cli("switch", "start", f"sw{domname}", "--uplink", "x" * 20, check=False)
    assert r.returncode == 1 and "TAP name" in r.stderr
    assert not Path(f"/run/slimvisor/switch/sw{domname}").exists()
    r = _cli("run", "--name", domname, "--net", "switch=nosuchswitch", "--initrd", str(busybox[0]), check=False)
    assert r.returncode == 1 and "switch nosuchswitch is not running" in r.stderr
    assert leftovers(domname) == []


def _echo_server(path: str, stop: threading.Event) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(0.2)

    def serve() -> None:
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    while data := conn.recv(65536):
                        conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_vsock_echo_both_directions(rootfs: Path, tmp_path: Path, domname: str) -> None:
    uds = tmp_path / "v.sock"
    stop = threading.Event()
    _echo_server(f"{uds}_6000", stop)
    con = _domain(rootfs, domname, "--vsock", f"cid=3,uds={uds}")
    try:
        con.expect(UP)
        # guest -> host: port 6000 on the host is the Unix socket <uds>_6000
        assert con.run("echo hello-host | socat -t 5 - VSOCK-CONNECT:2:6000").strip() == "HELLO-HOST"
        # host -> guest: CONNECT <port> on <uds>, then a byte stream
        con.send("socat VSOCK-LISTEN:5000,fork EXEC:'tr a-z A-Z' &")
        with _vsock_connect(uds, 5000) as s:
            s.sendall(b"hello-guest\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        assert got == b"HELLO-GUEST\n"
    finally:
        stop.set()
        poweroff(con)
    assert not uds.exists()


def _memfile_bytes(uml_pid: int) -> int:
    """Host memory held by the domain's RAM file (UML maps it from an unlinked file in its jail's /tmp)."""
    for fd in os.listdir(f"/proc/{uml_pid}/fd"):
        target = os.readlink(f"/proc/{uml_pid}/fd/{fd}")
        if target.startswith("/tmp/") and target.endswith("(deleted)"):
            return os.stat(f"/proc/{uml_pid}/fd/{fd}").st_blocks * 512
    raise AssertionError("no memory file")


def test_balloon_gives_memory_back(rootfs: Path, domname: str) -> None:
    con = _domain(rootfs, domname, "--balloon", memory="256M")
    try:
        con.expect(UP)
        assert balloon_features(con)[VIRTIO_BALLOON_F_DEFLATE_ON_OOM] == "0"  # only when asked for
        con.run("mount -o remount,size=200M /tmp; head -c 150000000 /dev/zero > /tmp/fill; rm /tmp/fill")
        before = _memfile_bytes(con.uml_pid())
        _cli("mem-set", domname, "64M")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _memfile_bytes(con.uml_pid()) > before - (100 << 20):
            time.sleep(0.5)
        after = _memfile_bytes(con.uml_pid())
        assert after <= before - (100 << 20), (before, after)
        assert "MemTotal" in con.run("grep MemTotal /proc/meminfo")  # the guest lives on
    finally:
        poweroff(con)


def test_console_channel_both_directions(rootfs: Path, tmp_path: Path, domname: str) -> None:
    """--channel NAME=PATH: /dev/virtio-ports/NAME in the guest is a Unix socket on the host."""
    path = tmp_path / "agent.sock"
    con = _domain(rootfs, domname, "--channel", f"org.slimvisor.agent={path}")
    try:
        con.expect(UP)
        find = "grep -l '^org.slimvisor.agent$' /sys/class/virtio-ports/*/name 2>/dev/null | cut -d/ -f5"
        dev = "/dev/" + con.run(find).strip()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(str(path))
            time.sleep(0.5)
            con.run(f"echo hello-from-guest > {dev}")
            assert _recv_line(s) == b"hello-from-guest\n"
            con.send(f"head -n 1 {dev} > /tmp/in &")
            time.sleep(1)
            s.sendall(b"hello-from-host\n")
            assert con.run("sleep 1; cat /tmp/in").strip() == "hello-from-host"
    finally:
        poweroff(con)
    assert not path.exists()
