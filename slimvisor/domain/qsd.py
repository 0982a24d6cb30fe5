"""Disks served by QEMU's qemu-storage-daemon: qcow2 images, and xl's backendtype=qdisk.

slimvisor has no qcow2 code of its own: the C implementation serves such a disk as a vhost-user-blk
backend, one qemu-storage-daemon per domain with one export per disk. It runs jailed as UML does
(slimvisor.jail: its own mount, PID, network, IPC and UTS namespaces, a root holding only its binary,
its libraries, its images and its socket directory; no capabilities, no new privileges), as uid 0
without capabilities so that it opens the images root owns. Its QMP monitor is on its stdin and
stdout, after the exports on its command line: the greeting says every export listens, and an image
that does not open ends the daemon with QEMU's message before any greeting. `close` kills it (the
init of its PID namespace): nothing of it outlives the domain, or a failed start.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

from slimvisor.jail.spawn import Bind, Jailed, JailError, JailSpec, shared_libraries, spawn
from slimvisor.model.spec import DiskSpec, DomainSpec, SpecError
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK

QSD = "/usr/bin/qemu-storage-daemon"
QEMU_IMG = "qemu-img"
START_TIMEOUT = 30.0  # seconds for the daemon to open every image
JAIL_SOCKETS = "/sock"  # the daemon's vhost-user sockets, in the jail
MAX_FILES = 1024


def check_image(disk: DiskSpec) -> None:
    """The image opens in its format with qemu-img (which also takes QEMU's lock, as the daemon will)."""
    try:
        done = subprocess.run([QEMU_IMG, "info", "--output=json", "-f", disk.format, disk.path],
                              capture_output=True, text=True, timeout=START_TIMEOUT)  # fmt: skip
    except FileNotFoundError:
        raise SpecError(f"disk {disk.path}: {disk.format} images need {QEMU_IMG} and {QSD} "
                        "(apt-get install qemu-utils qemu-system-common)") from None  # fmt: skip
    if done.returncode != 0:
        detail = done.stderr.strip().removeprefix(f"{QEMU_IMG}: ").removeprefix(f"Could not open '{disk.path}': ")
        raise SpecError(f"disk {disk.path}: {detail}")


def qsd_argv(disks: list[DiskSpec]) -> list[str]:
    """The daemon's command line in its jail: for disk N, /disk/N's file (or host_device) node, its format
    node and a vhost-user-blk export on /sock/N.sock; then QMP on stdio, whose greeting means all are up."""
    argv = [QSD]
    for n, disk in enumerate(disks):
        protocol = "host_device" if stat.S_ISBLK(os.stat(disk.path).st_mode) else "file"
        ro = "on" if disk.readonly else "off"
        argv += ["--blockdev", f"driver={protocol},node-name=f{n},filename=/disk/{n},read-only={ro}",
                 "--blockdev", f"driver={disk.format},node-name=d{n},file=f{n},read-only={ro}",
                 "--export", f"type=vhost-user-blk,id=e{n},node-name=d{n},addr.type=unix,"
                             f"addr.path={JAIL_SOCKETS}/{n}.sock,writable={'off' if ro == 'on' else 'on'}"]  # fmt: skip
    return [*argv, "--chardev", "stdio,id=qmp,signal=off", "--monitor", "chardev=qmp,mode=control"]


def _explain(text: str, disks: list[DiskSpec]) -> str:
    """QEMU's message about a node of disk N ("--blockdev driver=qcow2,node-name=d0,...: Image is not in
    qcow2 format") as "disk PATH: Image is not in qcow2 format"."""
    for n, disk in enumerate(disks):
        text = text.replace(f"/disk/{n}", disk.path)
        if f"node-name=d{n}," in text or f"node-name=f{n}," in text:
            return f"disk {disk.path}: {text.rsplit(': ', 1)[-1]}"
    return text or f"{QSD} ended without a word"


class StorageDaemon:
    """The qemu-storage-daemon of one domain, if it has disks for one; `sockets` maps disk index to
    its vhost-user socket on the host."""

    def __init__(self, spec: DomainSpec, rundir: Path) -> None:
        self.jailed: Jailed | None = None
        self.qmp: socket.socket | None = None
        self.sockets: dict[int, Path] = {}
        self.dirs = [rundir / "qsd", rundir / "qsd-jail"]
        chosen = [(i, d) for i, d in enumerate(spec.disks) if d.backend == "qsd"]
        if not chosen:
            return
        try:
            self._start(spec.name, [d for _, d in chosen])
            self.sockets = {i: self.dirs[0] / f"{n}.sock" for n, (i, _) in enumerate(chosen)}
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, disks: list[DiskSpec]) -> None:
        sockdir, root = self.dirs
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)  # a killed supervisor's
            path.mkdir(mode=0o700)
        if not os.path.exists(QSD):
            raise SpecError(f"{QSD} is not installed (apt-get install qemu-system-common)")
        binds = [Bind(p, p) for p in (QSD, *shared_libraries(QSD))] + [Bind(str(sockdir), JAIL_SOCKETS, writable=True)]
        binds += [Bind(d.path, f"/disk/{n}", writable=not d.readonly) for n, d in enumerate(disks)]
        jail = JailSpec(name=f"{name}-qsd", uid=0, gid=0, root=root, binds=binds, tmp_bytes=1 << 20,
                        rlimits={resource.RLIMIT_CORE: 0, resource.RLIMIT_NOFILE: MAX_FILES})  # fmt: skip
        self.qmp, theirs = socket.socketpair()
        try:
            self.jailed = spawn(jail, qsd_argv(disks), {"PATH": "/nonexistent"}, theirs.fileno(), theirs.fileno())
        except JailError as e:
            raise SpecError(f"{QSD}: {e}") from None
        finally:
            theirs.close()
        said = self._greeting()
        if b'{"QMP"' not in said:
            raise SpecError(_explain(said.decode(errors="replace").strip(), disks))

    def _greeting(self) -> bytes:
        """What the daemon said until its QMP greeting, or until it exited (EOF)."""
        assert self.qmp is not None
        said = b""
        deadline = time.monotonic() + START_TIMEOUT
        while b'{"QMP"' not in said:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.qmp], [], [], left)[0]:
                return said + f"no answer in {START_TIMEOUT:.0f} s".encode()
            chunk = self.qmp.recv(65536)
            if not chunk:
                return said
            said += chunk
        return said

    @property
    def pid(self) -> int:
        return self.jailed.pid if self.jailed is not None else 0

    def devices(self, others: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """`others` (the domain's other devices, its slimvisor disks first in order) with this daemon's
        disks put where they belong: disk N is the guest's Nth virtio disk."""
        out = list(others)
        for index in sorted(self.sockets):
            out.insert(index, (self.sockets[index], VIRTIO_ID_BLOCK))
        return out

    def close(self) -> None:
        """Kill and reap the daemon; remove its sockets and jail directory. Idempotent."""
        if self.jailed is not None:
            self.jailed.close()
            self.jailed = None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        for path in self.dirs:
            with contextlib.suppress(OSError):
                shutil.rmtree(path)
        self.sockets = {}
