"""One error hierarchy: every exception class slimvisor defines derives from SlimvisorError."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import slimvisor
from slimvisor.runtime.errors import SlimvisorError

ROOT = Path(slimvisor.__file__).parent


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) for every class named *Error or *Exception in the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        module = ".".join(("slimvisor", *(p for p in parts if p != "__init__")))
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                out.append((module, node.name))
    return out


def test_every_error_is_a_slimvisor_error() -> None:
    found = _error_classes()
    assert len(found) >= 10
    strays = [f"{m}.{c}" for m, c in found if not issubclass(getattr(importlib.import_module(m), c), SlimvisorError)]
    assert strays == []
