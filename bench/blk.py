"""Block I/O inside a UML domain: slimvisor's vhost-user-blk against its anchors, in one run.

Paths, all serving the same raw image to the same UML guest (busybox + fio, O_DIRECT):
  slimvisor  `slimvisor backend blk` (Python vhost-user-blk)
  qsd        `qemu-storage-daemon --export type=vhost-user-blk` (the C anchor)
  ubd        UML's in-kernel ubd driver
  slimvisor run (jailed)  the same backend serving a domain of `slimvisor run`: UML in its jail
and, each round over a fresh copy-on-write overlay of that raw image (the guest's writes fill it):
  slimvisor-overlay  `slimvisor backend blk` serving a slimvisor overlay (slimvisor.storage.overlay)
  qsd-qcow2          qemu-storage-daemon serving a qcow2 overlay (qemu-img create -b RAW -F raw)
Rounds are interleaved (every round runs every path, in a fresh order) and medians are reported
with ratios to qsd. Also: time to init of `slimvisor run` against bare linux.uml with ubd.

    python3 bench/blk.py [--rounds 5] [--size-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hoststat import cpu_times, stolen
from rich.console import Console
from rich.table import Table

from slimvisor.images import busybox
from slimvisor.images.cache import busybox_assets, cache_dir
from slimvisor.testing.expect import ConsoleSession

UML = "/usr/bin/linux.uml"
UP = r"slimvisor: \S+ is up"
JOBS = {
    "seq read 1M (MB/s)": ("read", "1M", "psync", 1),
    "seq write 1M (MB/s)": ("write", "1M", "psync", 1),
    "rand read 4K QD1 (IOPS)": ("randread", "4k", "psync", 1),
    "rand read 4K QD16 (IOPS)": ("randread", "4k", "libaio", 16),
}


def bench_rootfs() -> Path:
    """The busybox root disk plus fio and its libraries (cached)."""
    path = cache_dir() / f"bench-rootfs-{busybox.fingerprint()}.ext4"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            busybox.add_host_binaries(Path(tmp), ["/usr/bin/fio"])
            busybox.build_rootfs(path, size_mib=256, extra_tree=Path(tmp))
    return path


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"backend for {path} did not start")
        time.sleep(0.02)


@contextmanager
def _backend(kind: str, disk: Path, tmp: Path) -> Iterator[list[str]]:
    """Start the path's backend; yield the UML arguments that attach the disk."""
    if kind == "ubd":
        yield [f"ubdb={disk}"]
        return
    sock = tmp / f"{kind}.sock"
    if kind == "slimvisor":
        argv = [sys.executable, "-m", "slimvisor", "backend", "blk", "--allow-unsealed-memory", "--socket", str(sock),
                str(disk)]  # bare UML: its memory file cannot be sealed
    elif kind == "slimvisor-overlay":
        from slimvisor.storage import create_overlay

        create_overlay(str(tmp / "disk.ovl"), str(disk))
        spec = f"{tmp}/disk.ovl,format=overlay"
        argv = [sys.executable, "-m", "slimvisor", "backend", "blk", "--allow-unsealed-memory", "--socket", str(sock),
                spec]
    elif kind == "qsd-qcow2":
        ovl = tmp / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw", str(ovl)], check=True)
        export = f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on"
        node = f"driver=qcow2,node-name=f0,file.driver=file,file.filename={ovl}"
        argv = ["qemu-storage-daemon", "--blockdev", node, "--export", export]
    else:
        export = f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on"
        argv = ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={disk}", "--export", export]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_socket(sock, proc)
        yield [f"virtio_uml.device={sock}:2"]
    finally:
        proc.terminate()
        proc.wait(10)
        sock.unlink(missing_ok=True)


def _guest(initrd: Path, rootfs: Path, extra: list[str], tmp: Path) -> ConsoleSession:
    argv = [UML, "mem=256M", f"initrd={initrd}", "root=/dev/ubda", f"ubda={rootfs}", "con=null",
            "con0=fd:0,fd:1", f"uml_dir={tmp}", "quiet", *extra]  # fmt: skip
    return ConsoleSession(argv, env={"TMPDIR": "/dev/shm"}, cwd=str(tmp))


def _fio(con: ConsoleSession, dev: str, rw: str, bs: str, engine: str, depth: int, size_mib: int) -> float:
    cmd = (f"fio --name=j --filename={dev} --direct=1 --rw={rw} --bs={bs} --ioengine={engine} "
           f"--iodepth={depth} --size={size_mib}M --output-format=json")  # fmt: skip
    if rw == "randread":
        cmd += " --time_based --runtime=4"
    out = con.run(cmd, timeout=300)
    if con.last_status != 0:
        raise RuntimeError(f"fio failed: {out[-500:]}")
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if rw == "write" else job["read"]
    return float(side["iops"]) if rw == "randread" else float(side["bw_bytes"]) / 1e6


def io_round(kind: str, initrd: Path, rootfs: Path, disk: Path, size_mib: int) -> dict[str, float]:
    if kind == JAILED:
        return _jailed_io_round(rootfs, disk, size_mib)
    with tempfile.TemporaryDirectory(prefix="svbench-") as t, _backend(kind, disk, Path(t)) as extra:
        con = _guest(initrd, rootfs, extra, Path(t))
        try:
            con.expect(UP, 60)
            dev = "/dev/ubdb" if kind == "ubd" else "/dev/vda"
            results = {name: _fio(con, dev, *job, size_mib) for name, job in JOBS.items()}
            con.send("poweroff")
            con.wait(60)
            return results
        finally:
            con.kill()


