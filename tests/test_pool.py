"""A pool of three hosts, as a user runs it: etcd for the pool's state, VXLAN for its switches.

Each "host" is a network namespace with its own slimvisord (own run, state and log trees) and an
etcd member of the pool's three-member cluster, on one underlay (tests/poolhosts.py). Disks and
images are shared storage (one file system). Leases live 5 s here, so a lost host's domains are
restarted within seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from slimvisor.testing.etcd import EtcdCluster, EtcdMember
from slimvisor.testing.expect import ConsoleSession
from slimvisor.testing.netns import etcd_members, pool_commands
from tests.poolhosts import NetnsToolstack, pool_hosts
from tests.test_hvm import cloud  # noqa: F401 - a fixture
from tests.test_migrate import CHECK_LINES, console_tail, identity, migratable_config
from tests.test_toolstack import BOOT_TIMEOUT, boot, wait_for

pytestmark = [pytest.mark.guest]

TTL = 5  # seconds: each member's lease, so HA acts within seconds (fencing 1 s before)


class Pool:
    def __init__(self, hosts: list[NetnsToolstack], etcd: EtcdCluster) -> None:
        self.hosts, self.etcd = hosts, etcd
        self.a, self.b, self.c = hosts

    def listing(self, host: NetnsToolstack) -> dict[str, Any]:
        return json.loads(_answered(host, "pool", "list", "--json"))

    def where(self, host: NetnsToolstack) -> dict[str, str]:
        """`slimvisor list --pool` on `host`: each domain's host."""
        return {d["name"]: d["host"] for d in json.loads(_answered(host, "list", "--pool", "--json"))}


def _states(host: NetnsToolstack) -> dict[str, str]:
    return {d["name"]: d["state"] for d in json.loads(_answered(host, "list", "--pool", "--json"))}


def _answered(host: NetnsToolstack, *args: str) -> str:
    """The output of a command that reads the pool, asked again while etcd elects a new leader (after
    a member was killed or cut off, under load that can take a few seconds), as a user would."""
    def attempt() -> str | None:
        done = host.sv(*args, check=False)
        assert done.returncode == 0 or "cannot be reached" in done.stderr, done.stderr
        return done.stdout if done.returncode == 0 else None

    out: str = wait_for(attempt, 30, f"{host.name}: slimvisor {' '.join(args)} to answer")
    return out


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    """Three hosts, each with an etcd member, in one pool made by `pool init` and `pool join`."""
    with pool_hosts(3) as hosts:
        places = [h.place for h in hosts]
        etcd = EtcdCluster(etcd_members(places), tmp_path / "etcd")
        try:
            etcd.wait_healthy(60)
            for host, args in zip(hosts, pool_commands(places, TTL), strict=True):
                host.sv(*args)
            yield Pool(hosts, etcd)
            for host in hosts:  # while etcd still answers: their records go with their domains
                for switch in json.loads(host.sv("switch", "list", "--json").stdout):
                    host.sv("switch", "stop", switch["name"])
                host.close()
        finally:
            etcd.close()


def up(host: NetnsToolstack, name: str, timeout: float = BOOT_TIMEOUT) -> None:
    """Wait until domain `name` (on `host`) has booted, by its console log."""
    log = host.log_dir / f"{name}.console.log"

    def booted() -> bool:
        return log.exists() and bool(re.search(r"slimvisor: \S+ is up", log.read_text(errors="replace")))

    wait_for(booted, timeout, f"{name} to boot on {host.name}")


