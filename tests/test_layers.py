"""The import graph, read from the source with `ast`: layers only ever import downwards.

Every import counts, at the top of a module, inside a function or under TYPE_CHECKING: a lazy
import is still a dependency. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import slimvisor

ROOT = Path(slimvisor.__file__).parent

# Lowest first. A package may import its own layer's packages (without a cycle) and any lower one.
# jail and host are host-process plumbing (namespaces, seccomp, cgroups) used by engines and domain.
LAYERS: list[tuple[str, ...]] = [
    ("runtime",),
    ("jail", "host"),
    ("model",),
    ("memory", "virtio"),
    ("storage",),
    ("devices",),
    ("vhostuser",),
    ("network",),
    ("images",),
    ("engines",),
    ("domain",),
    ("xenstore",),
    ("toolstack",),
    ("cli", "__main__"),
    ("testing",),  # the suite's and the benchmarks' helpers
]
RANK = {pkg: rank for rank, layer in enumerate(LAYERS) for pkg in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(("slimvisor", *(p for p in parts if p != "__init__")))] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> Iterator[str]:
    """The slimvisor modules `path` imports (`from pkg import sub` names the submodule, not pkg)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("slimvisor."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "slimvisor" and not node.module.startswith("slimvisor."):
                continue
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            if subs:
                yield from subs
            if len(subs) < len(node.names):
                yield node.module


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _graph() -> dict[str, set[str]]:
    return {name: {t for t in _imports(path) if t != name} for name, path in MODULES.items()}


def test_every_package_has_a_layer() -> None:
    packages = {_package(m) for m in MODULES} - {""}
    assert packages <= set(RANK), f"packages with no layer: {sorted(packages - set(RANK))}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if target == "slimvisor":  # the root package: __version__ only
                continue
            if RANK[_package(target)] > RANK[_package(module)]:
                upward.append(f"{module} imports {target}")
    assert upward == []


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `edges`, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_package_level_cycle() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_package(module), set()).update(
            _package(t) for t in targets if t != "slimvisor" and _package(t) != _package(module)
        )
    cycle = _cycle(packages)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_level_cycle() -> None:
    graph = {m: {t for t in targets if t != "slimvisor"} for m, targets in _graph().items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
