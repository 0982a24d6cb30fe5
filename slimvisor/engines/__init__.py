"""Engines: how a domain's CPU and memory are provided (UML for PV domains).

`base` is the interface the domain layer uses; each engine implements it in a module of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimvisor.engines.base import Engine, EngineError, EngineEvent, Identity, Instance, Unsupported

if TYPE_CHECKING:
    from slimvisor.model.spec import DomainSpec

__all__ = ["Engine", "EngineError", "EngineEvent", "Identity", "Instance", "Unsupported", "engine_for"]


def engine_for(spec: DomainSpec) -> Engine:
    """The engine that runs `spec`: User-Mode Linux, the one PV engine."""
    from slimvisor.engines.uml import UML

    return UML
