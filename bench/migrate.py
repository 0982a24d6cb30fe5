"""Live migration of an HVM/PVH domain: slimvisor against plain QEMU, in one run (issue 16).

The guest is the same for both paths: Debian's cloud kernel with slimvisor's boot initramfs, the
busybox root disk, 2 vCPUs, 256 MiB, the accelerator this host gives unmodified guests (TCG here),
migrated between two processes on this machine over a Unix socket, idle and while a small writer
in the guest dirties its memory at a fixed rate (`DIRTIER`). Paths:
  slimvisor  two slimvisord (each its own SLIMVISOR_RUN_DIR/STATE_DIR/LOG_DIR, as two hosts), a
             switch on each with a TAP uplink; `slimvisor create` on A, `slimvisor migrate NAME
             --daemon B`: QEMU with slimvisor's vhost-user disk and NIC (dirty logging in Python)
  qemu       plain qemu-system-x86_64, source and `-incoming`, QEMU's built-in virtio-blk-pci on the
             same raw file and virtio-net-pci on a TAP each: the anchor
Both paths' TAPs sit in one Linux bridge with the host's address on it, so the host reaches the
guest wherever it runs; the bridge learns the guest's new port from the target's announcement.
Measured per migration: downtime (QEMU's query-migrate `downtime`), the guest-visible gap (the
longest pause between replies of a `ping -i 0.001` from the host to the guest) and total time
(query-migrate `total-time`). Rounds are interleaved (every round runs every path, in a fresh
order), each with a freshly booted guest; medians with the lowest and highest round, ratios to
plain QEMU, and the CPU time the host's hypervisor stole meanwhile.

    python3 bench/migrate.py [--rounds 5] [--type hvm|pvh] [--paths slimvisor,qemu]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blk import UP, Samples, bench_rootfs, interleave, report
from hvm import MEMORY, VCPUS, qemu_argv, virtio_blk
from pyroute2 import IPRoute

from slimvisor.engines.qemu.engine import host_accel
from slimvisor.engines.qemu.qmp import Qmp
from slimvisor.images.cache import cloud_assets
from slimvisor.testing.expect import ConsoleSession

# What both paths' migrations are given (--downtime-limit changes the first): slimvisor's own
# (issue 16's branch: domain/migration.py DOWNTIME_MS, engines/qemu/engine.py MIGRATION_BANDWIDTH).
# QEMU's defaults, a 300 ms downtime limit and a bandwidth cap of 128 MiB/s, would make the copy,
# not the devices, the figure.
DOWNTIME_LIMIT_MS = 100
MAX_BANDWIDTH = 1 << 40  # bytes/s: no cap
# The writer: every 100 ms, 4 MiB of random bytes over a 64 MiB tmpfs file, in turn (at most
# 40 MiB/s, less as TCG slows the copy). Random, not zeros: QEMU sends a zero page as a flag.
DIRTY_MIB, DIRTY_SPAN_MIB, DIRTY_PERIOD_US = 4, 64, 100_000
DIRTIER = (
    f"dd if=/dev/urandom of=/tmp/src bs=1M count={DIRTY_MIB} 2>/dev/null; "
    f"(i=0; while :; do dd if=/tmp/src of=/tmp/dirty bs=1M count={DIRTY_MIB} "
    f"seek=$(( i % {DIRTY_SPAN_MIB // DIRTY_MIB} * {DIRTY_MIB} )) conv=notrunc 2>/dev/null; "
    f"i=$((i+1)); usleep {DIRTY_PERIOD_US}; done) > /dev/null 2>&1 & true"
)
HOST_IP, GUEST_IP, PREFIX = "10.79.0.1", "10.79.0.2", 24
GUEST_MAC = "00:16:3e:79:00:02"
BOOT_TIMEOUT = 180
PING_LEAD = 1.0  # seconds of ping before the migration starts and, at least, after it ends
PING_AFTER_MAX = 10.0  # how long to wait for the guest to answer again after the migration
LOST = "guest lost after the move"


@dataclass
class Migration:
    """What one migration measured; the figures are QEMU's query-migrate ones, in ms."""

    downtime_ms: float
    total_ms: float
    transferred_mib: float = 0.0


