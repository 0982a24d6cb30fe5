"""A pool of three hosts against one host: placing and booting, the network across hosts, HA restart (issue 18).

The hosts are network namespaces on one Linux bridge (slimvisor.testing.netns, as the pool's tests),
each with its own slimvisord (own run, state and log trees) and a member of the pool's three-member
etcd; all of them share this machine's CPUs, so the pool cannot boot faster than one host here:
what it costs is the pool's own work (etcd transactions, placement, the pool link, VXLAN).
Every round makes a fresh pool (`pool init` on hostA, `pool join` on hostB and hostC) and measures:
  boot       `slimvisor cluster up N` (64 MiB busybox PV nodes, copy-on-write overlays) from the
             command to every node's "slimvisor: NODE is up" console line, on the pool (nodes spread
             over the three members) against the same command on one plain slimvisord (no pool, the
             root netns): the anchor. The two paths run in a fresh order each round, alone.
  network    between two nodes of the pool's cluster: node1 (hostA) to node2 (hostB) through the
             pool-wide switch's VXLAN, against node1 to node4 (both on hostA: one host's switch);
             iperf3 TCP throughput (5 s) and the median round trip of 100 pings, in a fresh order.
  HA         a domain with on_crash = "restart" on hostC; hostC's slimvisord is killed (SIGKILL):
             its lease is renewed no more; from the kill, from kill + TTL (the latest the lease can
             expire; it does up to a renewal period, TTL/3, earlier) and from the moment etcd deleted
             hostC's key (an `etcdctl watch` on hostA), to the restarted domain's init line on the
             member that took it; the watch also times the take-over of the domain's record, which
             splits that into the pool's reaction and the domain's create and boot.
Medians with the lowest and highest round, ratios to the anchor, and the CPU time the host's own
hypervisor stole meanwhile (bench/hoststat.py). Everything it starts is stopped at the end, also
on Ctrl-C or a failure: domains, switches, daemons, etcd, the namespaces and the bridge.

    python3 bench/pool.py [--rounds 5] [--nodes 6] [--ttl 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from blk import Samples, report
from hoststat import cpu_times, stolen
from migrate import Host

from slimvisor.images.cache import busybox_assets
from slimvisor.testing.etcd import ETCDCTL, EtcdCluster
from slimvisor.testing.netns import NetnsHost, etcd_members, pool_commands, underlay

UP = re.compile(r"slimvisor: \S+ is up")
CLUSTER = "bench"
POLL_S = 0.02  # how often the console logs are read while waiting for init lines
BOOT_TIMEOUT = 120.0  # all N up (about 7 s here): a node not up by then failed to boot
HA_TIMEOUT = 120.0
POOL, ONE = "pool of 3", "one host"
CROSS, SAME = "across hosts (VXLAN)", "one host's switch"


class BenchHost(Host):
    """A slimvisord of its own (bench/migrate.py's Host), inside `place`'s namespaces or, without one,
    in this process's."""

    def __init__(self, root: Path, place: NetnsHost | None = None) -> None:
        super().__init__(root, place.name if place else "single")
        self.place = place

    @property
    def name(self) -> str:
        return self.place.name if self.place else "one host"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def etcd_url(self) -> str:
        assert self.place is not None
        return self.place.etcd_url

    def wrap(self, argv: list[str]) -> list[str]:
        return self.place.wrap(argv) if self.place else argv

    def popen(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.wrap(argv), env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip

    def daemon_pid(self) -> int:
        return int(json.loads(self.sv("info", "--json"))["pid"])

    def domains(self) -> list[str]:
        return [d["name"] for d in json.loads(self.sv("list", "--json")) if d["domid"] != 0]

    def up_lines(self, names: list[str], seen: dict[str, float]) -> None:
        """Record in `seen` (name -> time.monotonic()) each of `names` whose init line is in its console log now."""
        for name in names:
            if name not in seen:
                log = self.log_dir / f"{name}.console.log"
                with contextlib.suppress(FileNotFoundError):
                    if UP.search(log.read_text(errors="replace")):
                        seen[name] = time.monotonic()

    def teardown(self) -> list[str]:
        """Destroy every domain, stop every switch and the daemon; the trees and cgroups go. What failed."""
        problems: list[str] = []
        if not self.root.exists():
            return problems
        try:
            if (self.root / "state" / "clusters").exists():  # its nodes, switch and overlays (of a failed round)
                with contextlib.suppress(RuntimeError):
                    self.sv("cluster", "down", CLUSTER, timeout=300)
            for name in self.domains():
                self.sv("destroy", name, timeout=120)
            for switch in json.loads(self.sv("switch", "list", "--json")):
                self.sv("switch", "stop", switch["name"], timeout=60)
            self.sv("daemon", "stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            problems.append(f"{self.name}: {e}")
        finally:
            from slimvisor.host.cgroup import cgroups_available, default_parent, remove_parent

            if cgroups_available():
                try:
                    remove_parent(default_parent(str(self.root / "run")))
                except OSError as e:
                    problems.append(f"{self.name}'s cgroups: {e}")
            shutil.rmtree(self.root, ignore_errors=True)
        return problems


@contextmanager
def bench_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="svp", dir="/run"))  # short: socket paths below it
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def a_pool(root: Path, ttl: int) -> Iterator[list[BenchHost]]:
    """Three hosts with an etcd member each, in one pool; all of it stopped on the way out."""
    problems: list[str] = []
    try:
        with underlay(3) as places:
            hosts = [BenchHost(root, place) for place in places]
            with EtcdCluster(etcd_members(places), root / "etcd") as etcd:
                try:
                    etcd.wait_healthy(60)
                    for host, args in zip(hosts, pool_commands(places, ttl), strict=True):
                        host.sv(*args)
                    yield hosts
                finally:
                    for host in hosts:  # while etcd still answers: their records go with their domains
                        problems += host.teardown()
    finally:
        if problems:
            print("teardown: " + "; ".join(problems), file=sys.stderr)


# -- boot ----------------------------------------------------------------------------------------
class BootFailed(RuntimeError):
    """A node of `cluster up` did not come up: counted per path, and the round goes on."""


def keep_logs(hosts: list[BenchHost]) -> Path:
    """The hosts' log trees (daemon, supervisors, consoles) copied where the teardown does not remove them."""
    kept = Path(tempfile.mkdtemp(prefix="svpool-failed-", dir="/var/tmp"))
    for host in hosts:
        with contextlib.suppress(OSError):
            shutil.copytree(host.log_dir, kept / host.name.replace(" ", "-"))
    return kept


def boot_cluster(hosts: list[BenchHost], n: int) -> dict[str, float]:
    """`cluster up N` on hosts[0]; the seconds from the command to its return and to every node's init line."""
    names = [f"node{k}" for k in range(1, n + 1)]
    seen: dict[str, float] = {}
    start = time.monotonic()
    proc = hosts[0].popen([sys.executable, "-m", "slimvisor", "cluster", "up", str(n), "--name", CLUSTER])
    returned = None
    while len(seen) < n or returned is None:
        if returned is None and proc.poll() is not None:
            returned = time.monotonic()
            if proc.returncode != 0:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"cluster up {n} on {hosts[0].name}: exit {proc.returncode}: {err[-800:]}")
        for host in hosts:
            host.up_lines(names, seen)
        if time.monotonic() - start > BOOT_TIMEOUT:
            proc.kill()
            proc.wait()
            raise BootFailed(f"{hosts[0].name if len(hosts) == 1 else 'the pool'}: only {sorted(seen)} of {n} nodes "
                             f"up after {BOOT_TIMEOUT:.0f} s (logs kept in {keep_logs(hosts)})")  # fmt: skip
        time.sleep(POLL_S)
    proc.wait()
    assert returned is not None
    ups = sorted(t - start for t in seen.values())
    return {f"command to all {n} nodes up (s)": ups[-1], "command to the median node up (s)": statistics.median(ups),
            "command returns (s)": returned - start}  # fmt: skip


