"""xl.cfg text: whatever a user's file says, parsing ends in a DomainConfig or an XlCfgError that
names the file and line; nothing else is raised."""

from __future__ import annotations

import re

from fuzz.bytes import Input
from slimvisor.toolstack.xlcfg import XlCfgError, parse_xlcfg

# Bytes below len(VOCABULARY) stand for these tokens, so inputs reach past the lexer.
VOCABULARY = [
    "name", "memory", "maxmem", "vcpus", "kernel", "ramdisk", "extra", "root", "disk", "vif", "on_poweroff",
    "on_reboot", "on_crash", "vsock", "channel", "cpus", "cpu_weight", "cap", "type", "builder", "=", "+=", "[",
    "]", ",", "\n", "#", " ", '"', "'", "\\", "0", "1", "512", "-1", "0x10", '"d1"', '"/tmp/x.img,raw,xvda,rw"',
    '"mac=00:16:3e:00:00:01,bridge=br0"', '"destroy"', '"pv"', "'a'", "1e3", "\t", "\r\n", ";",
]  # fmt: skip
_WHERE = re.compile(r"fuzz\.cfg:\d+")


def text_of(data: bytes) -> str:
    inp, out = Input(data), []
    while inp.more:
        b = inp.num()
        out.append(VOCABULARY[b] if b < len(VOCABULARY) else chr(b))
    return "".join(out)


def target(data: bytes) -> None:
    try:
        parse_xlcfg(text_of(data), "fuzz.cfg", cwd="/")
    except XlCfgError as e:
        assert _WHERE.search(str(e)) or "fuzz.cfg" in str(e), f"an error that names no place: {e}"
