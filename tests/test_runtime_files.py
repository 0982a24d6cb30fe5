"""Host files dom0 processes make: listening sockets, the private run directory, console logs."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimvisor.runtime.logfile import LOG_MODE, RotatingLog
from slimvisor.runtime.paths import UnsafeDirError, check_private_dir, runtime_base
from slimvisor.runtime.unix import listen_unix


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
def test_listen_unix_refuses_to_replace_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "file":
        path.write_text("precious")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        (tmp_path / "target").write_text("precious")
        path.symlink_to(tmp_path / "target")
    else:
        os.mkfifo(path)
    with pytest.raises(FileExistsError, match="exists and is not a socket; refusing to replace it"):
        listen_unix(str(path))
    assert os.path.lexists(path)
    assert kind not in ("file", "symlink") or path.read_text() == "precious"


def test_backend_command_leaves_a_file_given_as_socket_alone(tmp_path: Path) -> None:
    """The issue's case: `backend blk --socket ~/somefile` removed the file."""
    disk, somefile = tmp_path / "disk.raw", tmp_path / "somefile"
    disk.write_bytes(bytes(1 << 20))
    somefile.write_text("precious")
    r = subprocess.run(
        [sys.executable, "-m", "slimvisor", "backend", "blk", "--socket", str(somefile), str(disk)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert f"{somefile}: exists and is not a socket" in r.stderr
    assert somefile.read_text() == "precious"


def test_listen_unix_still_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    listen_unix(path).close()


def test_private_dir_must_be_ours_a_directory_and_closed(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    check_private_dir(d)
    d.chmod(0o755)
    with pytest.raises(UnsafeDirError, match="mode 0755, open to others; expected 0700"):
        check_private_dir(d)
    d.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(UnsafeDirError, match="not a directory"):
        check_private_dir(link)
    os.chown(d, 65534, 65534)  # the suite runs as root: as if "nobody" had made it first
    with pytest.raises(UnsafeDirError, match="owned by uid 65534, not by you"):
        check_private_dir(d)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A /tmp of our own, sticky and world-writable as /tmp is (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="svt-tmp-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d)


def test_a_non_root_run_dir_in_tmp_made_by_someone_else_is_refused(shared_tmp: Path) -> None:
    """Run as uid 65534 (TMPDIR=shared_tmp): a slimvisor-65534 that root made first is refused."""
    tmp_path = shared_tmp
    code = "from slimvisor.runtime.paths import runtime_base; print(runtime_base())"
    env = {k: v for k, v in os.environ.items() if k not in ("SLIMVISOR_RUN_DIR", "XDG_RUNTIME_DIR")}
    env["TMPDIR"] = str(tmp_path)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert ok.returncode == 0, ok.stderr
    made = Path(ok.stdout.strip())
    assert made == tmp_path / "slimvisor-65534" and stat.S_IMODE(made.stat().st_mode) == 0o700
    made.rmdir()
    made.mkdir(mode=0o700)  # root's now
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert bad.returncode != 0 and "owned by uid 0, not by you" in bad.stderr


def test_runtime_base_as_root_is_unchanged() -> None:
    assert runtime_base().is_dir()


def test_console_log_is_0640_and_rotated_at_its_size(tmp_path: Path) -> None:
    path = tmp_path / "d.console.log"
    path.write_bytes(b"old\n")
    path.chmod(0o666)
    log = RotatingLog(path, max_bytes=100)
    assert stat.S_IMODE(path.stat().st_mode) == LOG_MODE == 0o640
    log.write(b"x" * 96)  # 4 + 96: exactly full
    assert path.read_bytes() == b"old\n" + b"x" * 96
    log.write(b"y" * 250)
    log.close()
    assert path.read_bytes() == b"y" * 50  # 100 set aside twice: the newest 50 in the file
    assert Path(f"{path}.1").read_bytes() == b"y" * 100  # and only the one before kept
    assert stat.S_IMODE(Path(f"{path}.1").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.console.log", "d.console.log.1"]


def test_a_fresh_log_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    path.write_bytes(b"previous run")
    log = RotatingLog(path, fresh=True)
    log.write(b"new")
    log.close()
    assert path.read_bytes() == b"new"
