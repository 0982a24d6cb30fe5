"""A real UML domain using its xenstore: Debian's xenstore tools in the guest, over virtio-vsock.

The guest's tools talk to /run/xenstored/socket, which the busybox image bridges to vsock port
XENSTORE_VSOCK_PORT of the host (booted with sv.xenstore=PORT); the domain's vsock device turns
that into a connection to <uds>_PORT, where the xenstore serves the domain (`--domain ID:PATH`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from slimvisor.xenstore import XENSTORE_VSOCK_PORT
from tests.guest import Console, leftovers

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("xenstore-write") is None, reason="Debian's xenstore-utils are not installed"),
]
UP = r"slimvisor: \S+ is up"
DOMID = 5  # the domain's xenstore id: nothing to do with its vsock CID
CID = 3


@dataclass
class Xenstored:
    socket: str  # dom0's tools socket
    uds: str  # the domain's vsock uds= path
    log: Path
    proc: subprocess.Popen[bytes]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XENSTORED_PATH": self.socket}
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
        if check:
            assert result.returncode == 0, result
        return result

    def read(self, path: str) -> str:
        return self.run("xenstore-read", path).stdout.removesuffix("\n")


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[Xenstored]:
    """`python -m slimvisor.xenstore.server` serving dom0 and, on the vsock's port socket, domain DOMID."""
    directory = tempfile.mkdtemp(prefix="xs-", dir="/tmp")  # short: a Unix socket path has 108 bytes
    sock, uds = os.path.join(directory, "socket"), os.path.join(directory, "v.sock")
    log = tmp_path / "xenstored.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slimvisor.xenstore.server", "--socket", sock, "--db", str(tmp_path / "xs.db"),
             "--domain", f"{DOMID}:{uds}_{XENSTORE_VSOCK_PORT}", "--verbose"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    xs = Xenstored(sock, uds, log, proc)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield xs
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(directory)


def test_guest_uses_its_xenstore_over_vsock(rootfs: Path, domname: str, xenstored: Xenstored) -> None:
    home = f"/local/domain/{DOMID}"
    # What a toolstack does before it starts a domain: its home, owned by it, readable by dom0.
    xenstored.run("xenstore-write", f"{home}/name", domname, "/local/domain/0/secret", "s3cret")
    xenstored.run("xenstore-chmod", "-r", home, f"n{DOMID}", "r0")
    cmdline = f"quiet sv.hostname={domname} sv.xenstore={XENSTORE_VSOCK_PORT}"
    con = Console(
        "--disk", str(rootfs), "--memory", "128M", "--cmdline", cmdline, "--vsock", f"cid={CID},uds={xenstored.uds}",
        name=domname,
    )  # fmt: skip
    try:
        con.expect(UP)
        assert con.run("echo $XENSTORED_PATH").strip() == "/run/xenstored/socket"
        # Relative paths are below the domain's home.
        assert con.run("xenstore-read name").strip() == domname, con.text[-2000:]
        con.run("xenstore-write data/x hello")
        assert con.last_status == 0
        assert xenstored.read(f"{home}/data/x") == "hello"
        listing = xenstored.run("xenstore-ls", "-p", f"{home}/data").stdout.strip()
        assert listing.startswith('x = "hello"') and listing.endswith(f"(n{DOMID},r0)")  # the guest owns it

        xenstored.run("xenstore-write", f"{home}/foo", "from-dom0")
        assert con.run("xenstore-read foo").strip() == "from-dom0"
        listed = con.run(f"xenstore-list {home}").split()
        # control/ is the guest's shutdown agent's (its feature-poweroff/-reboot flags), written at boot
        assert [k for k in listed if k != "control"] == ["name", "data", "foo"]

        # Another domain's subtree (dom0's here) is closed to it.
        out = con.run("xenstore-read /local/domain/0/secret 2>&1")
        assert con.last_status == 1 and "s3cret" not in out
        out = con.run("xenstore-ls /local/domain/0 2>&1")
        assert con.last_status == 1 and "Permission denied" in out
        con.run("xenstore-write /local/domain/0/secret pwned 2>&1")
        assert con.last_status == 1
        assert xenstored.read("/local/domain/0/secret") == "s3cret"
        assert re.search(rf"d{DOMID} READ: EACCES: /local/domain/0/secret", xenstored.log.read_text())

        # A watch in the guest sees dom0's write.
        con.send("(xenstore-watch -n 2 foo; echo rc=$?) > /tmp/w 2>&1 &")
        wait_lines = "i=0; while [ $(wc -l < /tmp/w) -lt {} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"
        assert con.run(f"{wait_lines.format(1)}; cat /tmp/w") == "foo\n"  # the initial fire: it is in place
        xenstored.run("xenstore-write", f"{home}/foo", "changed")
        assert con.run(f"{wait_lines.format(3)}; cat /tmp/w") == "foo\nfoo\nrc=0\n"  # ends after -n 2 events
        assert con.run("xenstore-read foo").strip() == "changed"
        con.send("poweroff")
        assert con.wait(60) == 0
    finally:
        con.kill()
    assert leftovers(domname) == []
    assert "internal error" not in xenstored.log.read_text()
