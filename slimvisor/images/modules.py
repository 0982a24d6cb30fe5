"""Kernel modules for a busybox initramfs: busybox `insmod` resolves no dependencies, so the
initramfs loads each module by hand, after the modules it needs (from depmod's modules.dep).
"""

from __future__ import annotations

import gzip
import lzma
import subprocess
from collections.abc import Iterable
from pathlib import Path


def module_name(path: str | Path) -> str:
    """A module's name as the kernel knows it: no .ko (plain, .xz, .zst or .gz), '-' read as '_'."""
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def module_load_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Module files for `wanted` and all they need, each after its dependencies, from modules.dep."""
    deps: dict[str, list[str]] = {}
    files: dict[str, Path] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, sep, rest = line.partition(":")
        if sep:
            deps[module_name(mod)] = [module_name(d) for d in rest.split()]
            files[module_name(mod)] = moddir / mod
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in deps:
            raise FileNotFoundError(f"kernel module {name} is not in {moddir}/modules.dep")
        for dep in reversed(deps[name]):  # modules.dep lists the farthest dependency last
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(module_name(name))
    return [files[name] for name in order]


def plain_module(path: Path) -> bytes:
    """A module file's ELF contents: busybox insmod does not decompress (.ko.xz, .ko.zst, .ko.gz)."""
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    return gzip.decompress(data) if path.name.endswith(".ko.gz") else data
