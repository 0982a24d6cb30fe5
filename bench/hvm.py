"""HVM and PVH domains: slimvisor's QEMU engine against bare QEMU, in one run.

The guest is the same for every path: Debian's cloud kernel, slimvisor's boot initramfs for it
(`slimvisor image cloud`), the busybox root disk with fio, 2 vCPUs, 256 MiB, the accelerator this
host gives unmodified guests (TCG here, KVM where there is VMX/SVM). Paths:
  slimvisor hvm / pvh   `slimvisor run --type hvm|pvh`: QEMU jailed, disks on slimvisor's Python
                        vhost-user-blk backend (q35 + SeaBIOS, or microvm at the kernel's PVH note)
  qemu hvm / pvh        bare qemu-system-x86_64 with the same machine, kernel, initramfs and command
                        line, the disks on QEMU's built-in virtio-blk (aio=threads, O_DIRECT): the anchor
  qsd hvm               bare QEMU with the disks on qemu-storage-daemon's vhost-user-blk (C)
Measured: (1) time to init (start until the guest's init says it is up), (2) fio in the guest on a
second disk (O_DIRECT: sequential 1 MiB, random 4 KiB reads), (3) PVH against HVM time to init.
Rounds are interleaved (every round runs every path, in a fresh order); medians with the lowest and
highest round, ratios to the anchor, and the CPU time the host's hypervisor stole meanwhile.

    python3 bench/hvm.py [--rounds 5] [--size-mib 128]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blk import UP, _fio, bench_rootfs, interleave, report

from slimvisor.engines.qemu import kernel as kernels
from slimvisor.engines.qemu.engine import host_accel, kernel_cache, kernel_cmdline, qemu_binary
from slimvisor.images.cache import cloud_assets
from slimvisor.model.spec import DomainSpec
from slimvisor.testing.expect import ConsoleSession

MEMORY, VCPUS = "256M", 2
JOBS = {
    "seq read 1M (MB/s)": ("read", "1M", "psync", 1),
    "seq write 1M (MB/s)": ("write", "1M", "psync", 1),
    "rand read 4K QD1 (IOPS)": ("randread", "4k", "psync", 1),
}


def cmdline(machine: str, extra: str = "") -> str:
    """The command line slimvisor's engine gives the same guest (root on the first disk, quiet)."""
    spec = DomainSpec(name="bench", kernel="", memory_mib=256, root="/dev/vda", cmdline=f"quiet {extra}".strip(),
                      type=machine)  # fmt: skip
    return kernel_cmdline(spec, host_accel(), machine)


def qemu_argv(machine: str, extra_cmdline: str = "") -> list[str]:
    """Bare QEMU for the guest of `machine` (hvm: q35 + SeaBIOS; pvh: microvm at the PVH note):
    accelerator, memory (a shared memfd, as slimvisor's engine gives it), serial console, kernel,
    initramfs and command line; the caller adds the devices."""
    vmlinuz, initrd = cloud_assets()
    boot = str(vmlinuz) if machine == "hvm" else str(kernels.pvh_kernel(str(vmlinuz), kernel_cache()))
    mach = "q35" if machine == "hvm" else "microvm,acpi=on,pcie=on"
    return [qemu_binary() or "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            *host_accel().args(), "-machine", f"{mach},memory-backend=mem", "-smp", str(VCPUS), "-m", MEMORY,
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY},share=on", "-serial", "stdio",
            "-kernel", boot, "-initrd", str(initrd), "-append", cmdline(machine, extra_cmdline)]  # fmt: skip


def virtio_blk(index: int, disk: Path) -> list[str]:
    """QEMU's built-in virtio-blk on a raw file (aio=threads, O_DIRECT): the anchor's disks."""
    return ["-drive", f"file={disk},if=none,id=d{index},format=raw,aio=threads,cache.direct=on",
            "-device", f"virtio-blk-pci,drive=d{index}"]  # fmt: skip