def one_host_round(root: Path, n: int) -> dict[str, float]:
    host = BenchHost(root)
    try:
        host.sv("info")  # its daemon, started before the clock (the pool's are running too)
        return boot_cluster([host], n)
    finally:
        if problems := host.teardown():
            print("teardown: " + "; ".join(problems), file=sys.stderr)


# -- network -------------------------------------------------------------------------------------
def placed(host: BenchHost) -> dict[str, str]:
    """`slimvisor list --pool` on `host`: each domain's host."""
    return {d["name"]: d["host"] for d in json.loads(host.sv("list", "--pool", "--json"))}


def network(hosts: list[BenchHost]) -> dict[str, dict[str, float]]:
    """node1 to node2 (another host) and node1 to node4 (its own), in a fresh order: iperf3 and ping."""
    where = placed(hosts[0])
    peers = {CROSS: "node2", SAME: "node4"}
    if where.get("node1") != "hostA" or where.get("node2") == "hostA" or where.get("node4") != "hostA":
        raise RuntimeError(f"the cluster was not spread as this bench expects (node1, node4 on hostA): {where}")
    by_name = {h.name: h for h in hosts}
    consoles = [hosts[0].console("node1")]
    try:
        for peer in peers.values():
            consoles.append(server := by_name[where[peer]].console(peer))
            server.run("iperf3 -s -D > /dev/null")
        a = consoles[0]
        out: dict[str, dict[str, float]] = {}
        for kind in random.sample(list(peers), len(peers)):
            peer = peers[kind]
            a.run(f"ping -c 2 -W 5 {peer} > /dev/null")
            got = a.run(f"iperf3 -c {peer} -t 5 -J", timeout=120)
            gbps = json.loads(got[got.index("{") :])["end"]["sum_received"]["bits_per_second"] / 1e9
            ping = a.run(f"ping -c 100 -i 0.02 {peer}", timeout=120)
            rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", ping)]
            if len(rtts) < 90:
                raise RuntimeError(f"only {len(rtts)} of 100 pings from node1 to {peer} answered: {ping[-300:]}")
            out[kind] = {"TCP throughput, iperf3 5 s (Gbit/s)": gbps, "ping round trip, median of 100 (ms)":
                         statistics.median(rtts)}  # fmt: skip
        return out
    finally:
        for con in consoles:
            con.kill()


