"""The PV engine: User-Mode Linux, driven through its mconsole (`engine`, `mconsole`)."""

from slimvisor.engines.uml.engine import (
    MAX_TASKS,
    UML,
    UML_SYSCALLS,
    UmlEngine,
    UmlProcess,
    host_options,
    is_uml_kernel,
    refusal,
    uml_filter,
)

__all__ = [
    "MAX_TASKS", "UML", "UML_SYSCALLS", "UmlEngine", "UmlProcess", "host_options", "is_uml_kernel", "refusal",
    "uml_filter",
]  # fmt: skip
