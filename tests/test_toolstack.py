"""The toolstack as a user drives it: slimvisord, xl-style commands, real UML domains."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.toolstack import Toolstack

pytestmark = pytest.mark.guest


def test_create_list_console_destroy(toolstack: Toolstack, rootfs: Path, domname: str, tmp_path: Path) -> None:
    cfg = toolstack.config(tmp_path / "d.cfg", domname, rootfs)
    created = toolstack.sv("create", str(cfg))
    assert f"Domain {domname} created" in created.stderr
    row = toolstack.domains()[domname]
    assert row["domid"] >= 1 and row["memory_mib"] == 64 and row["vcpus"] == 1
    console = toolstack.console(domname)
    try:
        console.expect(r"slimvisor: \S+ is up", timeout=60)
        assert console.run("echo $((6 * 7))").strip() == "42"
    finally:
        console.kill()
    toolstack.sv("destroy", domname)
    toolstack.wait_state(domname, ("gone",))
    assert toolstack.leftovers([domname]) == []
