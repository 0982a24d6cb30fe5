"""Reading a device's saved state back: plain data from elsewhere, hence untrusted.

A device's `save()` gives a dict of ints, bools, strings and lists (JSON as it is); `restore()`
takes one that may come from another host, another build or an attacker, so every field is
looked up with a type and a range here (as rust-vmm's `QueueState` is validated before use), and
anything unexpected raises `StateError` naming the field. Bytes travel as base64 strings.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar

from slimvisor.runtime.errors import SlimvisorError

T = TypeVar("T")


class StateError(SlimvisorError, ValueError):
    """Saved device state that is malformed, out of range or for another device."""


def fields(state: object, what: str, known: tuple[str, ...]) -> dict[str, Any]:
    """`state` as a dict holding exactly the keys `known`."""
    if not isinstance(state, dict):
        raise StateError(f"{what}: saved state is a {type(state).__name__}, not a dict")
    missing = [k for k in known if k not in state]
    extra = sorted(str(k) for k in state if k not in known)
    if missing or extra:
        raise StateError(f"{what}: saved state lacks {missing} / has unknown {extra}")
    return state


def integer(state: dict[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    """An int (not a bool) in [lo, hi]."""
    value = state[key]
    if type(value) is not int or not lo <= value <= hi:
        raise StateError(f"{what}: {key} = {value!r} is not an integer from {lo} to {hi}")
    return value


def flag(state: dict[str, Any], key: str, what: str) -> bool:
    value = state[key]
    if type(value) is not bool:
        raise StateError(f"{what}: {key} = {value!r} is not true or false")
    return value


def blob(value: object, key: str, what: str, max_len: int) -> bytes:
    """Bytes saved as a base64 string, at most `max_len` of them."""
    if not isinstance(value, str) or len(value) > (max_len + 2) // 3 * 4:
        raise StateError(f"{what}: {key} is not base64 of at most {max_len} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise StateError(f"{what}: {key} is not base64: {e}") from None
    if len(data) > max_len:
        raise StateError(f"{what}: {key} holds {len(data)} bytes, more than {max_len}")
    return data


def to_blob(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode()


def same(state: dict[str, Any], key: str, what: str, expected: T) -> T:
    """A field that must match the device restored into (its configuration, not its state)."""
    if state[key] != expected:
        raise StateError(f"{what}: saved {key} {state[key]!r} does not match this device's {expected!r}")
    return expected
