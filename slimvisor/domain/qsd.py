"""Disks served by QEMU's qemu-storage-daemon: qcow2 images, and xl's backendtype=qdisk.

slimvisor has no qcow2 code of its own: the C implementation serves such a disk as a vhost-user-blk
backend, one qemu-storage-daemon per domain with one export per disk. Its listening sockets are made
here and handed over as file descriptors, so they exist before the engine starts and no path is
raced for. It is started with --daemonize, whose parent returns only once every image is open (or
with QEMU's own message when one is not); the domain's process becomes a child subreaper so it reaps
the daemon itself. `close` kills it: nothing of it outlives the domain (or a failed start).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

from slimvisor.model.spec import DiskSpec, DomainSpec, SpecError
from slimvisor.runtime.unix import listen_unix
from slimvisor.virtio.spec import VIRTIO_ID_BLOCK

QSD = "qemu-storage-daemon"
QEMU_IMG = "qemu-img"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
START_TIMEOUT = 30.0  # seconds for the daemon to open every image


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


def qsd_argv(disks: list[tuple[DiskSpec, int]], pidfile: Path) -> list[str]:
    """The daemon's command line: for each (disk, listening fd) a file (or host_device) node, its format
    node, and a vhost-user-blk export on the fd."""
    argv = [QSD]
    for n, (disk, fd) in enumerate(disks):
        protocol = "host_device" if stat.S_ISBLK(os.stat(disk.path).st_mode) else "file"
        ro = "on" if disk.readonly else "off"
        path = disk.path.replace(",", ",,")  # QEMU's option syntax escapes a comma by doubling it
        argv += ["--blockdev", f"driver={protocol},node-name=f{n},filename={path},read-only={ro},cache.direct=off",
                 "--blockdev", f"driver={disk.format},node-name=d{n},file=f{n},read-only={ro}",
                 "--export", f"type=vhost-user-blk,id=e{n},node-name=d{n},addr.type=fd,addr.str={fd},"
                             f"writable={'off' if disk.readonly else 'on'}"]  # fmt: skip
    return [*argv, "--daemonize", "--pidfile", str(pidfile)]


class StorageDaemon:
    """The qemu-storage-daemon of one domain, if it has disks for one; `sockets` maps disk index to
    its vhost-user socket."""

    def __init__(self, spec: DomainSpec, rundir: Path) -> None:
        self.pid = 0
        self.sockets: dict[int, Path] = {}
        chosen = [(i, d) for i, d in enumerate(spec.disks) if d.backend == "qsd"]
        if not chosen:
            return
        listeners: list[socket.socket] = []
        try:
            for i, _ in chosen:
                path = rundir / f"qsd-vd{chr(ord('a') + i)}.sock"
                path.unlink(missing_ok=True)
                listeners.append(listen_unix(str(path)))
                self.sockets[i] = path
            fds = [s.fileno() for s in listeners]
            pidfile = rundir / "qsd.pid"
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)  # the daemonized grandchild is ours to reap
            try:
                done = subprocess.run(qsd_argv([(d, fd) for (_, d), fd in zip(chosen, fds, strict=True)], pidfile),
                                      pass_fds=fds, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=START_TIMEOUT)  # fmt: skip
            except FileNotFoundError:
                raise SpecError(f"{QSD} is not installed (apt-get install qemu-system-common)") from None
            if done.returncode != 0:
                raise SpecError(done.stderr.strip() or f"{QSD} failed (exit status {done.returncode})")
            self.pid = int(pidfile.read_text())
        except BaseException:
            self.close()
            raise
        finally:
            for s in listeners:
                s.close()

    def devices(self, others: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """`others` (the domain's other devices, its slimvisor disks first in order) with this daemon's
        disks put where they belong: disk N is the guest's Nth virtio disk."""
        out = list(others)
        for index in sorted(self.sockets):
            out.insert(index, (self.sockets[index], VIRTIO_ID_BLOCK))
        return out

    def close(self) -> None:
        """Kill and reap the daemon; remove its sockets. Idempotent."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
        for path in self.sockets.values():
            path.unlink(missing_ok=True)
        self.sockets = {}