JAILED = "slimvisor run (jailed)"


def _jailed_io_round(rootfs: Path, disk: Path, size_mib: int) -> dict[str, float]:
    """The same fio jobs in a domain of `slimvisor run`: UML in its jail, root and data disk served
    by slimvisor's backend process (the data disk is /dev/vdb)."""
    with tempfile.TemporaryDirectory(prefix="svbench-") as t:
        argv = [sys.executable, "-m", "slimvisor", "run", "--name", f"benchio{os.getpid()}", "--memory", "256M",
                "--disk", str(rootfs), "--disk", str(disk), "--cmdline", "quiet", "--log", f"{t}/log"]  # fmt: skip
        con = ConsoleSession(argv)
        try:
            con.expect(UP, 60)
            results = {name: _fio(con, "/dev/vdb", *job, size_mib) for name, job in JOBS.items()}
            con.send("poweroff")
            con.wait(60)
            return results
        finally:
            con.kill()


def time_to_init(kind: str, initrd: Path, rootfs: Path) -> float:
    """Seconds from starting the domain until its init says it is up."""
    with tempfile.TemporaryDirectory(prefix="svbench-") as t:
        if kind == "slimvisor run":
            argv = [sys.executable, "-m", "slimvisor", "run", "--name", f"bench{os.getpid()}",
                    "--memory", "256M", "--disk", str(rootfs), "--cmdline", "quiet", "--log", f"{t}/log"]  # fmt: skip
            con = ConsoleSession(argv)
        else:
            con = _guest(initrd, rootfs, [], Path(t))
        try:
            con.expect(UP, 60)
            elapsed = time.monotonic() - con.started
            con.send("poweroff")
            con.wait(60)
            return elapsed
        finally:
            con.kill()


Samples = dict[str, dict[str, list[float]]]  # metric -> path -> values


def interleave(kinds: list[str], rounds: int, fn: Callable[[str], dict[str, float]]) -> Samples:
    samples: Samples = defaultdict(lambda: defaultdict(list))
    before = cpu_times()
    for r in range(rounds):
        order = random.sample(kinds, len(kinds))
        for kind in order:
            for metric, value in fn(kind).items():
                samples[metric][kind].append(value)
        print(f"round {r + 1}/{rounds} done ({', '.join(order)})", file=sys.stderr)
    samples["steal"]["%"] = [stolen(before, cpu_times())]  # what the host's hypervisor took meanwhile
    return samples


def report(title: str, samples: Samples, kinds: list[str], anchor: str,
           lower_is_better: bool = False, ratio_label: str = "slimvisor") -> None:  # fmt: skip
    steal = samples["steal"]["%"][0] if "steal" in samples else 0.0
    table = Table(title=f"{title}; {os.cpu_count()} CPUs, {steal:.0f}% of CPU time stolen",
                  caption="median (lowest-highest round)")  # fmt: skip
    table.add_column("metric")
    for kind in kinds:
        table.add_column(f"{kind} (median)", justify="right")
    ratios = kinds[0] != anchor  # one path alone: its figures, no ratio
    if ratios:
        table.add_column(f"{ratio_label} / {anchor}", justify="right")
    for metric, by_kind in samples.items():
        if metric == "steal":
            continue
        med = {k: statistics.median(v) for k, v in by_kind.items()}
        ratio = med[kinds[0]] / med[anchor] if med[anchor] else float("nan")
        fmt = ",.3f" if lower_is_better else ",.0f"
        cells = [f"{med[k]:{fmt}} ({min(by_kind[k]):{fmt}}-{max(by_kind[k]):{fmt}})" for k in kinds]
        table.add_row(metric, *cells, *([f"{ratio:.2f}x"] if ratios else []))
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    initrd, _ = busybox_assets()
    rootfs = bench_rootfs()
    with tempfile.TemporaryDirectory(prefix="svbench-data-", dir="/var/tmp") as t:
        disk = Path(t) / "data.raw"
        with open(disk, "wb") as f:  # random content, then read once: the host page cache is warm
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        disk.read_bytes()
        kinds = ["slimvisor", "qsd", "ubd", JAILED]
        overlay_kinds = ["slimvisor-overlay", "qsd-qcow2"]
        io = interleave(kinds + overlay_kinds, args.rounds,
                        lambda k: io_round(k, initrd, rootfs, disk, args.size_mib))  # fmt: skip
    report(f"UML guest block I/O, {args.rounds} interleaved rounds", io, kinds, "qsd")
    for metric, by_kind in io.items():
        if JAILED in by_kind:  # the jail's cost on the I/O path: the same backend, UML jailed or not
            ratio = statistics.median(by_kind[JAILED]) / statistics.median(by_kind["slimvisor"])
            print(f"{metric}: jailed / unjailed slimvisor {ratio:.2f}x")
    report("... over a fresh copy-on-write overlay each round", io, overlay_kinds, "qsd-qcow2")
    boot_kinds = ["slimvisor run", "bare linux.uml + ubd"]
    boot = interleave(boot_kinds, args.rounds, lambda k: {"time to init (s)": time_to_init(k, initrd, rootfs)})
    report("Time to init", boot, boot_kinds, "bare linux.uml + ubd", lower_is_better=True)
    med = {k: statistics.median(v) for k, v in boot["time to init (s)"].items()}
    print(f"slimvisor run overhead: {1000 * (med['slimvisor run'] - med['bare linux.uml + ubd']):+.0f} ms")


if __name__ == "__main__":
    main()