# -- the network both paths share ----------------------------------------------------------------
@contextmanager
def bridge(tag: str) -> Iterator[str]:
    """A Linux bridge with the host's address: the wire between the two "hosts"' TAPs."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=tag, kind="bridge")
        idx = ipr.link_lookup(ifname=tag)[0]
        ipr.addr("add", index=idx, address=HOST_IP, prefixlen=PREFIX)
        ipr.link("set", index=idx, state="up")
    try:
        yield tag
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=tag):
                ipr.link("del", index=idx)


def enslave(tap: str, br: str) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], master=ipr.link_lookup(ifname=br)[0], state="up")


@contextmanager
def taps(names: list[str], br: str) -> Iterator[list[str]]:
    """Persistent TAPs in the bridge, for plain QEMU's `-netdev tap,ifname=`."""
    with IPRoute() as ipr:
        for name in names:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", vnet_hdr=True)
    try:
        for name in names:
            enslave(name, br)
        yield names
    finally:
        with IPRoute() as ipr:
            for name in names:
                for idx in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=idx)


class PingGap:
    """`ping -D -i 0.001` from the host to the guest; `gap()` is the longest pause between replies."""

    def __init__(self) -> None:
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close(), outlives __init__
        self.proc = subprocess.Popen(["ping", "-D", "-n", "-i", "0.001", "-W", "1", GUEST_IP],
                                     stdout=self.out, stderr=subprocess.DEVNULL)  # fmt: skip

    def replies(self) -> list[float]:
        self.out.seek(0)
        text = self.out.read().decode(errors="replace")
        return [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", text, re.M)]

    def wait_reply_after(self, t: float, timeout: float) -> bool:
        """Wait (polling the output file, every 50 ms) for a reply stamped after `t` (time.time())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (r := self.replies()) and r[-1] > t:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(10)

    def gap(self, start: float, end: float) -> float:
        """The longest pause (ms) between replies around [start, end]; the time to the end of the
        stream if the guest never answered again."""
        r = [t for t in self.replies() if start - PING_LEAD <= t]
        if len(r) < 2:
            raise RuntimeError("the guest answered no ping around the migration")
        gaps = [b - a for a, b in itertools.pairwise(r)]
        if r[-1] < end:
            gaps.append(time.time() - r[-1])
        return 1000 * max(gaps)

    def close(self) -> None:
        self.stop()
        self.out.close()


def wait_ping(timeout: float = 30) -> None:
    """The guest answers the host (its NIC is up, the bridge knows its port)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["ping", "-c", "1", "-W", "1", GUEST_IP], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest does not answer pings at {GUEST_IP}")


def measure(migrate: Callable[[], Migration]) -> dict[str, float]:
    """Run one migration under the ping stream; its figures."""
    ping = PingGap()
    try:
        if not ping.wait_reply_after(time.time(), 10):
            raise RuntimeError("the ping stream got no reply")
        time.sleep(PING_LEAD)  # a measuring window: the stream's steady state before the migration
        start = time.time()
        m = migrate()
        end = time.time()
        if ping.wait_reply_after(end, PING_AFTER_MAX):
            time.sleep(PING_LEAD)  # and after it, as before it
        ping.stop()
        gap = ping.gap(start, end)
    finally:
        ping.close()
    return {"downtime (ms)": m.downtime_ms, "guest-visible gap, 1 ms ping (ms)": gap, "total time (ms)": m.total_ms,
            "command to done, wall (ms)": 1000 * (end - start), "sent (MiB)": m.transferred_mib}  # fmt: skip


# -- plain QEMU ------------------------------------------------------------------------------------
def qmp_connect(path: Path, timeout: float = 30) -> Qmp:
    """slimvisor's QMP client on QEMU's `-qmp unix:PATH,server=on,wait=off`, greeted and ready."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's monitor {path} did not come up") from None
            time.sleep(0.05)
    qmp = Qmp(sock)
    while not qmp.ready:
        if time.monotonic() > deadline or qmp.eof:
            raise RuntimeError(f"QEMU's monitor {path} did not greet")
        select.select([qmp], [], [], 1.0)
        qmp.pump()
    return qmp


def wait_migration(qmp: Qmp, timeout: float = 600) -> dict[str, Any]:
    """Poll query-migrate (every 10 ms) until the migration completed; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"migration {status}: {info.get('error-desc', info)}")
        time.sleep(0.01)


def figures(info: dict[str, Any]) -> Migration:
    """A completed query-migrate answer as a Migration."""
    ram = info.get("ram", {})
    return Migration(downtime_ms=float(info["downtime"]), total_ms=float(info["total-time"]),
                     transferred_mib=ram.get("transferred", 0) / 2**20)  # fmt: skip


