"""Memory sizes: bytes everywhere inside, with their parsing and formatting in this one place.

Users write sizes as xl does ('256' meaning MiB, '256M', '1G', '262144K'); the xenstore keeps
KiB (memory/target, as libxl writes it); the balloon counts 4 KiB pages (virtio 1.2 5.5.6). Code
converts at those edges with the functions here rather than shifting by 10 or 20 in place.
"""

from __future__ import annotations

import re

from slimvisor.runtime.errors import SlimvisorError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PAGE = 4 * KiB  # the balloon's page whatever the guest's (virtio 1.2 5.5.6)

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"k": KiB, "m": MiB, "g": GiB, "t": TiB}


class SizeError(SlimvisorError, ValueError):
    """A size that does not parse, or is not a whole number of the unit it must be."""


def parse_size(text: str, what: str, *, default_unit: int = MiB, multiple_of: int = 1) -> int:
    """Bytes from '256' (in `default_unit`: MiB, as xl), '256M', '1G', '262144K'; a whole number
    of `multiple_of` bytes. Raises SizeError naming `what`."""
    m = _SIZE.match(text)
    if not m:
        raise SizeError(f"{what}: {text!r} is not a size (examples: 256, 256M, 1G)")
    suffix = m.group(2).lower()
    nbytes = int(m.group(1)) * (_UNITS[suffix] if suffix else default_unit)
    if nbytes % multiple_of:
        unit = format_size(multiple_of)
        raise SizeError(f"{what}: {text!r} is not a whole number of {unit.removeprefix('1 ')}")
    return nbytes


def format_size(nbytes: int) -> str:
    """'256 MiB', '1 GiB', '4 KiB', '1000 bytes': the largest unit that divides `nbytes` exactly."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if nbytes and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    return f"{nbytes} bytes"


def mib(nbytes: int) -> int:
    """Whole MiB, rounded down (what the API's and the record's *_mib fields hold)."""
    return nbytes // MiB


def kib(nbytes: int) -> int:
    """Whole KiB, rounded down (xenstore's memory/target and static-max)."""
    return nbytes // KiB


def pages(nbytes: int) -> int:
    """Whole balloon pages, rounded down."""
    return nbytes // PAGE
