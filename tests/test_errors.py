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


def test_every_error_has_an_api_code_and_an_exit_status() -> None:
    """One table (toolstack/errors.py) gives every SlimvisorError its API code and CLI exit status."""
    from slimvisor.toolstack import api
    from slimvisor.toolstack.errors import EXIT_STATUS, api_code, exit_status

    codes = {v for k, v in vars(api).items() if k.startswith("E_")}
    assert set(EXIT_STATUS) == codes  # every code the API documents has a status
    for module, name in _error_classes():
        cls = getattr(importlib.import_module(module), name)
        error = cls.__new__(cls)  # the class's place in the table, whatever its constructor takes
        if isinstance(error, api.ApiError):
            error.code = api.E_NO_DOMAIN
        assert api_code(error) in codes, f"{module}.{name}"
        assert exit_status(error) in (1, 69), f"{module}.{name}"


def test_typed_errors_map_to_their_codes() -> None:
    from slimvisor.engines.base import EngineError, Unsupported
    from slimvisor.model.spec import SpecError
    from slimvisor.runtime.control import ControlError
    from slimvisor.toolstack.api import ApiError
    from slimvisor.toolstack.errors import api_code, exit_status
    from slimvisor.toolstack.xlcfg import XlCfgError
    from slimvisor.virtio.state import StateError

    cases = [
        (SpecError("memory: '12Q' is not a size"), "config", 1),
        (XlCfgError(["d.cfg:3: memory: bad"]), "config", 1),
        (StateError("virtqueue: size = 3"), "bad-request", 1),
        (Unsupported("User-Mode Linux domains cannot be saved"), "not-supported", 69),
        (EngineError("mconsole stop: timed out"), "failed", 1),
        (ControlError("supervisor did not answer"), "failed", 1),
        (ApiError("no-such-domain", "no domain 'x'"), "no-such-domain", 1),
        (ApiError("version", "API version 9 is not supported"), "version", 69),
    ]
    for error, code, status in cases:
        assert (api_code(error), exit_status(error)) == (code, status), repr(error)