# -- HA ------------------------------------------------------------------------------------------
class Watch:
    """`etcdctl watch --prefix PREFIX` on a host: each event (PUT or DELETE) and its key, timed as read."""

    def __init__(self, host: BenchHost, prefix: str) -> None:
        self.proc = host.popen([ETCDCTL, f"--endpoints={host.etcd_url}", "watch", "--prefix", prefix])
        self.events: list[tuple[float, str, str]] = []  # (time.monotonic(), PUT or DELETE, key)
        self._buf = b""
        self._kind: str | None = None
        self._value = False  # the next line is a PUT's value

    def pump(self) -> None:
        """Read what etcdctl printed so far (its output: the event's kind, key, and a PUT's value, a line each)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while select.select([fd], [], [], 0)[0] and (chunk := os.read(fd, 1 << 16)):
            self._buf += chunk
        now = time.monotonic()
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if self._value:
                self._value = False
            elif self._kind is None and line in ("PUT", "DELETE"):
                self._kind = line
            elif self._kind is not None:
                self.events.append((now, self._kind, line))
                self._value, self._kind = self._kind == "PUT", None

    def first(self, kind: str, key: str, after: float = 0.0) -> float | None:
        return next((t for t, k, name in self.events if k == kind and name == key and t >= after), None)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def ha(hosts: list[BenchHost], rootfs: Path, ttl: int) -> dict[str, float]:
    """Kill hostC's daemon under a restartable domain; the times to its init on another member."""
    a, b, c = hosts
    disk = c.root / "ha.ext4"
    shutil.copyfile(rootfs, disk)  # shared storage: one file system for all three hosts
    cfg = c.root / "ha.cfg"
    cfg.write_text(f'name = "ha"\nmemory = 64\ndisk = ["{disk},raw,xvda,rw"]\non_crash = "restart"\n')
    # etcd deletes hostC's key when its lease expires, and the member that restarts ha takes its
    # record over (a PUT): a watch on hostA sees both as they happen
    record, lease = "/slimvisor/pool/domains/ha", "/slimvisor/pool/hosts/hostC"
    watch = Watch(a, "/slimvisor/pool/")
    try:
        c.sv("create", "--host", c.name, str(cfg))
        seen: dict[str, float] = {}
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not seen or watch.first("PUT", record) is None:  # the watch saw ha's claim: it is registered
            watch.pump()
            c.up_lines(["ha"], seen)
            if time.monotonic() > deadline:
                raise RuntimeError(f"ha did not boot on hostC, or the watch saw no claim: {watch.events}")
            time.sleep(POLL_S)
        daemon = psutil.Process(c.daemon_pid())
        daemon.kill()
        killed = time.monotonic()
        daemon.wait(10)
        seen.clear()
        while not seen:
            watch.pump()
            a.up_lines(["ha"], seen)
            b.up_lines(["ha"], seen)
            if time.monotonic() - killed > HA_TIMEOUT:
                raise RuntimeError(f"ha not restarted on hostA or hostB {HA_TIMEOUT:.0f} s after hostC's daemon died")
            time.sleep(POLL_S)
        watch.pump()
    finally:
        watch.close()
    init = next(iter(seen.values()))
    where = placed(a).get("ha")
    running = [h.name for h in (a, b) if "ha" in h.domains()]
    if running != [where]:
        raise RuntimeError(f"ha runs on {running}, the pool says on {where}")
    gone = watch.first("DELETE", lease, after=killed)
    taken = watch.first("PUT", record, after=gone) if gone is not None else None
    if gone is None or taken is None:
        raise RuntimeError(f"the watch saw no expiry of hostC's lease or no take-over of ha: {watch.events}")
    return {"kill to init elsewhere (s)": init - killed, "kill + TTL to init (s)": init - killed - ttl,
            "kill to lease gone (etcd deleted hostC's key) (s)": gone - killed,
            "lease gone to init (s)": init - gone, "lease gone to ha's record taken over (s)": taken - gone,
            "record taken over to init (create and boot) (s)": init - taken}  # fmt: skip


