"""Devices' and virtqueues' saved state: round trips, and hostile state refused with a clear error.

Saved state is what migration will carry between hosts: it arrives as untrusted plain data, so
`restore` must refuse anything malformed with a `StateError` naming the field, before it changes
the device at all.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimvisor.devices.balloon import BalloonDevice
from slimvisor.devices.blk import BlockDevice
from slimvisor.devices.console import ConsoleDevice, PortSpec
from slimvisor.devices.net import NetDevice
from slimvisor.devices.rng import RngDevice
from slimvisor.devices.vsock_unix import unix_vsock
from slimvisor.virtio.queue import SplitQueue, VirtqueueError
from slimvisor.virtio.spec import VIRTQ_DESC_F_WRITE
from slimvisor.virtio.state import StateError, to_blob
from tests.vring import Driver, GuardedMemory

R0 = 0x0
SPECS = [(R0, 0x10000), (0x10000, 0x10000)]
DATA = 0x2000


def over_the_wire(state: dict) -> dict:
    """As migration would carry it: JSON, so only plain data survives."""
    return json.loads(json.dumps(state))


# -- the virtqueue ------------------------------------------------------------------------------
def test_queue_round_trip_continues_where_it_stopped():
    g = GuardedMemory(SPECS)
    drv = Driver(g.mem, 8, R0, start_idx=65534)
    q = drv.queue(last_avail_idx=65534, event_idx=True)
    first = drv.add([(DATA, 16, VIRTQ_DESC_F_WRITE)])
    second = drv.add([(DATA + 0x100, 16, VIRTQ_DESC_F_WRITE)])
    chain = q.pop()
    assert chain is not None and chain.head == first
    q.push(chain.head, 3)
    state = over_the_wire(q.save())
    assert state["last_avail_idx"] == 65535 and state["used_idx"] == 65535

    again = SplitQueue.restore(g.mem, state)
    assert again.save() == state
    chain = again.pop()  # the one the old queue had not taken, across the index wrap
    assert chain is not None and chain.head == second
    again.push(chain.head, 5)
    assert drv.used() == [(first, 3), (second, 5)]
    assert again.pop() is None


def _queue_state() -> tuple[GuardedMemory, dict]:
    g = GuardedMemory(SPECS)
    return g, Driver(g.mem, 8, R0).queue().save()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"size": 6}, "not a power of 2"),
        ({"size": 0}, "size = 0 is not an integer from 1"),
        ({"size": "8"}, "size = '8' is not an integer"),
        ({"size": True}, "size = True is not an integer"),
        ({"desc_addr": 0x7FFF0000}, "outside shared memory"),
        ({"desc_addr": -16}, "desc_addr = -16 is not an integer"),
        ({"avail_addr": 0x101}, "misaligned"),
        ({"used_addr": 1 << 64}, "used_addr = .* is not an integer"),
        ({"last_avail_idx": 0x10000}, "last_avail_idx = 65536"),
        ({"last_avail_idx": 100, "used_idx": 0}, "more than 8 behind"),
        ({"event_idx": 1}, "event_idx = 1 is not true or false"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_hostile_queue_state_is_refused(change, match):
    g, state = _queue_state()
    with pytest.raises(StateError, match=match):
        SplitQueue.restore(g.mem, {**state, **change})


def test_queue_state_missing_a_field_or_not_a_dict_is_refused():
    g, state = _queue_state()
    del state["used_idx"]
    with pytest.raises(StateError, match=r"lacks \['used_idx'\]"):
        SplitQueue.restore(g.mem, state)
    with pytest.raises(StateError, match="saved state is a list, not a dict"):
        SplitQueue.restore(g.mem, [8, 0, 0, 0])


_ANY = st.one_of(
    st.integers(-(1 << 65), 1 << 65), st.booleans(), st.none(), st.text(max_size=4), st.lists(st.integers())
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SplitQueue.STATE_FIELDS), _ANY))
def test_random_queue_state_gives_a_queue_or_a_state_error(change):
    g, state = _queue_state()
    try:
        q = SplitQueue.restore(g.mem, {**state, **change})
    except StateError:
        return
    with contextlib.suppress(VirtqueueError):  # a ring that disagrees with it: the device's error state
        q.pop()  # whatever was accepted is a queue inside guest memory: using it cannot escape
    assert g.guards_intact()


# -- devices ------------------------------------------------------------------------------------
def _console() -> ConsoleDevice:
    return ConsoleDevice([PortSpec(console=True), PortSpec(name="agent")])


def _devices(tmp_path) -> dict[str, object]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    return {
        "rng": lambda: RngDevice(),
        "balloon": lambda: BalloonDevice(deflate_on_oom=True),
        "console": _console,
        "net": lambda: NetDevice(bytes.fromhex("525400123456")),
        "blk": lambda: BlockDevice(str(image), readonly=True),  # readers share an image
        "vsock": lambda: unix_vsock(7, str(tmp_path / f"v{len(list(tmp_path.iterdir()))}.sock")),
    }


def _busy(dev) -> None:
    """Give a device state worth saving."""
    dev.ack_features(dev.features())
    if isinstance(dev, RngDevice):
        dev.bytes_served = 12345
    elif isinstance(dev, BalloonDevice):
        dev.set_target(1000)
        dev.write_config(4, (600).to_bytes(4, "little"))
        dev.inflated, dev._stats_head = 600, 3
    elif isinstance(dev, ConsoleDevice):
        dev.port_write(1, b"for the agent")
        dev.ports[1].ready = dev.ports[1].guest_open = True
        dev.ports[0].host_open = False
        dev.set_host_open(1, False)  # a control message waiting for the guest
    elif isinstance(dev, NetDevice):
        dev.link_up = False


@pytest.mark.parametrize("kind", ["rng", "balloon", "console", "net", "blk", "vsock"])
def test_device_round_trip(tmp_path, kind):
    make = _devices(tmp_path)[kind]
    dev = make()
    _busy(dev)
    state = over_the_wire(dev.save())
    fresh = make()
    fresh.restore(state)
    assert fresh.save() == state
    assert fresh.acked_features == dev.acked_features
    assert fresh.config() == dev.config()
    dev.close()
    fresh.close()


def test_restored_console_delivers_what_was_waiting(tmp_path):
    dev = _console()
    _busy(dev)
    fresh = _console()
    opened = []
    fresh.on_open = lambda port, is_open: opened.append((port, is_open))
    fresh.restore(over_the_wire(dev.save()))
    assert bytes(fresh.ports[1].backlog) == b"for the agent"
    assert fresh.ports[1].guest_open and opened == [(1, True)]
    assert list(fresh._control) == list(dev._control) != []


# (device kind, a change to its saved state, the error expected)
_BIG = to_blob(bytes((1 << 20) + 1))
HOSTILE = [
    ("rng", {"device_id": 5}, "saved device_id 5 does not match this device's 4"),
    ("rng", {"acked_features": 1 << 40}, "bits this device does not offer"),
    ("rng", {"bytes_served": -1}, "bytes_served = -1"),
    ("balloon", {"target_pages": 1 << 32}, "target_pages = 4294967296"),
    ("balloon", {"stats_head": 40000}, "stats_head = 40000"),
    ("balloon", {"deflate_on_oom": False}, "saved deflate_on_oom False does not match"),
    ("console", {"ports": []}, "not a list of this device's 2 ports"),
    ("console", {"ports": "x"}, "not a list of this device's 2 ports"),
    ("console", {"control": [to_blob(b"ab")]}, "shorter than a control message"),
    ("console", {"control": ["not base64!"]}, "control.0. is not base64"),
    ("console", {"control": [to_blob(bytes(8))] * 1025}, "at most 1024 messages"),
    ("console", {"ports@1": {"backlog": _BIG}}, "backlog holds 1048577 bytes, more than 1048576"),
    ("console", {"ports@1": {"name": "other"}}, "saved name 'other' does not match this device's 'agent'"),
    ("console", {"ports@0": {"ready": "yes"}}, "ready = 'yes' is not true or false"),
    ("console", {"ports@0": {"evil": 1}}, r"console port 0: .* unknown \['evil'\]"),
    ("net", {"mac": "525400ffffff"}, "saved mac"),
    ("net", {"link_up": 0}, "link_up = 0 is not true or false"),
    ("blk", {"capacity": 1 << 40}, "saved capacity"),
    ("blk", {"readonly": False}, "saved readonly False"),
    ("vsock", {"guest_cid": 8}, "saved guest_cid 8 does not match this device's 7"),
]


@pytest.mark.parametrize(("kind", "change", "match"), HOSTILE)
def test_hostile_device_state_is_refused_and_changes_nothing(tmp_path, kind, change, match):
    make = _devices(tmp_path)[kind]
    dev = make()
    _busy(dev)
    state = copy.deepcopy(dev.save())
    for key, value in change.items():
        if "@" in key:  # a field of one port
            name, _, index = key.partition("@")
            state[name][int(index)].update(value)
        else:
            state[key] = value
    victim = make()
    before = victim.save()
    with pytest.raises(StateError, match=match):
        victim.restore(state)
    assert victim.save() == before  # checked whole before anything was applied
    dev.close()
    victim.close()

