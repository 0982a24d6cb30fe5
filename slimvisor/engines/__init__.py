"""Engines: how a domain's CPU and memory are provided (UML for PV domains).

`base` is the interface the domain layer uses; each engine implements it in a module of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimvisor.engines.base import Engine
    from slimvisor.model.spec import DomainSpec


def engine_for(spec: DomainSpec) -> Engine:
    """The engine that runs `spec`: User-Mode Linux, the one PV engine."""
    from slimvisor.engines.uml import UML

    return UML