@contextmanager
def plain_qemu(machine: str, rootfs: Path, tap: str, tmp: Path, name: str,
               incoming: str | None = None) -> Iterator[tuple[ConsoleSession, Qmp]]:  # fmt: skip
    """One plain QEMU (the source, or with `incoming` the target) with its console and monitor."""
    monitor = tmp / f"{name}.qmp"
    argv = [*qemu_argv(machine, f"sv.ip={GUEST_IP}/{PREFIX}"), *virtio_blk(0, rootfs),
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
            "-qmp", f"unix:{monitor},server=on,wait=off",
            *(["-incoming", "defer"] if incoming else [])]  # fmt: skip
    con = ConsoleSession(argv)
    qmp = None
    try:
        qmp = qmp_connect(monitor)
        if incoming:
            qmp.execute("migrate-incoming", {"uri": incoming})
        yield con, qmp
    finally:
        if qmp is not None:
            qmp.close()
        con.kill()


def plain_round(machine: str, rootfs: Path, dirty: bool, taps_: list[str], limit_ms: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="svmig-") as t, contextlib.ExitStack() as stack:
        tmp = Path(t)
        src, sq = stack.enter_context(plain_qemu(machine, rootfs, taps_[0], tmp, "src"))
        src.expect(UP, BOOT_TIMEOUT)
        src.run("true")
        if dirty:
            src.run(DIRTIER)
        wait_ping()
        uri = f"unix:{tmp}/migrate.sock"
        dst, dq = stack.enter_context(plain_qemu(machine, rootfs, taps_[1], tmp, "dst", incoming=uri))
        sq.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": limit_ms})

        def migrate() -> Migration:
            stopped = stopped_copy()
            if stopped:
                sq.execute("stop")
            sq.execute("migrate", {"uri": uri})
            done = figures(wait_migration(sq))
            if stopped:  # a guest stopped at the source stays stopped at the target until told, once loaded
                while dq.execute("query-status")["status"] == "inmigrate":
                    time.sleep(0.002)
                dq.execute("cont")
            return done

        return {**measure(migrate), LOST: lost(dst)}


LIVE_ANCHOR = False  # --live-anchor


def stopped_copy() -> bool:
    """Whether slimvisor copies the guest stopped on this host (QemuEngine.why_not_live: under TCG,
    QEMU 7.2 loses guest writes in live migrations): the anchor then does the same, so both paths
    are measured on the same terms. `--live-anchor` measures QEMU's live migration instead."""
    from slimvisor.engines.qemu.engine import HVM
    from slimvisor.model.spec import DomainSpec

    if LIVE_ANCHOR:
        return False
    return HVM.why_not_live(DomainSpec(name="b", kernel="", memory_mib=256, type="hvm", vcpus=VCPUS)) is not None


def lost(con: ConsoleSession) -> float:
    """0 if the guest lives on in the target (its console answers there), else 1, with its whole
    console output kept (an oops after the move scrolls out of any tail) and named: a lost guest is
    a figure of its own, counted per path, and the run goes on."""
    try:
        if con.run("echo alive", timeout=60).strip() == "alive":
            return 0.0
    except AssertionError:
        pass
    log = Path(tempfile.mkstemp(prefix="svmig-target-", suffix=".log", dir="/var/tmp")[1])
    log.write_text(con.text)
    print(f"the migrated guest does not answer on the target's console (its output: {log})", file=sys.stderr)
    return 1.0