def test_a_pool_of_three_spreads_a_cluster_whose_nodes_ping_each_other_by_name(
        pool: Pool, rootfs: Path, consoles: list[ConsoleSession]) -> None:  # fmt: skip
    for host in pool.hosts:  # every member sees every member, with its capacity
        listed = pool.listing(host)
        assert [h["name"] for h in listed["hosts"]] == ["hostA", "hostB", "hostC"]
        assert all(h["memory_mib"] > 0 and h["cpus"] >= 1 and "pv" in h["engines"] for h in listed["hosts"])
    out = pool.a.sv("cluster", "up", "6", "--name", "lab", timeout=600).stdout
    assert out.split()[:2] == ["node1", "10.77.0.1"]
    placed = pool.where(pool.b)
    assert placed == {f"node{k}": ["hostA", "hostB", "hostC"][(k - 1) % 3] for k in range(1, 7)}
    assert pool.where(pool.c) == placed  # every member lists the same pool
    for host in pool.hosts:  # each runs its two nodes itself
        assert sorted(host.domains()) == sorted(n for n, h in placed.items() if h == host.name)
    for node, host_name in placed.items():
        host = next(h for h in pool.hosts if h.name == host_name)
        up(host, node)
        console = host.console(node)
        consoles.append(console)
        console.run("true")
        unreachable = console.run(
            "for n in node1 node2 node3 node4 node5 node6; do ping -c 1 -W 5 $n > /dev/null || echo $n; done",
            timeout=120).split()  # fmt: skip
        assert unreachable == [], f"{node} on {host_name} cannot ping {unreachable} by name"
    # Names and uuids are the pool's: node1 runs on hostA, so hostB cannot have one, nor its uuid.
    cfg = pool.b.config(pool.b.root / "n1.cfg", "node1", rootfs)
    taken = pool.b.sv("create", str(cfg), "--host", "hostB", check=False)
    assert taken.returncode != 0 and re.search(r"node1.*(exists|taken).*hostA|hostA.*node1", taken.stderr), taken.stderr
    uuid = pool.a.json("list")[1]["uuid"]
    cfg2 = pool.b.config(pool.b.root / "x.cfg", "other", rootfs, f'uuid = "{uuid}"')
    clash = pool.b.sv("create", str(cfg2), "--host", "hostB", check=False)
    assert clash.returncode != 0 and uuid in clash.stderr, clash.stderr
    assert "other" not in pool.where(pool.a)
    down = pool.a.sv("cluster", "down", "lab", timeout=300)
    assert down.returncode == 0
    assert pool.where(pool.c) == {}
    for host in pool.hosts:
        assert host.domains() == {}


def test_pv_domains_on_two_hosts_stream_over_a_pool_wide_switch(pool: Pool, rootfs: Path, tmp_path: Path) -> None:
    started = pool.a.sv("switch", "start", "lan")
    assert re.search(r"pool-wide \(VXLAN VNI \d+\)", started.stdout)
    root_b = tmp_path / "b.ext4"
    root_b.write_bytes(rootfs.read_bytes())
    cfg_a = pool.a.config(tmp_path / "a.cfg", "pva", rootfs, "vif = ['bridge=lan']", 'extra = "sv.ip=10.63.0.1/24"')
    cfg_b = pool.b.config(tmp_path / "b.cfg", "pvb", root_b, "vif = ['bridge=lan,rate=20Mb/s']",
                          'extra = "sv.ip=10.63.0.2/24"')  # fmt: skip
    a = boot(pool.a, cfg_a, "pva", "--host", "hostA")
    # Created from hostA, placed on hostB: the switch comes up there, joined to hostA's.
    created = pool.a.sv("create", "--host", "hostB", str(cfg_b))
    assert "Domain pvb created" in created.stderr and "on hostB" in created.stderr
    up(pool.b, "pvb")
    b = pool.b.console("pvb")
    try:
        assert pool.where(pool.c) == {"pva": "hostA", "pvb": "hostB"}
        b.send("(sleep 3600 | nc -l -p 5001 | md5sum > /tmp/rx.md5) & echo started")
        b.run("i=0; while ! netstat -ltn | grep -q :5001 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done")
        a.run("dd if=/dev/urandom of=/tmp/tx bs=1M count=8 2>/dev/null")
        sent = a.run("md5sum /tmp/tx").split()[0]
        a.run("nc -w 5 10.63.0.2 5001 < /tmp/tx", timeout=200)
        got = wait_for(lambda: b.run("cat /tmp/rx.md5 2>/dev/null").split()[:1], 60, "the stream's checksum")
        assert got == [sent], "the 8 MiB arrived changed"
        # Anti-spoofing still holds per port across hosts: a frame with a forged source MAC dies at
        # hostA's switch and never reaches hostB.
        a.run("ip link set eth0 address 02:00:00:00:00:99 && ping -c 2 -W 2 10.63.0.2 > /dev/null")
        assert a.last_status != 0, "a forged MAC crossed the pool-wide switch"
        # Every member shows a domain's state as its host knows it.
        pool.b.sv("pause", "pvb")
        wait_for(lambda: _states(pool.c)["pvb"] == "paused", 30, "pvb to be listed paused pool-wide")
        pool.b.sv("unpause", "pvb")
        wait_for(lambda: _states(pool.a)["pvb"] == "running", 30, "pvb to be listed running again")
    finally:
        a.kill()
        b.kill()
    switches = json.loads(pool.b.sv("switch", "list", "--json").stdout)
    assert [s["name"] for s in switches] == ["lan"]


