"""The pool's sans-IO parts: placement, a config as the pool keeps it, the lease deadline, the
membership's checks. The pool itself, with etcd and three hosts, is tests/test_pool.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimvisor.model.spec import SpecError
from slimvisor.runtime import fence
from slimvisor.toolstack import placement
from slimvisor.toolstack.pool import check_endpoints
from slimvisor.toolstack.xlcfg import DomainConfig, parse_xlcfg


@dataclass
class Host:
    name: str
    memory_mib: int = 4096
    free_memory_mib: int = 4096
    engines: list[str] = field(default_factory=lambda: ["pv", "pvh", "hvm"])
    leaving: bool = False


def test_placement_takes_the_most_unreserved_memory() -> None:
    hosts = [Host("a"), Host("b", memory_mib=8192, free_memory_mib=8192), Host("c")]
    assert placement.choose(hosts, {}, 512, "pv").name == "b"
    assert placement.choose(hosts, {"b": 6000}, 512, "pv").name == "a"  # a and c tie: the first name


def test_placement_spreads_equal_hosts_round_robin() -> None:
    hosts = [Host("hostA"), Host("hostB"), Host("hostC")]
    planned: dict[str, int] = {}
    order = []
    for _ in range(6):
        name = placement.choose(hosts, planned, 64, "pv").name
        planned[name] = planned.get(name, 0) + 64
        order.append(name)
    assert order == ["hostA", "hostB", "hostC"] * 2


def test_placement_says_why_no_host_fits() -> None:
    hosts = [Host("a", engines=["pv"]), Host("b", leaving=True), Host("c", free_memory_mib=100), Host("d")]
    with pytest.raises(placement.NoRoom, match=r"a: cannot run hvm.*b: leaving.*c: 100 MiB available.*d: excluded"):
        placement.choose(hosts, {}, 512, "hvm", exclude=("d",))
    with pytest.raises(placement.NoRoom, match="the pool has no members"):
        placement.choose([], {}, 64, "pv")
    with pytest.raises(placement.NoRoom, match="a: 96 MiB unreserved"):
        placement.choose([Host("a", memory_mib=1024)], {"a": 928}, 512, "pv")


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), st.booleans()), min_size=1, max_size=8),
       st.integers(1, 4096))  # fmt: skip
def test_placement_never_picks_a_host_without_room(raw: list[tuple[int, int, bool]], memory: int) -> None:
    hosts = [Host(f"h{i}", memory_mib=m, free_memory_mib=f, leaving=leaving) for i, (m, f, leaving) in enumerate(raw)]
    try:
        chosen = placement.choose(hosts, {}, memory, "pv")
    except placement.NoRoom:
        assert all(h.leaving or h.memory_mib < memory or h.free_memory_mib < memory for h in hosts)
        return
    assert not chosen.leaving and chosen.memory_mib >= memory and chosen.free_memory_mib >= memory
    assert chosen.memory_mib == max(h.memory_mib for h in hosts
                                    if not h.leaving and h.memory_mib >= memory and h.free_memory_mib >= memory)


def test_a_config_travels_through_the_pool_whole(tmp_path: Path) -> None:
    text = """name = "web1"
type = "hvm"
memory = 96
vcpus = 2
kernel = "/srv/vmlinuz"
disk = ["/srv/web1.img,raw,xvda,rw", "/srv/data.img,raw,xvdb,ro"]
vif = ["bridge=lan,mac=00:16:3e:01:02:03,rate=10Mb/s"]
on_crash = "restart"
cpus = "0-1"
cpu_weight = 512
extra = "console=ttyS0"
"""
    cfg = parse_xlcfg(text, "web1.cfg", cwd=str(tmp_path))
    again = DomainConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.nets[0].mac == bytes.fromhex("00163e010203") and again.cpus == {0, 1}


@pytest.mark.parametrize("raw, why", [
    ({"name": "x", "bogus": 1}, "unknown keys"),
    ({"name": "x", "disks": [{"nopath": 1}]}, "unexpected keyword|missing"),
    ({"name": "x", "type": "xen"}, "name, memory or type"),
    ("not a dict", "unknown keys"),
])  # fmt: skip
def test_a_malformed_pool_config_is_refused(raw: object, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        DomainConfig.from_json(raw)


def test_the_lease_deadline_fences_once_passed(tmp_path: Path) -> None:
    path = tmp_path / "pool-lease"
    assert fence.expired(path)  # no lease written: nothing holds
    fence.write(path, time.monotonic() + 60)
    assert not fence.expired(path)
    assert fence.expired(path, now=time.monotonic() + 61)
    path.write_text("{half")
    assert fence.expired(path)


@pytest.mark.parametrize("urls, why", [
    ([], "at least one"),
    (["10.0.0.1:2379"], "not an etcd client URL"),
    (["ftp://h:1"], "not an etcd client URL"),
    (["https://h:2379"], "not an etcd client URL"),  # the store speaks plain http (docs/pool.md)
    (["http://h:99999"], "out of range|Port"),
    (["http://h:2379/v3"], "not an etcd client URL"),
])  # fmt: skip
def test_etcd_urls_are_checked(urls: list[str], why: str) -> None:
    with pytest.raises(SpecError, match=why):
        check_endpoints(urls)
    assert check_endpoints(["http://10.240.1.1:2379", "http://e/"])