# -- slimvisor -----------------------------------------------------------------------------------
class Host:
    """A slimvisord of its own (run, state and log trees), as one "host" of the migration."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root / name
        trees = {"SLIMVISOR_RUN_DIR": "run", "SLIMVISOR_STATE_DIR": "state", "SLIMVISOR_LOG_DIR": "log"}
        self.env = {**os.environ, **{k: str(self.root / v) for k, v in trees.items()}}

    @property
    def socket(self) -> Path:
        return self.root / "run" / "slimvisord.sock"

    def wrap(self, argv: list[str]) -> list[str]:
        """How this host runs a command: as it is (bench/pool.py's hosts enter their netns)."""
        return argv

    def sv(self, *args: str, timeout: float = 300) -> str:
        """`slimvisor ARGS` against this host's daemon (started on demand); its stdout."""
        proc = subprocess.run(self.wrap([sys.executable, "-m", "slimvisor", *args]), env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"slimvisor {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
        return proc.stdout

    def console(self, name: str) -> ConsoleSession:
        return ConsoleSession(self.wrap([sys.executable, "-m", "slimvisor", "console", name]), self.env)

    def close(self, domain: str, switch: str) -> None:
        """Destroy what is left, stop the switch and the daemon."""
        for args in (("destroy", domain), ("switch", "stop", switch), ("daemon", "stop")):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.sv(*args, timeout=60)


def slimvisor_config(path: Path, name: str, machine: str, rootfs: Path, switch: str) -> Path:
    """The guest as an xl.cfg: the same kernel, initramfs, disk, memory and vCPUs as plain QEMU's,
    its NIC on the host's switch. xen_platform_pci = 0: no xenstore vsock (QEMU 7.2's
    vhost-user-vsock cannot migrate)."""
    kernel, initrd = cloud_assets()
    path.write_text("\n".join([
        f'name = "{name}"', f'type = "{machine}"', f"memory = {int(MEMORY.rstrip('M'))}", f"vcpus = {VCPUS}",
        f'kernel = "{kernel}"', f'ramdisk = "{initrd}"', f"disk = ['{rootfs},raw,xvda,rw']",
        f"vif = ['bridge={switch},mac={GUEST_MAC}']", f'extra = "sv.ip={GUEST_IP}/{PREFIX}"',
        "xen_platform_pci = 0", "on_poweroff = 'destroy'",
    ]) + "\n")  # fmt: skip
    return path


def slimvisor_migrate(source: Host, target: Host, name: str, limit_ms: int) -> Migration:
    """Migrate `name` from `source` to `target`; QEMU's figures for it: the `migrate` op (what
    `slimvisor migrate NAME --daemon SOCKET` calls), then the source's `domain-info` until the domain
    is gone from there; the completed figures travel with the handshake's GO to the target, whose
    `domain-info` shows them. slimvisor's QEMU uses domain/migration.py's DOWNTIME_MS (100 ms) and
    no bandwidth cap, which this bench's defaults follow."""
    from slimvisor.toolstack.api import ApiError, Client

    last: dict[str, Any] = {}
    with Client(source.socket, autostart=False, timeout=600) as client:
        client.call("migrate", domain=name, target={"daemon": str(target.socket)}, live=True, paused=False)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                info = client.call("domain-info", domain=name)
            except ApiError as e:
                if e.code == "no-such-domain":
                    break
                time.sleep(0.01)  # its supervisor is ending (as `slimvisor migrate` reads it): gone next
                continue
            last = info.get("migration") or last
            if last.get("status") == "failed":
                raise RuntimeError(f"{name} did not move: {last.get('error', 'failed')}")
            time.sleep(0.01)
        else:
            raise RuntimeError(f"{name} still migrating after 600 s")
    if "downtime_ms" not in last:  # the source forgot the domain first: the target has the figures
        with Client(target.socket, autostart=False, timeout=60) as client:
            arrived = client.call("domain-info", domain=name).get("migration") or {}
        if arrived.get("status") == "completed":
            last = arrived
    if not {"downtime_ms", "total_time_ms"} <= last.keys():  # gone from the source without failing: moved
        raise RuntimeError(f"no completed migration's figures on either side; the last seen: {last}")
    return Migration(downtime_ms=float(last["downtime_ms"]), total_ms=float(last["total_time_ms"]),
                     transferred_mib=float(last.get("bytes_sent", 0)) / 2**20)  # fmt: skip


def slimvisor_available() -> str | None:
    """None if this slimvisor has `migrate`, else why the slimvisor path is skipped."""
    proc = subprocess.run([sys.executable, "-m", "slimvisor", "migrate", "--help"], capture_output=True)
    return None if proc.returncode == 0 else "this slimvisor has no `migrate` command yet (issue 16)"


def slimvisor_round(machine: str, rootfs: Path, dirty: bool, br: str, limit_ms: int) -> dict[str, float]:
    tag = f"m{os.getpid() % 100000}"
    name, switch = f"mig{tag}", f"sw{tag}"
    root = Path(tempfile.mkdtemp(prefix="svm", dir="/run"))  # short: socket paths below it
    hosts = [Host(root, "a"), Host(root, "b")]
    try:
        for host, uplink in zip(hosts, (f"{tag}a", f"{tag}b"), strict=True):
            host.sv("info")  # its daemon, started on demand: the target's must be up to be migrated to
            host.sv("switch", "start", switch, "--uplink", uplink)
            enslave(uplink, br)
        with tempfile.TemporaryDirectory(prefix="svmig-") as t:
            cfg = slimvisor_config(Path(t) / "guest.cfg", name, machine, rootfs, switch)
            hosts[0].sv("create", str(cfg))
        con = hosts[0].console(name)
        try:
            con.expect(UP, BOOT_TIMEOUT)
            con.run("true")
            if dirty:
                con.run(DIRTIER)
        finally:
            con.kill()
        wait_ping()
        result = measure(lambda: slimvisor_migrate(hosts[0], hosts[1], name, limit_ms))
        con = hosts[1].console(name)
        try:
            return {**result, LOST: lost(con)}
        finally:
            con.kill()
    finally:
        for host in reversed(hosts):
            host.close(name, switch)
        shutil.rmtree(root, ignore_errors=True)


# -- the run -------------------------------------------------------------------------------------
def goals(samples: Samples, load: str) -> None:
    """The issue's goal: downtime <= 1.2x plain QEMU's (and < 100 ms idle), total time <= 1.2x."""
    med = {m: {k: statistics.median(v) for k, v in by.items()} for m, by in samples.items() if m != "steal"}
    s, q = f"slimvisor {load}", f"qemu {load}"
    if s not in med["downtime (ms)"]:
        return
    down, total = med["downtime (ms)"], med["total time (ms)"]
    checks = [(f"downtime {down[s]:.0f} ms <= 1.2 x {down[q]:.0f} ms", down[s] <= 1.2 * down[q]),
              (f"total time {total[s]:.0f} ms <= 1.2 x {total[q]:.0f} ms", total[s] <= 1.2 * total[q])]  # fmt: skip
    if load == "idle":
        checks.append((f"downtime {down[s]:.0f} ms < 100 ms", down[s] < 100))
    for text, ok in checks:
        print(f"goal ({load}): {text}: {'met' if ok else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--type", dest="machine", choices=["hvm", "pvh"], default="hvm")
    ap.add_argument("--downtime-limit", type=int, default=DOWNTIME_LIMIT_MS, metavar="MS",
                    help=f"QEMU's downtime-limit for both paths [default: slimvisor's, {DOWNTIME_LIMIT_MS}]")
    ap.add_argument("--loads", default="idle,dirtying", help="comma-separated: idle, dirtying")
    ap.add_argument("--paths", default="slimvisor,qemu", help="comma-separated: slimvisor, qemu")
    ap.add_argument("--live-anchor", action="store_true",
                    help="plain QEMU migrates live even where slimvisor copies stopped (TCG: QEMU 7.2 loses writes)")
    args = ap.parse_args()
    global LIVE_ANCHOR
    LIVE_ANCHOR = args.live_anchor
    if os.geteuid() != 0:
        sys.exit("bench/migrate.py needs root: TAPs, a bridge and a 1 ms ping")
    paths = [p for p in args.paths.split(",") if p]
    if "slimvisor" in paths and (why := slimvisor_available()):
        print(f"slimvisor path skipped: {why}", file=sys.stderr)
        paths.remove("slimvisor")
    cloud_assets()
    accel = host_accel()
    print(f"accelerator: {accel.name} ({accel.reason}); guest {args.machine}, {MEMORY}, {VCPUS} vCPUs; "
          f"downtime-limit {args.downtime_limit} ms, max-bandwidth {MAX_BANDWIDTH >> 20} MiB/s",
          file=sys.stderr)  # fmt: skip
    tag = f"mb{os.getpid() % 100000}"
    with (tempfile.TemporaryDirectory(prefix="svbench-mig-", dir="/var/tmp") as t, bridge(tag) as br,
          taps([f"{tag}s", f"{tag}d"], br) as qemu_taps):  # fmt: skip
        rootfs = Path(t) / "rootfs.ext4"  # shared storage: both ends open the same file
        shutil.copyfile(bench_rootfs(), rootfs)

        def one(kind: str) -> dict[str, float]:
            path, load = kind.split()
            if path == "qemu":
                return plain_round(args.machine, rootfs, load == "dirtying", qemu_taps, args.downtime_limit)
            return slimvisor_round(args.machine, rootfs, load == "dirtying", br, args.downtime_limit)

        for load in [x for x in args.loads.split(",") if x]:
            kinds = [f"{p} {load}" for p in paths]
            samples = interleave(kinds, args.rounds, one)
            gone = samples.pop(LOST)
            writer = "" if load == "idle" else f" ({DIRTY_MIB} MiB every {DIRTY_PERIOD_US // 1000} ms in the guest)"
            title = f"Live migration, {args.machine} {MEMORY} {load}{writer}, {accel.name}, {args.rounds} rounds"
            report(title, samples, kinds, f"qemu {load}", lower_is_better=True)
            goals(samples, load)
            print(f"guests lost after the move ({load}): "
                  + ", ".join(f"{k.split()[0]} {sum(v):.0f} of {len(v)}" for k, v in gone.items()))  # fmt: skip


if __name__ == "__main__":
    main()