def _kill_daemon(host: NetnsToolstack) -> None:
    """The host's slimvisord dies (SIGKILL): its lease is renewed no more."""
    daemon = psutil.Process(host.daemon_pid())
    daemon.kill()
    daemon.wait(10)


def test_a_lost_host_s_restartable_domains_come_up_elsewhere_once(pool: Pool, rootfs: Path, tmp_path: Path) -> None:
    ha_root, plain_root = tmp_path / "ha.ext4", tmp_path / "plain.ext4"
    ha_root.write_bytes(rootfs.read_bytes())
    plain_root.write_bytes(rootfs.read_bytes())
    ha = pool.c.config(tmp_path / "ha.cfg", "ha", ha_root, 'on_crash = "restart"')
    plain = pool.c.config(tmp_path / "plain.cfg", "plain", plain_root)
    for cfg in (ha, plain):
        pool.c.sv("create", "--host", "hostC", str(cfg))
    up(pool.c, "ha")
    up(pool.c, "plain")
    # hostC is lost: its daemon dies and its etcd member with it; its domains' supervisors live on,
    # as on a host cut off from the pool's network.
    _kill_daemon(pool.c)
    pool.etcd.kill(2)
    # Another member restarts "ha" once its lease has expired; hostC's copy fenced itself first.
    where = wait_for(lambda: (w := pool.where(pool.a)).get("ha") in ("hostA", "hostB") and w, 60,
                     "ha to be restarted on another member")  # fmt: skip
    fenced = pool.c.log_dir / "ha.console.log"
    assert "fenced: this host's pool lease may have expired" in fenced.read_text(errors="replace"), \
        "hostC's copy was not fenced before the pool restarted it elsewhere"
    assert not (pool.c.run_dir / "domains" / "ha").exists(), "hostC's copy still runs"
    assert (pool.c.run_dir / "domains" / "plain").exists(), "hostC's domain without HA stopped"
    new_home = pool.a if where["ha"] == "hostA" else pool.b
    other = pool.b if new_home is pool.a else pool.a
    up(new_home, "ha")
    assert "ha" in new_home.domains() and "ha" not in other.domains(), "ha runs twice in the pool"
    console = new_home.console("ha")
    try:
        console.run("true")
        assert console.last_status == 0
    finally:
        console.kill()
    # "plain" asked for no restart: it is listed as on a lost host, and started nowhere.
    rows = {d["name"]: d for d in json.loads(_answered(pool.b, "list", "--pool", "--json"))}
    assert rows["plain"]["host"] == "hostC" and rows["plain"]["state"] == "host-lost"
    assert "plain" not in pool.a.domains() and "plain" not in pool.b.domains()
    # The pool works on with two etcd members: a new domain is placed on a live member.
    assert [h["name"] for h in pool.listing(pool.a)["hosts"]] == ["hostA", "hostB"]
    late_root = tmp_path / "late.ext4"
    late_root.write_bytes(rootfs.read_bytes())
    late = pool.a.config(tmp_path / "late.cfg", "late", late_root)
    created = pool.a.sv("create", str(late))
    assert re.search(r"Domain late created \(id \d+\) on host[AB]", created.stderr), created.stderr
    assert sorted(d for h in (pool.a, pool.b) for d in h.domains() if d == "ha") == ["ha"]
    late_home = pool.a if "late" in pool.a.domains() else pool.b
    # etcd loses quorum (one member of three left): nothing can be created, nothing is restarted
    # elsewhere; "late" (no restart policy) runs on; "ha" is fenced on its host once its lease
    # cannot be renewed, and started there again when quorum is back and the lease holds.
    pool.etcd.kill(1)
    refused = pool.a.sv("create", str(late), check=False)
    assert refused.returncode != 0 and "cannot be reached" in refused.stderr, refused.stderr
    wait_for(lambda: "ha" not in new_home.domains(), 30, "ha to be fenced without quorum")
    assert late_home.domains()["late"]["state"] in ("running", "blocked")
    pool.etcd.restart(1)
    pool.etcd.wait_healthy(60)
    wait_for(lambda: "ha" in new_home.domains(), 60, "ha to start again on its host once quorum is back")
    up(new_home, "ha")
    assert "ha" not in other.domains()
    assert pool.where(pool.a)["ha"] == new_home.name
    assert late_home.domains()["late"]["state"] in ("running", "blocked")


