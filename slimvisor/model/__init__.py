"""The engine-neutral domain model: what a domain is made of, as plain validated data.

Parsed and checked for form only; what the host must provide (files, a kernel the engine can run)
is checked by the domain layer (slimvisor.domain.check) just before anything starts.
"""

from slimvisor.model import units
from slimvisor.model.lifecycle import Action, Event, Policies, RestartLimiter, State
from slimvisor.model.spec import ChannelSpec, DiskSpec, DomainSpec, NetSpec, SpecError, VsockSpec, check_name

__all__ = [
    "Action", "ChannelSpec", "DiskSpec", "DomainSpec", "Event", "NetSpec", "Policies", "RestartLimiter", "SpecError",
    "State", "VsockSpec", "check_name", "units",
]  # fmt: skip
