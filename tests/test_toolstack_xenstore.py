"""The daemon's xenstore, from every side: slimvisor's CLI, Debian's xenstore-utils on its socket,
a wire-protocol client (transactions), and guests over vsock (their own subtree only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimvisor.xenstore.client import XenstoreClient
from slimvisor.xenstore.wire import XenstoreError
from tests.guest import copy_image
from tests.toolstack import Toolstack

pytestmark = pytest.mark.guest


def _xs_utils(toolstack: Toolstack, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XENSTORED_PATH": str(toolstack.run_dir / "xenstored.sock")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.skipif(shutil.which("xenstore-read") is None, reason="Debian's xenstore-utils are not installed")
def test_cli_and_xenstore_utils_share_one_store(toolstack: Toolstack) -> None:
    toolstack.sv("xenstore-write", "/tool/test/a", "one", "/tool/test/b", "two")
    assert _xs_utils(toolstack, "xenstore-read", "/tool/test/a").stdout == "one\n"
    assert _xs_utils(toolstack, "xenstore-write", "/tool/test/c", "three").returncode == 0
    assert toolstack.sv("xenstore-read", "/tool/test/c").stdout == "three\n"
    listing = toolstack.sv("xenstore-ls", "/tool/test").stdout.splitlines()
    assert listing == ['a = "one"', 'b = "two"', 'c = "three"']
    toolstack.sv("xenstore-rm", "/tool/test/b")
    assert _xs_utils(toolstack, "xenstore-exists", "/tool/test/b").returncode != 0
    missing = toolstack.sv("xenstore-read", "/tool/test/b", check=False)
    assert missing.returncode == 1 and "ENOENT" in missing.stderr

    watcher = subprocess.Popen([sys.executable, "-m", "slimvisor", "xenstore-watch", "-n", "3", "/tool/test"],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, **toolstack.env})  # fmt: skip
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the watch's first event fires once it is registered
        _xs_utils(toolstack, "xenstore-write", "/tool/test/d", "4")
        toolstack.sv("xenstore-rm", "/tool/test/a")
        out, _ = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert (first + out).splitlines() == ["/tool/test", "/tool/test/d", "/tool/test/a"]
    assert watcher.returncode == 0


def test_transaction_conflict_on_the_daemons_socket(toolstack: Toolstack) -> None:
    toolstack.sv("xenstore-write", "/tool/tx/counter", "1")
    path = str(toolstack.run_dir / "xenstored.sock")
    with XenstoreClient(path) as first, XenstoreClient(path) as second:
        tx = first.transaction_start()
        assert first.read("/tool/tx/counter", tx) == b"1"
        second.write("/tool/tx/counter", b"5")  # a change to what the transaction read
        first.write("/tool/tx/counter", b"2", tx)
        with pytest.raises(XenstoreError) as conflict:
            first.transaction_end(tx)
        assert conflict.value.name == "EAGAIN"
        tx = first.transaction_start()  # a retry, as clients do, succeeds
        value = int(first.read("/tool/tx/counter", tx))
        first.write("/tool/tx/counter", str(value + 1).encode(), tx)
        first.transaction_end(tx)
    assert toolstack.sv("xenstore-read", "/tool/tx/counter").stdout == "6\n"


def test_guests_see_their_own_subtree_only(toolstack: Toolstack, busybox: tuple[Path, Path], domname: str,
                                           tmp_path: Path) -> None:  # fmt: skip
    names = [f"{domname}a", f"{domname}b"]
    for name in names:
        disk = copy_image(busybox[1], tmp_path / f"{name}.ext4")
        toolstack.sv("create", str(toolstack.config(tmp_path / f"{name}.cfg", name, disk)))
    ids = {name: toolstack.domains()[name]["domid"] for name in names}
    a, b = names
    console = toolstack.console(a)
    try:
        console.expect(f"slimvisor: {a} is up|is up", timeout=90)
        assert console.run("xenstore-read name").strip() == a
        assert console.run("xenstore-read domid").strip() == str(ids[a])
        console.run(f"xenstore-read /local/domain/{ids[b]}/name")
        assert console.last_status != 0, "a guest read another domain's subtree"
        console.run(f"xenstore-write /local/domain/{ids[b]}/data/x intruder")
        assert console.last_status != 0, "a guest wrote into another domain's subtree"
        console.run("xenstore-write data/greeting hello-from-guest")
        assert console.last_status == 0
        assert toolstack.sv("xenstore-read", f"/local/domain/{ids[a]}/data/greeting").stdout == "hello-from-guest\n"
        toolstack.sv("xenstore-write", f"/local/domain/{ids[a]}/data/fromhost", "hi")
        assert console.run("xenstore-read data/fromhost").strip() == "hi"
    finally:
        console.kill()
    toolstack.sv("destroy", a)
    gone = toolstack.sv("xenstore-read", f"/local/domain/{ids[a]}/name", check=False)
    assert gone.returncode == 1, "a destroyed domain's xenstore subtree is removed"
    assert toolstack.sv("xenstore-read", f"/local/domain/{ids[b]}/name").stdout == f"{b}\n"