def test_a_partitioned_host_fences_its_domains_and_never_runs_one_twice(pool: Pool, rootfs: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    ha_root = tmp_path / "ha.ext4"
    ha_root.write_bytes(rootfs.read_bytes())
    ha = pool.c.config(tmp_path / "ha.cfg", "ha", ha_root, 'on_crash = "restart"')
    solo = pool.c.config(tmp_path / "solo.cfg", "solo", rootfs)
    pool.c.sv("create", "--host", "hostC", str(ha))
    pool.c.sv("create", "--host", "hostC", str(solo))
    up(pool.c, "ha")
    up(pool.c, "solo")
    # hostC's link to the others goes down: its daemon and domains run on, its etcd member is in the
    # minority, its lease cannot be renewed. hostC destroys its copy of "ha" before the others can
    # see the lease expire, and one of them starts it.
    pool.c.unplug()
    where = wait_for(lambda: (w := pool.where(pool.a)).get("ha") in ("hostA", "hostB") and w, 60,
                     "ha to be restarted on another member")  # fmt: skip
    assert "ha" not in pool.c.domains(), "ha runs on the cut-off host and elsewhere"
    assert "fenced: this host's pool lease" in (pool.c.log_dir / "ha.console.log").read_text(errors="replace")
    assert pool.c.domains()["solo"]["state"] in ("running", "blocked"), "solo (no restart policy) stopped"
    new_home = pool.a if where["ha"] == "hostA" else pool.b
    up(new_home, "ha")
    # The link comes back: hostC is a member again, learns that "ha" runs elsewhere and leaves it there.
    pool.c.plug()
    wait_for(lambda: [h["name"] for h in pool.listing(pool.a)["hosts"]] == ["hostA", "hostB", "hostC"], 60,
             "hostC to rejoin")  # fmt: skip
    wait_for(lambda: pool.listing(pool.c)["registered"], 30, "hostC to register again")
    assert pool.where(pool.c)["ha"] == where["ha"] and pool.where(pool.c)["solo"] == "hostC"
    assert "ha" not in pool.c.domains()
    assert sum("ha" in h.domains() for h in pool.hosts) == 1


def test_leave_evacuate_moves_an_hvm_domain_and_keeps_its_tcp_stream(
        pool: Pool, rootfs: Path, tmp_path: Path, consoles: list[ConsoleSession],
        cloud: tuple[Path, Path]) -> None:  # noqa: F811  # fmt: skip
    pool.a.sv("switch", "start", "mig")
    cfg = migratable_config(pool.a, tmp_path, "mover", rootfs, cloud, "vif = ['bridge=mig,rate=2Mb/s']",
                            'extra = "sv.ip=10.64.0.1/24"', kind="hvm")  # fmt: skip
    peer_root = tmp_path / "peer.ext4"
    peer_root.write_bytes(rootfs.read_bytes())
    pcfg = pool.c.config(tmp_path / "p.cfg", "peer", peer_root, "vif = ['bridge=mig']", 'extra = "sv.ip=10.64.0.2/24"')
    try:
        m = boot(pool.a, cfg, "mover", "--host", "hostA")
        consoles.append(m)
        p = boot(pool.c, pcfg, "peer", "--host", "hostC")
        consoles.append(p)
        p.send(f"socat -u TCP-LISTEN:5002,reuseaddr STDOUT | awk '{CHECK_LINES}' &")
        p.run("i=0; while ! netstat -ltn | grep -q :5002 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done")
        m.send("(seq 0 999999999 | socat -u STDIN TCP:10.64.0.2:5002; echo stream-exit=$? > /tmp/stream) > /dev/null"
               " 2>&1 &")  # fmt: skip

        def received() -> int:
            return int(p.run("tail -n 1 /tmp/got 2>/dev/null || echo 0").strip() or 0)

        wait_for(lambda: received() >= 10000, 90, "the stream to flow")
        boot_id, uptime = identity(m)
        m.kill()
        consoles.remove(m)
        # `migrate NAME MEMBER`: over the pool link to hostB; the pool's record follows it.
        moved_once = pool.a.sv("migrate", "mover", "hostB", timeout=600)
        assert re.search(r"Domain mover migrated \(now id \d+ on hostB\)", moved_once.stderr), moved_once.stderr
        wait_for(lambda: pool.where(pool.c).get("mover") == "hostB", 30, "the record to follow mover to hostB")
        flowed = received()
        wait_for(lambda: received() >= flowed + 5000, 90, "the stream to flow after the first move")
        # hostB leaves the pool, evacuating: mover goes where placement says (hostA or hostC).
        left = pool.b.sv("pool", "leave", "--evacuate", timeout=600)
        moved = re.search(r"Domain mover migrated to (host[AC])", left.stderr)
        assert moved, left.stderr
        assert "hostB left pool" in left.stderr and "not evacuated" not in left.stderr
        target = pool.a if moved.group(1) == "hostA" else pool.c
        assert "mover" not in pool.b.domains()
        assert pool.where(pool.c) == {"mover": moved.group(1), "peer": "hostC"}
        assert [h["name"] for h in pool.listing(pool.c)["hosts"]] == ["hostA", "hostC"]
        m = target.console("mover")
        consoles.append(m)
        after_id, after_uptime = identity(m)
        assert after_id == boot_id and after_uptime > uptime, "the guest rebooted instead of moving"
        flowed = received()
        wait_for(lambda: received() >= flowed + 10000, 90, "the stream to flow after the move")
        m.run("killall seq")
        wait_for(lambda: m.run("cat /tmp/stream 2>/dev/null").strip(), 60, "the stream to end")
        assert m.run("cat /tmp/stream").strip() == "stream-exit=0", "the TCP stream broke"
        wait_for(lambda: p.run("cat /tmp/end /tmp/bad 2>/dev/null").strip(), 30, "the stream's end at the peer")
        assert p.run("cat /tmp/bad 2>/dev/null").strip() == "", "lines arrived out of order or lost"
    except BaseException:
        print(console_tail(pool.a, "mover"))
        raise


def test_pool_commands_refuse_bad_input_and_leave_nothing(tmp_path: Path) -> None:
    with pool_hosts(2) as (a, b):
        etcd = EtcdCluster([EtcdMember("etcd0", address=a.address, netns=a.netns)], tmp_path / "etcd")
        try:
            etcd.wait_healthy(60)
            for args, why in [
                (("init", "--etcd", "10.240.0.9:2379"), r"'10.240.0.9:2379' is not an etcd client URL"),
                (("init", "--etcd", a.etcd_url, "--name", "host A"), r"--name 'host A': a host name is"),
                (("init", "--etcd", a.etcd_url, "--ttl", "1"), r"--ttl 1: 2\.\.300 seconds"),
                (("init", "--etcd", a.etcd_url, "--address", "fe80::1"), r"--address 'fe80::1': an IPv4 address"),
                (("join", "--etcd", a.etcd_url), r"no pool at http://10\.240\.\d+\.1:2379"),
                (("init", "--etcd", f"http://{b.address}:2379"), r"etcd.*http://10\.240\.\d+\.2:2379"),
                (("list",), r"this host is in no pool"),
                (("leave",), r"this host is in no pool"),
            ]:  # fmt: skip
                failed = a.sv("pool", *args, check=False)
                assert failed.returncode != 0 and re.search(why, failed.stderr), (args, failed.stderr)
                assert not (a.root / "state" / "pool.json").exists(), args
                assert ":8475" not in a.run("ss", "-ltn").stdout, f"{args} left the pool port open"
            a.sv("pool", "init", "--etcd", a.etcd_url, "--name", "hostA", "--ttl", "2")
            for host, args, why in [
                (a, ("init", "--etcd", a.etcd_url, "--name", "hostZ"), r"already hostA in pool pool"),
                (b, ("init", "--etcd", a.etcd_url, "--name", "hostB"), r"pool.*(exists|already)"),
                (b, ("join", "--etcd", a.etcd_url, "--name", "hostA"), r"hostA.*already"),
            ]:  # fmt: skip
                failed = host.sv("pool", *args, check=False)
                assert failed.returncode != 0 and re.search(why, failed.stderr), (args, failed.stderr)
            assert not (b.root / "state" / "pool.json").exists()
            cfg = a.config(tmp_path / "x.cfg", "x", tmp_path / "none.ext4")
            wrong = a.sv("create", str(cfg), "--host", "hostQ", check=False)
            assert wrong.returncode != 0
            assert "--host hostQ: not a live member of pool pool (members: hostA)" in wrong.stderr
            # Its daemon killed and started again, hostA rejoins by itself once its old lease is gone.
            daemon = psutil.Process(a.daemon_pid())
            daemon.kill()
            daemon.wait(10)
            wait_for(lambda: (r := json.loads(a.sv("pool", "list", "--json").stdout))["registered"] and r, 30,
                     "hostA to rejoin")  # fmt: skip
            left = a.sv("pool", "leave")
            assert "hostA left pool pool" in left.stderr
            assert not (a.root / "state" / "pool.json").exists()
            wait_for(lambda: ":8475" not in a.run("ss", "-ltn").stdout, 10, "the pool port to close")
        finally:
            a.close()
            b.close()
            etcd.close()
