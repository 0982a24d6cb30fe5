"""slimvisord and what talks to it: the public API and its client (`api`), the daemon's life and
framing (`daemon`), its operations by topic (`domains`, `scheduling`, `cluster`, `xenstore`, on
`registry`), the error table (`errors`), xl.cfg parsing (`xlcfg`) and the daemon's lock (`daemonctl`)."""

from slimvisor.toolstack.api import ApiError, Client

__all__ = ["ApiError", "Client"]