# -- the run -------------------------------------------------------------------------------------
def one_round(rootfs: Path, n: int, ttl: int, samples: dict[str, Samples], failed: dict[str, int]) -> None:
    """A fresh pool: booting against one host (in a fresh order), the network, then HA (which breaks the pool).
    A boot that failed is counted in `failed` (per path) and named with its logs; the round goes on."""

    def boot(kind: str, run: Callable[[], dict[str, float]]) -> bool:
        try:
            add(samples["boot"], kind, run())
            return True
        except BootFailed as e:
            failed[kind] += 1
            print(f"boot failed: {e}", file=sys.stderr)
            return False

    with bench_root() as root, a_pool(root, ttl) as hosts:
        single_first = random.random() < 0.5
        if single_first:
            boot(ONE, lambda: one_host_round(root, n))
        if boot(POOL, lambda: boot_cluster(hosts, n)):
            for kind, figures in network(hosts).items():
                add(samples["net"], kind, figures)
        hosts[0].sv("cluster", "down", CLUSTER, timeout=300)
        if not single_first:
            boot(ONE, lambda: one_host_round(root, n))
        add(samples["ha"], POOL, ha(hosts, rootfs, ttl))


def add(samples: Samples, kind: str, figures: dict[str, float]) -> None:
    for metric, value in figures.items():
        samples[metric][kind].append(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=6, help="domains booted per path [default: 6]")
    ap.add_argument("--ttl", type=int, default=10, help="the members' lease in seconds [default: the pool's, 10]")
    args = ap.parse_args()
    if args.nodes < 4:
        ap.error(f"--nodes {args.nodes}: at least 4 (the network part runs between node1, node2 and node4)")
    if os.geteuid() != 0:
        sys.exit("bench/pool.py needs root: network namespaces, a bridge, VXLAN")
    _, rootfs = busybox_assets()
    samples: dict[str, Samples] = {s: defaultdict(lambda: defaultdict(list)) for s in ("boot", "net", "ha")}
    before, loads = cpu_times(), [os.getloadavg()[0]]
    failed = {POOL: 0, ONE: 0}
    for r in range(args.rounds):
        one_round(rootfs, args.nodes, args.ttl, samples, failed)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load average {loads[-1]:.2f})", file=sys.stderr)
    steal = stolen(before, cpu_times())
    for s in samples.values():
        s["steal"]["%"] = [steal]
    # The machine's other work shares the same CPUs: the 1-minute load average before and after each round.
    print(f"load average (1 min) at the rounds' ends: median {statistics.median(loads):.2f} "
          f"({min(loads):.2f}-{max(loads):.2f})")  # fmt: skip
    rounds = f"{args.rounds} rounds"
    report(f"Place and boot {args.nodes} PV domains, {rounds}", samples["boot"], [POOL, ONE], ONE, lower_is_better=True,
           ratio_label=POOL)  # fmt: skip
    print(f"boots of {args.nodes} where a node did not come up in {BOOT_TIMEOUT:.0f} s: "
          + ", ".join(f"{kind} {k} of {args.rounds}" for kind, k in failed.items()))  # fmt: skip
    report(f"Network between two PV domains of the pool, {rounds}", samples["net"], [CROSS, SAME], SAME,
           lower_is_better=True, ratio_label="across")  # fmt: skip
    report(f"HA restart of a PV domain, lease TTL {args.ttl} s, {rounds}", samples["ha"], [POOL], POOL,
           lower_is_better=True)  # fmt: skip


if __name__ == "__main__":
    main()
