"""The device registry: each kind's declarations agree with the model, the xl.cfg parser, the CLI
and the supervisor, so a device added to it is served everywhere (and one left out fails here)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

from slimvisor.cli.main import run
from slimvisor.devices.registry import KINDS, Shape, local_factories, model_modules, options
from slimvisor.domain.supervisor import SUPERVISOR_MODULES
from slimvisor.model.spec import ChannelSpec, DiskSpec, DomainSpec, VsockSpec
from slimvisor.toolstack.xlcfg import KEYS, LIST_SYNTAXES, DomainConfig, parse_xlcfg
from slimvisor.virtio.device import VirtioDevice

DEVICES = Path(__file__).parent.parent / "slimvisor" / "devices"


def test_every_kind_names_its_model_and_virtio_id():
    for k in KINDS:
        model = k.model_class()
        assert issubclass(model, VirtioDevice) and model.device_id == k.virtio_id, k.name
    assert len({k.name for k in KINDS}) == len({k.virtio_id for k in KINDS}) == len(KINDS)


def test_every_device_model_is_registered():
    """A VirtioDevice subclass in slimvisor/devices that the registry does not list is never served."""
    registered = {(k.module, k.model) for k in KINDS}
    for path in DEVICES.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "VirtioDevice" for b in node.bases):
                assert (f"slimvisor.devices.{path.stem}", node.name) in registered, f"{path.name}: {node.name}"


def test_xlcfg_keys_and_cli_options_exist():
    cli_options = {opt for p in run.params for opt in p.opts}
    for k in KINDS:
        assert set(k.xlcfg_keys) <= set(KEYS), k.name
        assert set(k.cli_options) <= cli_options, k.name


def test_options_set_domain_spec_fields_and_read_their_keys(tmp_path):
    """Each option names a DomainSpec field (and DomainConfig's, for an xl.cfg key); each flag key
    turns its field on and each value key parses its spec, read from the registry alone; each list
    key has its xl syntax in xlcfg."""
    spec_fields = {f.name for f in dataclasses.fields(DomainSpec)}
    config_fields = {f.name for f in dataclasses.fields(DomainConfig)}
    for kind, o in options():
        assert o.field in spec_fields, o
        assert o.xlcfg_key is None or o.field in config_fields, o
        assert o.shape is Shape.FLAG or kind.spec is not None, o
        if o.shape is Shape.FLAG and o.xlcfg_key:
            spec = parse_xlcfg(f"name='a'\n{o.xlcfg_key}=1").to_domain_spec()
            assert getattr(spec, o.field) is True, o
    assert {o.xlcfg_key for _, o in options() if o.shape is Shape.LIST and o.xlcfg_key} == set(LIST_SYNTAXES)
    value_keys = [o for _, o in options() if o.shape is Shape.VALUE and o.xlcfg_key]
    assert [o.xlcfg_key for o in value_keys] == ["vsock"]  # the one there is: give the next its sample here
    spec = parse_xlcfg("name='a'\nvsock='cid=7,uds=v.sock'", cwd=str(tmp_path)).to_domain_spec()
    assert spec.vsock == VsockSpec(7, str(tmp_path / "v.sock"))


def test_the_supervisor_preloads_every_model_it_may_build():
    assert set(model_modules()) <= set(SUPERVISOR_MODULES)


def _full_spec(tmp_path: Path) -> DomainSpec:
    for disk in ("a.img", "b.img"):
        (tmp_path / disk).write_bytes(bytes(1 << 20))
    return DomainSpec(
        name="d", kernel="/bin/true", memory_mib=64,
        disks=[DiskSpec(str(tmp_path / "a.img")), DiskSpec(str(tmp_path / "b.img"), readonly=True)],
        vsock=VsockSpec(5, str(tmp_path / "v.sock")), rng=True, balloon_deflate_on_oom=True,
        channels=[ChannelSpec("agent", str(tmp_path / "agent.sock"))],
    )  # fmt: skip


def test_local_factories_build_what_the_spec_asks_in_order(tmp_path):
    made = [(name, virtio_id, make()) for name, virtio_id, make in local_factories(_full_spec(tmp_path))]
    try:
        assert [(n, i) for n, i, _ in made] == [("vda", 2), ("vdb", 2), ("vsock", 19), ("rng", 4), ("balloon", 5),
                                                ("console", 3)]  # fmt: skip
        by_name = {n: d for n, _, d in made}
        assert by_name["vdb"].readonly and by_name["balloon"].deflate_on_oom  # type: ignore[attr-defined]
        assert [p.spec.name for p in by_name["console"].ports] == ["", "agent"]  # type: ignore[attr-defined]
        assert all(d.device_id == i for _, i, d in made)
    finally:
        for _, _, d in made:
            d.close()
    assert local_factories(DomainSpec(name="d", kernel="/bin/true", memory_mib=64)) == []


def test_listing_a_domains_devices_imports_no_model(tmp_path):
    """Only building a device imports its model: commands that serve none do not pay for them."""
    code = (
        "import sys\n"
        "from slimvisor.devices.registry import local_factories\n"
        "from slimvisor.model.spec import DomainSpec\n"
        "assert len(local_factories(DomainSpec(name='d', kernel='/bin/true', memory_mib=64, rng=True,"
        " balloon=True))) == 2\n"
        "print(sorted(m for m in sys.modules if m.startswith('slimvisor.devices.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['slimvisor.devices.registry']"


# What an I/O edge imports; a device model reaches the host only through its Transport.
_IO_MODULES = {"socket", "select", "selectors", "asyncio", "slimvisor.runtime.loop", "slimvisor.runtime.unix",
               "slimvisor.vhostuser", "slimvisor.network"}  # fmt: skip


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_device_models_open_no_sockets_and_run_no_loop():
    """Sockets and loops are the edges' (vsock_unix, console_unix), never a model's."""
    for k in KINDS:
        path = DEVICES / f"{k.module.rsplit('.', 1)[1]}.py"
        bad = {m for m in _imports(path) if any(m == io or m.startswith(io + ".") for io in _IO_MODULES)}
        assert bad == set(), f"{path.name} imports {bad}"
    for path in (DEVICES / "vsock_unix.py", DEVICES / "console_unix.py"):  # the check can fail: edges do
        assert "socket" in _imports(path)