@contextmanager
def _qsd(disk: Path, tmp: Path, name: str) -> Iterator[Path]:
    sock = tmp / f"{name}.sock"
    export = f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on"
    proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={disk},"
                             "cache.direct=on", "--export", export], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon did not start")
            os.sched_yield()
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def guest(kind: str, rootfs: Path, data: Path | None) -> Iterator[ConsoleSession]:
    """A console on the guest of path `kind`, torn down afterwards."""
    vmlinuz, initrd = cloud_assets()
    engine, machine = kind.split()
    disks = [rootfs, *([data] if data else [])]
    with tempfile.TemporaryDirectory(prefix="svbench-hvm-") as t:
        if engine == "slimvisor":
            argv = [sys.executable, "-m", "slimvisor", "run", "--type", machine, "--vcpus", str(VCPUS), "--name",
                    f"bhvm{os.getpid()}", "--memory", MEMORY, "--kernel", str(vmlinuz), "--initrd", str(initrd),
                    "--cmdline", "quiet", "--log", f"{t}/log",
                    *(a for d in disks for a in ("--disk", str(d)))]  # fmt: skip
            con = ConsoleSession(argv)
            try:
                yield con
            finally:
                con.kill()
            return
        argv = qemu_argv(machine)
        with contextlib.ExitStack() as stack:
            for i, d in enumerate(disks):
                if engine == "qsd":
                    sock = stack.enter_context(_qsd(d, Path(t), f"d{i}"))
                    argv += ["-chardev", f"socket,id=c{i},path={sock}",
                             "-device", f"vhost-user-blk-pci,chardev=c{i},num-queues=1"]  # fmt: skip
                else:
                    argv += virtio_blk(i, d)
            con = ConsoleSession(argv)
            try:
                yield con
            finally:
                con.kill()


def time_to_init(kind: str, rootfs: Path) -> dict[str, float]:
    with guest(kind, rootfs, None) as con:
        con.expect(UP, 120)
        elapsed = time.monotonic() - con.started
        con.send("poweroff")
        con.wait(60)
    return {"time to init (s)": elapsed}


def io_round(kind: str, rootfs: Path, data: Path, size_mib: int) -> dict[str, float]:
    with guest(kind, rootfs, data) as con:
        con.expect(UP, 120)
        results = {name: _fio(con, "/dev/vdb", *job, size_mib) for name, job in JOBS.items()}
        con.send("poweroff")
        con.wait(60)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=128)
    args = ap.parse_args()
    cloud_assets()
    rootfs = bench_rootfs()
    accel = host_accel()
    print(f"accelerator: {accel.name} ({accel.reason})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="svbench-hvm-data-", dir="/var/tmp") as t:
        copy = Path(t) / "rootfs.ext4"  # the guests write to their root: a copy, booted read-write by all
        copy.write_bytes(rootfs.read_bytes())
        boot_kinds = ["slimvisor hvm", "qemu hvm", "slimvisor pvh", "qemu pvh"]
        boot = interleave(boot_kinds, args.rounds, lambda k: time_to_init(k, copy))
        report(f"Time to init, {accel.name}", boot, ["slimvisor hvm", "qemu hvm"], "qemu hvm", lower_is_better=True)
        report(f"Time to init, {accel.name}", boot, ["slimvisor pvh", "qemu pvh"], "qemu pvh", lower_is_better=True)
        med = {k: statistics.median(v) for k, v in boot["time to init (s)"].items()}
        print(f"PVH / HVM time to init: slimvisor {med['slimvisor pvh'] / med['slimvisor hvm']:.2f}x, "
              f"bare QEMU {med['qemu pvh'] / med['qemu hvm']:.2f}x")  # fmt: skip
        data = Path(t) / "data.raw"
        with open(data, "wb") as f:  # random content, then read once: the host page cache is warm for all
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        data.read_bytes()
        io_kinds = ["slimvisor hvm", "qemu hvm", "qsd hvm"]
        io = interleave(io_kinds, args.rounds, lambda k: io_round(k, copy, data, args.size_mib // 2))
        report(f"HVM guest block I/O (fio, O_DIRECT), {accel.name}", io, io_kinds, "qemu hvm")


if __name__ == "__main__":
    main()
