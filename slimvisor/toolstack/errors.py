"""One table from slimvisor's typed errors to the API's error codes and the CLI's exit statuses.

The daemon answers a request that raised one of these with its code (docs/api.md, "Errors"); the
CLI exits with the status of the code the daemon sent, or of the error it raised itself. Statuses
follow xl, which exits 1 on any failure, except where a script needs to tell cases apart.
"""

from __future__ import annotations

from slimvisor.engines.base import EngineError, Unsupported
from slimvisor.model.spec import SpecError
from slimvisor.model.units import SizeError
from slimvisor.runtime.errors import SlimvisorError
from slimvisor.toolstack import api
from slimvisor.virtio.state import StateError

EXIT_FAILED = 1  # refused or failed, as xl: the one-line message says what and where
EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE: this daemon lacks the operation or the API version

# Most specific first: the first class an error is an instance of gives its code.
ERROR_CODES: tuple[tuple[type[SlimvisorError], str], ...] = (
    (SpecError, api.E_CONFIG),  # bad user input: an xl.cfg, an option, a size (XlCfgError is one)
    (SizeError, api.E_CONFIG),
    (StateError, api.E_BAD_REQUEST),  # saved device state that does not check out
    (Unsupported, api.E_NOT_SUPPORTED),  # the domain's engine does not offer it
    (EngineError, api.E_FAILED),
    (SlimvisorError, api.E_FAILED),  # any other failure slimvisor names (a jail, a cgroup, a lock, ...)
)

EXIT_STATUS: dict[str, int] = {
    api.E_BAD_REQUEST: EXIT_FAILED,
    api.E_CONFIG: EXIT_FAILED,
    api.E_NO_DOMAIN: EXIT_FAILED,
    api.E_EXISTS: EXIT_FAILED,
    api.E_FAILED: EXIT_FAILED,
    api.E_NOT_SUPPORTED: EXIT_UNAVAILABLE,
    api.E_VERSION: EXIT_UNAVAILABLE,
}


def api_code(error: SlimvisorError) -> str:
    """The API error code a daemon answers `error` with."""
    if isinstance(error, api.ApiError):
        return error.code
    return next(code for cls, code in ERROR_CODES if isinstance(error, cls))


def exit_status(error: SlimvisorError) -> int:
    """The CLI's exit status for `error` (an ApiError by the code the daemon sent)."""
    return EXIT_STATUS.get(api_code(error), EXIT_FAILED)
