"""xl domain configuration files (Xen's xl.cfg(5)), read by a real parser: nothing is evaluated.

The syntax is libxlu's: `KEY=VALUE` or `KEY+=VALUE` statements ended by a newline or `;`, `#`
comments, and values that are "strings" or 'strings' (with C escapes), numbers (decimal, `0x` hex,
`0` octal) or `[ lists ]` that may span lines and end in a comma. A later setting of a key wins,
and `+=` appends to a string or a list, as in xl.

Disks follow xl-disk-configuration(5) and vifs xl-network-configuration(5), within what a PV
domain here is: raw, overlay and qcow2 images and block devices on vhost-user, NICs on dom0
switches, one vCPU. Keys this module does not read get the answer slimvisor.toolstack.xlkeys
gives them (ignored with a warning, or refused). Every problem is collected and they are reported
together, one a line, each starting with the file and line (`node1.cfg:7: unterminated string`)
or the command-line override it came from; `check_host` does the same for what the config needs
of the host (kernel, ramdisk, disks).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from slimvisor.devices.registry import Shape, options
from slimvisor.model.lifecycle import Action
from slimvisor.model.spec import (
    DEFAULT_UML,
    DISK_FORMATS,
    DOMAIN_TYPES,
    NAME,
    DiskSpec,
    DomainSpec,
    NetSpec,
    SpecError,
    VsockSpec,
    parse_mac,
    parse_memory,
)
from slimvisor.runtime.ratelimit import parse_rate
from slimvisor.toolstack.xlkeys import KEYS as TABLE_KEYS
from slimvisor.toolstack.xlkeys import SUPPORTED, Answer

DEFAULT_MEMORY_MIB = 256  # as `slimvisor run`
DEFAULT_BRIDGE = "xenbr0"  # xl's default for a vif without bridge=
MAX_DISKS = 26  # the guest's vda..vdz
MAX_NESTING = 16  # lists in lists: xl allows them, no key here wants them
ACTIONS = (Action.DESTROY, Action.RESTART, Action.RENAME_RESTART, Action.PRESERVE)  # of xl's, those slimvisor has
KEYS = SUPPORTED  # the keys read here; every other xl.cfg(5) key is answered by slimvisor.toolstack.xlkeys
LIST_SYNTAXES = ("disk", "vif")  # device keys with an xl syntax of their own for each entry (_build reads them)

_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_VDEV = re.compile(r"(xvd|hd|sd|vd)([a-z]+)([0-9]*)")
_CPU_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_INTERVAL = re.compile(r"[0-9]+(s|ms|us)?")
_OVERRIDE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\+?=)(.*)", re.DOTALL)


class XlCfgError(SpecError):
    """Everything wrong with one configuration: `problems`, one a line, each naming file and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class DomainConfig:
    """A domain as an xl.cfg (plus overrides) describes it, checked except for files on disk."""

    name: str
    type: str = "pv"
    memory_mib: int = DEFAULT_MEMORY_MIB
    maxmem_mib: int | None = None
    vcpus: int = 1
    kernel: str | None = None  # None: DEFAULT_UML for PV; an HVM domain then boots from its first disk
    ramdisk: str | None = None
    cmdline: str = ""  # cmdline=, or root= and extra= as xl joins them ("root=R EXTRA")
    disks: list[DiskSpec] = field(default_factory=list)  # in vdev order: xvda is the guest's /dev/vda
    nets: list[NetSpec] = field(default_factory=list)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    cpu_weight: int | None = None  # 1..65535
    cap: int | None = None  # percent of one CPU, 0 (no cap) .. 100 * vcpus
    cpus: set[int] | None = None  # host CPUs to pin to; None: no pinning ("all")
    uuid: str | None = None  # lower case
    # The devices' settings, under DomainSpec's names, read from the keys devices.registry declares (_devices).
    vsock: VsockSpec | None = None
    rng: bool = False
    balloon: bool = False
    balloon_deflate_on_oom: bool = False  # slimvisor's, as QEMU's deflate-on-oom (implies balloon)
    bootloader: str | None = None  # "pygrub": kernel, ramdisk and args come from the first disk (domain.pygrub)
    bootloader_args: list[str] = field(default_factory=list)
    # Xen's platform device: with it the guest has its PV path to dom0 (here: the xenstore over vsock).
    # Off, the domain has no vsock, which is what QEMU 7.2 needs to migrate it.
    xen_platform_pci: bool = True
    warnings: list[str] = field(default_factory=list)  # accepted but ignored, or overridden, like xl warns
    # Where each setting came from ("node1.cfg:7"), for errors found after parsing: by key, and "disk.N"
    # for the Nth disk in `disks`. What is not set is the file's.
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def source(self, what: str) -> str:
        """Where `what` ("kernel", "disk.0", ...) was set, or the file (for a default)."""
        return self.sources.get(what) or self.sources.get("", "<config>")

    def to_domain_spec(self) -> DomainSpec:
        """What the runner starts. Scheduling (cpu_weight, cap, cpus), uuid and the on_* actions are
        not part of a DomainSpec: the caller applies them."""
        return DomainSpec(
            name=self.name, kernel=self.kernel or (DEFAULT_UML if self.type == "pv" and not self.bootloader else ""),
            memory_mib=self.memory_mib, initrd=self.ramdisk, cmdline=self.cmdline,
            type=self.type, vcpus=self.vcpus,
            **{o.field: _copy(getattr(self, o.field)) for _, o in options() if o.xlcfg_key},
        )  # fmt: skip


    def to_json(self) -> dict[str, Any]:
        """As a pool keeps it (etcd), so another member can start the domain again (HA restart)."""
        out = dataclasses.asdict(self)
        out["cpus"] = sorted(self.cpus) if self.cpus is not None else None
        for net in out["nets"]:
            net["mac"] = net["mac"].hex() if net["mac"] is not None else None
        del out["warnings"], out["sources"]
        return out

    @classmethod
    def from_json(cls, raw: Any) -> DomainConfig:
        """Read back `to_json`, written by another pool member: SpecError on anything malformed."""
        try:
            fields = {f.name for f in dataclasses.fields(cls)} - {"warnings", "sources"}
            if not isinstance(raw, dict) or set(raw) - fields:
                raise TypeError(f"unknown keys {sorted(set(raw) - fields) if isinstance(raw, dict) else raw!r}")
            cfg = cls(**{
                **raw,
                "disks": [DiskSpec(**d) for d in raw.get("disks", [])],
                "nets": [NetSpec(**{**n, "mac": bytes.fromhex(n["mac"]) if n.get("mac") else None})
                         for n in raw.get("nets", [])],
                "vsock": VsockSpec(**raw["vsock"]) if raw.get("vsock") else None,
                "cpus": set(raw["cpus"]) if raw.get("cpus") is not None else None,
            })  # fmt: skip
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise SpecError(f"a domain's config as the pool keeps it: {e}") from None
        if not isinstance(cfg.name, str) or not isinstance(cfg.memory_mib, int) or cfg.type not in ("pv", "pvh", "hvm"):
            raise SpecError("a domain's config as the pool keeps it: name, memory or type malformed")
        return cfg


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value  # the spec's lists are its own


def parse_xlcfg(text: str, filename: str = "<config>", overrides: Sequence[str] = (),
                cwd: str | None = None) -> DomainConfig:  # fmt: skip
    """Parse an xl.cfg from `text`, then apply `overrides` as `xl create CFG KEY=VALUE...` does.

    An override is one `KEY=VALUE` (or `KEY+=VALUE`) in xl.cfg syntax, except that a bare word is a
    string: `memory=512` is a number, `name=node2` the string "node2". Relative paths (kernel,
    ramdisk, disks, vsock uds) are taken against `cwd`: the directory the client ran in, as with xl,
    never the daemon's own [default: ours]. Raises XlCfgError.
    """
    problems = _Problems()
    settings: dict[str, _Setting] = {}
    warnings: list[str] = []
    _store(_Parser(_lex(text), lambda line: _Loc(0, line, f"{filename}:{line}"), problems), settings, problems,
           warnings)  # fmt: skip
    for i, arg in enumerate(overrides, 1):
        _apply_override(arg, i, settings, problems)
    config = _build(settings, problems, warnings, filename, os.path.abspath(cwd or os.getcwd()))
    if problems.items:
        raise XlCfgError(problems.lines())
    return config


# ---------------------------------------------------------------------------------------------
# Where things are, and what is wrong with them


@dataclass(frozen=True, order=True)
class _Loc:
    source: int  # 0: the file; N: the Nth override; after all: the file as a whole
    line: int
    label: str = field(compare=False)

    def __str__(self) -> str:
        return self.label


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[_Loc, str]] = []

    def add(self, loc: _Loc, message: str) -> None:
        self.items.append((loc, message))

    def lines(self) -> list[str]:
        return [f"{loc}: {msg}" for loc, msg in sorted(self.items, key=lambda item: item[0])]


class _Bad(Exception):
    """One problem with one value; `loc` when it is not the whole setting's."""

    def __init__(self, message: str, loc: _Loc | None = None) -> None:
        super().__init__(message)
        self.loc = loc


# ---------------------------------------------------------------------------------------------
# Lexer


@dataclass(frozen=True)
class _Tok:
    kind: str  # ident number string = += [ ] , ; nl eof error
    text: str  # as written
    line: int
    value: str = ""  # a string's contents; an error's message


_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\f\v]+)
      | (?P<comment>\#[^\n]*)
      | (?P<nl>\n)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<number>[0-9][A-Za-z0-9_.]*)
      | (?P<string>"(?:[^"\\\n]|\\[^\n])*"|'(?:[^'\\\n]|\\[^\n])*')
      | (?P<open>["'][^\n]*)
      | (?P<op>\+=|[=\[\],;])
      | (?P<other>[^ \t\r\f\v\n,;\[\]=]+|.)""",
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[0-7]{1,3}|.)", re.DOTALL)
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
            "v": "\v"}  # fmt: skip


def _xl_int(text: str) -> int | None:
    """A number as xl reads it (strtol base 0): 0x hex, 0 octal, else decimal; None if it is not one."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]{1,64}", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]{0,64}", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]{0,64}", text):
        return int(text)
    return None


def _dequote(lexeme: str) -> str:
    def escape(m: re.Match[str]) -> str:
        e = m.group(1)
        if e in _ESCAPES:
            return _ESCAPES[e]
        if e[0] == "x" and len(e) == 3:
            return chr(int(e[1:], 16))
        if e[0] in "01234567":
            return chr(int(e, 8))
        raise _Bad(f"unknown escape '\\{e}' in a string (known: \\\" \\' \\\\ \\n \\t \\xHH ...)")

    return _ESCAPE.sub(escape, lexeme[1:-1])


def _lex(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    line, pos = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m is not None and m.lastgroup is not None  # `other` takes any one character
        kind, lexeme, pos = m.lastgroup, m.group(), m.end()
        if kind in ("space", "comment"):
            continue
        if kind == "nl":
            toks.append(_Tok("nl", lexeme, line))
            line += 1
        elif kind == "ident":
            toks.append(_Tok("ident", lexeme, line))
        elif kind == "number":
            if _xl_int(lexeme) is None:
                toks.append(_Tok("error", lexeme, line, f"{lexeme!r} is not a number (xl numbers are whole: "
                                                        "decimal, 0x hex or 0 octal)"))  # fmt: skip
            else:
                toks.append(_Tok("number", lexeme, line))
        elif kind == "string":
            try:
                toks.append(_Tok("string", lexeme, line, _dequote(lexeme)))
            except _Bad as e:
                toks.append(_Tok("error", lexeme, line, str(e)))
        elif kind == "open":
            toks.append(_Tok("error", lexeme, line, "unterminated string"))
        elif kind == "op":
            toks.append(_Tok(lexeme, lexeme, line))
        else:
            hint = " (xl.cfg is not Python: values are strings, numbers and [lists])" if lexeme[0] in "+-.():{}" else ""
            toks.append(_Tok("error", lexeme, line, f"unexpected {lexeme!r}{hint}"))
    toks.append(_Tok("eof", "", line))
    return toks


# ---------------------------------------------------------------------------------------------
# Parser


@dataclass(frozen=True)
class _Atom:
    text: str  # a string's contents, or a number as written
    loc: _Loc
    number: int | None = None  # when written as a number


@dataclass(frozen=True)
class _List:
    items: tuple[_Value, ...]
    loc: _Loc


_Value = _Atom | _List


class _Syntax(Exception):
    def __init__(self, tok: _Tok, message: str) -> None:
        super().__init__(message)
        self.tok = tok


def _describe(tok: _Tok) -> str:
    return {"nl": "the end of the line", "eof": "the end of the file"}.get(tok.kind, repr(tok.text))


class _Parser:
    """file: { [KEY ('='|'+=') value] (NEWLINE | ';') };  value: atom | '[' [value {',' value} [',']] ']'"""

    def __init__(self, toks: list[_Tok], loc: Callable[[int], _Loc], problems: _Problems) -> None:
        self.toks, self.loc, self.problems = toks, loc, problems
        self.pos = 0
        self.broken: set[_Loc] = set()  # lines with a syntax error

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.pos + ahead, len(self.toks) - 1)]

    def take(self) -> _Tok:
        tok = self.peek()
        self.pos = min(self.pos + 1, len(self.toks) - 1)
        return tok

    def statements(self) -> Iterator[tuple[str, str, _Value, _Loc]]:
        """(key, '=' or '+=', value, where); syntax errors go to `problems`, and parsing goes on."""
        while self.peek().kind != "eof":
            if self.peek().kind in ("nl", ";"):
                self.take()
                continue
            start = self.pos
            try:
                yield self.statement()
            except _Syntax as e:
                self.report(e.tok, str(e))
                self.recover(start)

    def statement(self) -> tuple[str, str, _Value, _Loc]:
        key = self.take()
        if key.kind == "error":
            raise _Syntax(key, key.value)
        if key.kind != "ident":
            raise _Syntax(key, f"expected a key (like memory=...), found {_describe(key)}")
        op = self.take()
        if op.kind == "error":
            raise _Syntax(op, op.value)
        if op.kind not in ("=", "+="):
            raise _Syntax(op, f"expected '=' after {key.text}, found {_describe(op)}")
        value = self.value(key.text)
        end = self.peek()
        if end.kind not in ("nl", ";", "eof"):
            raise _Syntax(end, f"expected a new line or ';' after the value of {key.text}, found {_describe(end)}")
        return key.text, op.kind, value, self.loc(key.line)

    def value(self, key: str, depth: int = 0) -> _Value:
        tok = self.take()
        if tok.kind == "string":
            return _Atom(tok.value, self.loc(tok.line))
        if tok.kind == "number":
            return _Atom(tok.text, self.loc(tok.line), _xl_int(tok.text))
        if tok.kind == "[":
            if depth >= MAX_NESTING:
                raise _Syntax(tok, f"lists nested more than {MAX_NESTING} deep")
            return self.list_rest(key, tok, depth + 1)
        if tok.kind == "error":
            raise _Syntax(tok, tok.value)
        if tok.kind == "ident":
            raise _Syntax(tok, f'{tok.text!r} is not a value: put strings in quotes ("{tok.text}")')
        if tok.kind in ("nl", ";", "eof"):
            raise _Syntax(tok, f"no value after {key}=")
        raise _Syntax(tok, f"expected a value for {key}, found {_describe(tok)}")

    def list_rest(self, key: str, opening: _Tok, depth: int) -> _List:
        items: list[_Value] = []
        while True:
            self.skip_newlines()
            if self.peek().kind == "]":
                self.take()
                return _List(tuple(items), self.loc(opening.line))
            self.check_open(key, opening)
            items.append(self.value(key, depth))
            self.skip_newlines()
            sep = self.peek()
            if sep.kind == ",":
                self.take()
            elif sep.kind != "]":
                self.check_open(key, opening)
                raise _Syntax(sep, f"expected ',' or ']' in the list of {key}, found {_describe(sep)}")

    def check_open(self, key: str, opening: _Tok) -> None:
        """The end of the file or a new `KEY =` where a list item should be: the list was never closed."""
        if self.peek().kind == "eof" or self.at_statement():
            raise _Syntax(opening, f"the list of {key} opened here is not closed with ']'")

    def at_statement(self) -> bool:
        return self.peek().kind == "ident" and self.peek(1).kind in ("=", "+=")

    def skip_newlines(self) -> None:
        while self.peek().kind == "nl":
            self.take()

    def report(self, tok: _Tok, message: str) -> None:
        loc = self.loc(tok.line)
        if loc not in self.broken:  # one syntax error a line: the first explains the rest
            self.broken.add(loc)
            self.problems.add(loc, message)

    def recover(self, start: int) -> None:
        """Skip to the end of the broken statement: a new line or ';' outside its brackets, or a
        line that starts a new `KEY =` (a list left open must not swallow the rest of the file)."""
        self.pos, depth = start, 0
        while (tok := self.peek()).kind != "eof":
            self.take()
            if tok.kind == "error":
                self.report(tok, tok.value)
            depth += {"[": 1, "]": -1}.get(tok.kind, 0)
            if tok.kind in ("nl", ";") and depth <= 0:
                return
            if tok.kind == "nl" and self.at_statement():
                return


# ---------------------------------------------------------------------------------------------
# Settings: the last one of a key wins; += appends


@dataclass(frozen=True)
class _Setting:
    value: _Value
    loc: _Loc
    added: bool = False  # made with +=: a string or a list, never a number


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, list(TABLE_KEYS), n=1, cutoff=0.7)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _answer_others(settings: dict[str, _Setting], problems: _Problems, warnings: list[str]) -> None:
    """The keys set that are not read here: one warning for each ignored one, a problem for each refused one."""
    for key, s in settings.items():
        row = TABLE_KEYS[key]
        if row.answer == Answer.SUPPORTED:
            continue
        value = s.value.text if isinstance(s.value, _Atom) else "" if not s.value.items else None
        if row.answer == Answer.IGNORED or value in row.harmless:
            warnings.append(f"{s.loc}: {key} is ignored: {row.why}")
        else:
            problems.add(s.loc, f"{key} is not supported by slimvisor: {row.why}")


def _store(parser: _Parser, settings: dict[str, _Setting], problems: _Problems, warnings: list[str] | None) -> None:
    for key, op, value, loc in parser.statements():
        if key not in TABLE_KEYS:
            problems.add(loc, _unknown_key(key))
            continue
        prev = settings.get(key)
        if op == "=":
            if prev is not None and warnings is not None and prev.loc.source == loc.source:
                warnings.append(f"{loc}: {key} is set again (first on line {prev.loc.line}); this one counts")
            settings[key] = _Setting(value, loc)
        elif prev is None:
            settings[key] = _Setting(value, loc, added=True)
        elif isinstance(prev.value, _Atom) and isinstance(value, _Atom):
            settings[key] = _Setting(_Atom(prev.value.text + value.text, value.loc), loc, added=True)
        elif isinstance(prev.value, _List) and isinstance(value, _List):
            settings[key] = _Setting(_List(prev.value.items + value.items, value.loc), loc, added=True)
        else:
            problems.add(loc, f"{key}+=: cannot add a list to a string or a string to a list")


def _apply_override(arg: str, index: int, settings: dict[str, _Setting], problems: _Problems) -> None:
    label = f"override {arg!r}"
    loc = _Loc(index, 1, label)
    m = _OVERRIDE.fullmatch(arg)
    if not m:
        problems.add(loc, "expected KEY=VALUE, like memory=512 or name=node2")
        return
    key, op, raw = m.group(1), m.group(2), m.group(3).strip()
    bare = raw[:1] not in ('"', "'", "[") and _xl_int(raw) is None  # a string: shells need no nested quotes
    text = f"{key}{op}{_quote(raw) if bare else raw}"
    _store(_Parser(_lex(text), lambda line: _Loc(index, line, label), problems), settings, problems, None)


def _quote(raw: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\' else f"\\{ord(c):03o}" if c == "\n" else c for c in raw) + '"'


# ---------------------------------------------------------------------------------------------
# Values


def _atom(key: str, v: _Value) -> _Atom:
    if isinstance(v, _List):
        raise _Bad(f"{key}: expected a single value, not a list")
    return v


def _string(key: str, s: _Setting) -> str:
    return _atom(key, s.value).text


def _number(key: str, s: _Setting, hint: str = "") -> int:
    a = _atom(key, s.value)
    if s.added:
        raise _Bad(f"{key}: += cannot be used with numbers")
    if a.number is not None:
        return a.number
    text = a.text.strip()  # xl also takes a number in quotes, with a sign
    n = _xl_int(text[1:] if text[:1] in ("+", "-") else text)
    if n is None:
        raise _Bad(f"{key}: {a.text!r} is not a number{hint}")
    return -n if text[:1] == "-" else n


def _bounded(key: str, s: _Setting, low: int, high: int) -> int:
    n = _number(key, s)
    if not low <= n <= high:
        raise _Bad(f"{key}={n}: expected {low} to {high}")
    return n


def _bool(key: str, s: _Setting) -> bool:
    return _number(key, s, " (0 or 1)") != 0


def _path(key: str, s: _Setting, cwd: str) -> str:
    path = _string(key, s)
    if not path:
        raise _Bad(f"{key}: empty path")
    return os.path.join(cwd, path)


def _strings(key: str, s: _Setting) -> list[_Atom]:
    """A list of strings, like disk= and vif=."""
    if isinstance(s.value, _Atom):
        raise _Bad(f"{key}: expected a list, like {key} = [ '...', '...' ]")
    out = []
    for item in s.value.items:
        if isinstance(item, _List):
            raise _Bad(f"{key}: each entry is a string, not a list", item.loc)
        out.append(item)
    return out


def _bootloader(s: _Setting) -> str:
    from slimvisor.domain.pygrub import is_pygrub

    loader = _string("bootloader", s)
    if not is_pygrub(loader):
        raise _Bad(f'bootloader="{loader}": only pygrub (or a path ending in pygrub) is offered')
    return loader


def _bootloader_args(s: _Setting) -> list[str]:
    """A string of words, or a list of them, as xl takes it."""
    if isinstance(s.value, _Atom):
        return shlex.split(s.value.text)
    return [a.text for a in _strings("bootloader_args", s)]


def _name(s: _Setting) -> str:
    name = _string("name", s)
    if not NAME.fullmatch(name):
        raise _Bad(f"name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return name


def _type(s: _Setting) -> str:
    kind = _string("type", s)
    if kind not in DOMAIN_TYPES:
        raise _Bad(f'type="{kind}": expected one of {", ".join(repr(t) for t in DOMAIN_TYPES)}')
    return kind


def _builder(s: _Setting) -> str:
    """The deprecated type selection: "generic" is PV, "hvm" is HVM."""
    builder = _string("builder", s)
    if builder not in ("generic", "hvm"):
        raise _Bad(f'builder="{builder}": expected "generic" (type="pv") or "hvm" (type="hvm")')
    return _type(_Setting(_Atom("pv" if builder == "generic" else "hvm", s.loc), s.loc))


def _memory(key: str) -> Callable[[_Setting], int]:
    return lambda s: parse_memory(str(_number(key, s, " (MiB, like 512)")), key)


def _action(key: str) -> Callable[[_Setting], str]:
    def parse(s: _Setting) -> str:
        action = _string(key, s)
        if action in (Action.COREDUMP_DESTROY, Action.COREDUMP_RESTART, "soft-reset"):
            raise _Bad(f'{key}="{action}" is not supported')
        if action not in ACTIONS:
            raise _Bad(f"{key}={action!r}: expected one of {', '.join(ACTIONS)}")
        return action

    return parse


def _uuid(s: _Setting) -> str:
    text = _string("uuid", s)
    if not _UUID.fullmatch(text):
        raise _Bad(f"uuid {text!r}: expected 8-4-4-4-12 hex digits, like 4b1e5fe5-2d7c-4e2b-9c3e-0b8f0d1c2a3f")
    return text.lower()


def parse_cpulist(text: str, ncpus: int) -> set[int] | None:
    """xl's CPULIST ("all", "3", "0-3,5,^1", "all,^7") on a host of `ncpus` CPUs; None for all of them.

    Items apply left to right, each adding CPUs or, after ^, taking them away: "^1" alone selects
    nothing. NUMA nodes ("node:1") are refused. Raises SpecError.
    """
    try:
        return _cpulist(text, ncpus)
    except _Bad as e:
        raise SpecError(str(e)) from None


def _cpulist(text: str, ncpus: int) -> set[int] | None:
    cpus: set[int] = set()
    said_all = False
    for raw in text.split(","):
        item = raw.strip()
        remove = item.startswith("^")
        item = item[1:] if remove else item
        if item.startswith(("node:", "nodes:")):
            raise _Bad(f"cpus {text!r}: NUMA node selection ({item}) is not supported")
        if item == "all":
            chosen = set(range(ncpus))
            said_all = said_all or not remove
        else:
            m = _CPU_RANGE.fullmatch(item)
            if not m:
                raise _Bad(f"cpus {text!r}: {raw.strip()!r} is not a CPU, a range like 0-3, all, or ^ before one")
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            if first > last:
                raise _Bad(f"cpus {text!r}: range {item} goes backwards")
            if last >= ncpus:
                raise _Bad(f"cpus {text!r}: this host has CPUs 0-{ncpus - 1}")
            chosen = set(range(first, last + 1))
        cpus = cpus - chosen if remove else cpus | chosen
    if not cpus:
        raise _Bad(f'cpus {text!r}: selects no CPU (to leave some out of all of them, write "all,^N")')
    return None if said_all and len(cpus) == ncpus else cpus


def _cpus(s: _Setting) -> tuple[set[int] | None, int]:
    """The pinning and how many vCPUs it names (a list pins vCPU 0, 1, ... in turn)."""
    ncpus = os.cpu_count() or 1
    if isinstance(s.value, _Atom):
        return parse_cpulist(s.value.text, ncpus), 1
    pins = [parse_cpulist(item.text, ncpus) for item in _strings("cpus", s)]
    return (pins[0] if pins else None), len(pins)


# ---------------------------------------------------------------------------------------------
# Disks (xl-disk-configuration(5))

XL_DISK_FORMATS = ("qcow", "vhd", "qed")  # xl's formats slimvisor refuses
QSD_FORMATS = ("raw", "qcow2")  # what qemu-storage-daemon serves here (backendtype=qdisk)
DISK_OPTIONS = ("target", "format", "vdev", "access", "devtype", "backendtype")
BACKENDTYPES = ("phy", "qdisk", "tap")  # phy and tap: slimvisor's blk backend; qdisk: qemu-storage-daemon
_DEPRECATED_FORMAT = ("raw", "qcow", "qcow2", "vhd")  # "raw:/img/a" is format=raw
_DEPRECATED_SCRIPT = ("iscsi", "nbd", "enbd", "drbd")
_DEPRECATED_IGNORED = ("tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy")
_XL_DISK_ONLY = ("backend", "script", "direct-io-safe", "discard", "no-discard", "colo", "colo-host",
                 "colo-port", "colo-export", "active-disk", "hidden-disk")  # fmt: skip


def _disk_items(spec: str) -> Iterator[str]:
    """The comma-separated parameters; `target=` takes the rest of the spec, commas and all."""
    pos = 0
    while pos < len(spec):
        while pos < len(spec) and spec[pos] in " \t":
            pos += 1
        if spec.startswith("target=", pos):
            yield spec[pos:]
            return
        end = spec.find(",", pos)
        end = len(spec) if end < 0 else end
        yield spec[pos:end].strip()
        pos = end + 1


def vdev_key(vdev: str) -> tuple[int, int]:
    """(disk, partition) of a vdev: xvda is (0, 0), hdc (2, 0), xvda1 (0, 1). Xen's own device numbers
    sort the same way, and so the guest's virtio disks follow this order. Raises SpecError."""
    m = _VDEV.fullmatch(vdev)
    if not m:
        raise SpecError(f"vdev {vdev!r}: expected xvdX, hdX, sdX or vdX (like xvda), with a partition number or not")
    letters, part = m.group(2), m.group(3)
    if len(letters) > 1:
        raise SpecError(f"vdev {vdev}: at most 26 disks ({m.group(1)}a to {m.group(1)}z)")
    if part and not 1 <= int(part) <= 15:
        raise SpecError(f"vdev {vdev}: partitions are numbered 1 to 15")
    return ord(letters) - ord("a"), int(part or 0)


def parse_disk(spec: str) -> tuple[str, int, DiskSpec]:
    """One DISKSPEC: (vdev, index: 0 for xvda/hda/sda/vda and xvda1, DiskSpec). Raises SpecError
    naming every problem of the spec, separated by '; '.

    The path stays as written: parse_xlcfg takes a relative one against the client's directory.
    """
    vdev, disk, problems = _parse_disk(spec)
    if problems or disk is None:
        raise SpecError(f"disk {spec!r}: " + "; ".join(problems))
    return vdev, vdev_key(vdev)[0], disk


def _parse_disk(spec: str) -> tuple[str, DiskSpec | None, list[str]]:
    """(vdev, the disk or None, every problem found)."""
    got: dict[str, str] = {}
    problems: list[str] = []

    def put(key: str, value: str) -> None:
        if key in got:
            problems.append(f"{key} is given twice")
        got[key] = value

    deprecated_prefix = False
    for item in _disk_items(spec):
        key, eq, value = item.partition("=")
        if eq:
            if key in DISK_OPTIONS:
                put(key, value)
            elif key in _XL_DISK_ONLY:
                problems.append(f"{key}= is not supported by slimvisor")
            else:
                problems.append(f"unknown option {key!r} (known: {', '.join(DISK_OPTIONS)})")
        elif item == "cdrom":
            put("devtype", "cdrom")
        elif item in _XL_DISK_ONLY:
            problems.append(f"{item} is not supported by slimvisor")
        else:  # positional: target, format, vdev, access, in the slots not yet given
            if "target" not in got:
                while (m := re.match(r"([a-z][a-z0-9]*):", item)) and m.group(1) in (
                    _DEPRECATED_FORMAT + _DEPRECATED_SCRIPT + _DEPRECATED_IGNORED
                ):
                    prefix, item, deprecated_prefix = m.group(1), item[m.end() :], True
                    if prefix in _DEPRECATED_SCRIPT:
                        problems.append(f"{prefix}: (script=block-{prefix}) is not supported by slimvisor")
                    if prefix in _DEPRECATED_FORMAT:
                        put("format", prefix)
                if deprecated_prefix:
                    got.setdefault("format", "")  # the old syntax has no format position
            slot = next((k for k in ("target", "format", "vdev", "access") if k not in got), None)
            if slot is None:
                problems.append(f"too many positional parameters at {item!r}")
                continue
            got[slot] = item
    vdev, _, devtype = got.get("vdev", "").partition(":")  # "hdc:cdrom" in the old syntax
    if devtype and devtype != "cdrom":
        problems.append(f"vdev {got['vdev']!r}: unknown device type {devtype!r}")
        devtype = "cdrom"  # said once is enough
    devtype = devtype or got.get("devtype", "")
    fmt, access, target = got.get("format") or "raw", got.get("access") or "", got.get("target", "")
    backendtype = got.get("backendtype", "")
    if devtype not in ("", "disk", "cdrom"):
        problems.append(f"devtype {devtype!r}: expected disk or cdrom")
    if fmt in XL_DISK_FORMATS:
        problems.append(f"format {fmt} is not supported by slimvisor (raw, qcow2 and overlay images only)")
    elif fmt not in DISK_FORMATS:
        problems.append(f"unknown format {fmt!r} (known: {', '.join(DISK_FORMATS)})")
    if backendtype and backendtype not in BACKENDTYPES:
        problems.append(f"backendtype {backendtype!r}: expected one of {', '.join(BACKENDTYPES)}")
    elif backendtype in ("phy", "tap") and fmt == "qcow2":
        problems.append(f"backendtype={backendtype} serves raw images; qcow2 needs backendtype=qdisk (or none)")
    elif backendtype == "qdisk" and fmt not in QSD_FORMATS:
        problems.append(f"backendtype=qdisk serves {' and '.join(QSD_FORMATS)} images, not {fmt}")
    if access not in ("", "r", "ro", "rw", "w"):
        problems.append(f"access {access!r}: expected r, ro, rw or w")
    if devtype == "cdrom" and access in ("rw", "w"):
        problems.append("a cdrom is read-only: leave access out or give r")
    if not target:
        problems.append("no target: give the image path first, or target=PATH last")
    if not vdev:
        problems.append("no vdev: say which disk the guest sees (xvda, xvdb, ...)")
    else:
        try:
            vdev_key(vdev)
        except SpecError as e:
            problems.append(str(e))
    if problems:
        return vdev, None, problems
    qsd = fmt == "qcow2" or backendtype == "qdisk"
    readonly = access in ("r", "ro") or devtype == "cdrom"
    return vdev, DiskSpec(target, readonly, format=fmt, backend="qsd" if qsd else "blk", vdev=vdev), []


def _disks(s: _Setting, problems: _Problems, cwd: str, locs: list[_Loc]) -> list[DiskSpec]:
    """The disks in Xen's device order (xvda, xvda1, xvdb, ...), which is the guest's vda, vdb, ..."""
    found: dict[tuple[int, int], tuple[str, _Loc]] = {}
    disks: dict[tuple[int, int], DiskSpec] = {}
    for item in _strings("disk", s):
        vdev, disk, bad = _parse_disk(item.text)
        for message in bad:
            problems.add(item.loc, f"disk {item.text!r}: {message}")
        if disk is None:
            continue
        key = vdev_key(vdev)
        if key in found:
            other, where = found[key]
            problems.add(item.loc, f"disk {item.text!r}: vdev {vdev} is the same disk as {other} ({where})")
            continue
        found[key], disks[key] = (vdev, item.loc), dataclasses.replace(disk, path=os.path.join(cwd, disk.path))
    locs[:] = [found[k][1] for k in sorted(disks)]
    return [disks[k] for k in sorted(disks)]


# ---------------------------------------------------------------------------------------------
# Network interfaces (xl-network-configuration(5))

VIF_OPTIONS = ("mac", "bridge", "rate", "ip", "script", "type", "model")
_XL_VIF_ONLY = ("vifname", "backend", "gatewaydev", "netdev", "mtu", "devid", "accel")


def parse_vif(spec: str) -> tuple[NetSpec, list[str]]:
    """One vifspec: the NetSpec and notes on what was accepted but is not applied. Raises SpecError."""
    what = f"vif {spec!r}"
    opts: dict[str, str] = {}
    notes: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key in _XL_VIF_ONLY:
            raise SpecError(f"{what}: {key}= is not supported")
        if key not in VIF_OPTIONS:
            raise SpecError(f"{what}: unknown option {key!r} (known: {', '.join(VIF_OPTIONS)})")
        if not eq or not value:
            raise SpecError(f"{what}: {key} needs a value ({key}=...)")
        if key in opts:
            raise SpecError(f"{what}: {key} is given twice")
        opts[key] = value
    kind = opts.get("type", "vif")
    if kind not in ("vif", "ioemu"):
        raise SpecError(f"{what}: type={kind} is not supported: expected vif or ioemu")
    if kind == "ioemu":  # xl's HVM NIC: an emulated device plus a PV one; here a virtio-net card either way
        notes.append(f"{what}: type=ioemu is a virtio-net card on the switch here (no emulated NIC)")
    script = opts.get("script", "vif-bridge")
    if os.path.basename(script) != "vif-bridge":
        raise SpecError(f"{what}: script {script} is not supported (a slimvisor switch does what vif-bridge does)")
    if "ip" in opts:
        for address in opts["ip"].split():
            try:
                ipaddress.ip_interface(address)
            except ValueError:
                raise SpecError(f"{what}: ip {address!r} is not an IP address") from None
        notes.append(f"{what}: ip= is accepted and not enforced")
    if "model" in opts:  # xl too ignores it for a PV guest
        notes.append(f"{what}: model= is ignored: it picks an emulated NIC; every card here is virtio-net")
    mac = parse_mac(opts["mac"], f"{what}: mac") if "mac" in opts else None
    rate = None
    if "rate" in opts:
        amount, at, interval = opts["rate"].partition("@")
        try:
            rate = parse_rate(amount)
        except ValueError as e:
            raise SpecError(f"{what}: {e}") from None
        if at:
            if not _INTERVAL.fullmatch(interval):
                raise SpecError(f"{what}: rate interval {interval!r}: expected a time like 20ms, 50000us or 1s")
            notes.append(f"{what}: the @{interval} refill interval is ignored (slimvisor refills continuously)")
    return NetSpec(opts.get("bridge", DEFAULT_BRIDGE), mac, rate), notes


def _vifs(s: _Setting, problems: _Problems, warnings: list[str]) -> list[NetSpec]:
    nets = []
    for item in _strings("vif", s):
        try:
            net, notes = parse_vif(item.text)
        except SpecError as e:
            problems.add(item.loc, str(e))
            continue
        nets.append(net)
        warnings.extend(f"{item.loc}: {note}" for note in notes)
    return nets


# ---------------------------------------------------------------------------------------------
# The whole domain

_T = TypeVar("_T")


class _Reader:
    """Reads settings into values, recording a problem (and giving the default) for each bad one."""

    def __init__(self, settings: dict[str, _Setting], problems: _Problems) -> None:
        self.settings, self.problems = settings, problems
        self.bad: set[str] = set()

    def get(self, key: str, parse: Callable[[_Setting], _T], default: _T) -> _T:
        s = self.settings.get(key)
        if s is None:
            return default
        try:
            return parse(s)
        except _Bad as e:
            self.problems.add(e.loc or s.loc, str(e))
        except SpecError as e:  # from spec.py's parsers and ours: they name the key themselves
            self.problems.add(s.loc, str(e))
        self.bad.add(key)
        return default

    def loc(self, key: str) -> _Loc:
        return self.settings[key].loc

    def fine(self, *keys: str) -> bool:
        """None of `keys` had a problem (each is as set, or its default)."""
        return not self.bad.intersection(keys)


def _build(settings: dict[str, _Setting], problems: _Problems, warnings: list[str], filename: str,
           cwd: str) -> DomainConfig:  # fmt: skip
    r = _Reader(settings, problems)
    disk_locs: list[_Loc] = []
    name = r.get("name", _name, "")
    kind = r.get("type", _type, r.get("builder", _builder, "pv"))
    memory = r.get("memory", _memory("memory"), DEFAULT_MEMORY_MIB)
    maxmem = r.get("maxmem", _memory("maxmem"), None)
    vcpus = r.get("vcpus", lambda s: _bounded("vcpus", s, 1, 4096), 1)
    no_pinning: tuple[set[int] | None, int] = (None, 0)
    cpus, pinned_vcpus = r.get("cpus", _cpus, no_pinning)
    cap = r.get("cap", lambda s: _bounded("cap", s, 0, 100 * vcpus), None)
    config = DomainConfig(
        name=name, type=kind, memory_mib=memory, maxmem_mib=maxmem, vcpus=vcpus,
        kernel=r.get("kernel", lambda s: _path("kernel", s, cwd), None),
        ramdisk=r.get("ramdisk", lambda s: _path("ramdisk", s, cwd), None),
        cmdline=_cmdline(r, warnings),
        **_devices(r, cwd, {"disk": lambda s: _disks(s, problems, cwd, disk_locs),
                            "vif": lambda s: _vifs(s, problems, warnings)}),
        on_poweroff=r.get("on_poweroff", _action("on_poweroff"), "destroy"),
        on_reboot=r.get("on_reboot", _action("on_reboot"), "restart"),
        on_crash=r.get("on_crash", _action("on_crash"), "destroy"),
        cpu_weight=r.get("cpu_weight", lambda s: _bounded("cpu_weight", s, 1, 65535), None),
        cap=cap, cpus=cpus, uuid=r.get("uuid", _uuid, None),
        bootloader=r.get("bootloader", _bootloader, None),
        bootloader_args=r.get("bootloader_args", _bootloader_args, []),
        xen_platform_pci=r.get("xen_platform_pci", lambda s: _bool("xen_platform_pci", s), True),
        warnings=warnings,
    )  # fmt: skip
    config.sources = {"": filename, **{key: str(s.loc) for key, s in settings.items()},
                      **{f"disk.{i}": str(loc) for i, loc in enumerate(disk_locs)}}  # fmt: skip
    _answer_others(settings, problems, warnings)
    if "type" in settings and "builder" in settings:
        warnings.append(f"{r.loc('builder')}: builder= is ignored, as type= is set")
    whole = _Loc(1 << 30, 0, filename)  # after every line and override
    if "name" not in settings:
        problems.add(whole, 'no name: every domain needs one (name="...")')
    if config.bootloader is not None and config.kernel is not None:
        warnings.append(f"{r.loc('kernel')}: kernel= is ignored: the bootloader picks the kernel")
        config.kernel = None
    if (r.fine("vcpus", "kernel") and kind == "pv" and vcpus > 1 and config.bootloader is None
            and _runs_on_uml(config.kernel)):  # fmt: skip
        problems.add(r.loc("vcpus"), f"vcpus={vcpus}: PV domains (User-Mode Linux) have exactly one vCPU; "
                                     'type="pvh" or "hvm" domains have more')  # fmt: skip
    if r.fine("cpus", "vcpus") and pinned_vcpus > vcpus:
        problems.add(r.loc("cpus"), f"cpus: {pinned_vcpus} entries pin {pinned_vcpus} vCPUs, but vcpus={vcpus}")
    if r.fine("maxmem", "memory") and maxmem is not None and memory > maxmem:
        problems.add(r.loc("maxmem"), f"maxmem={maxmem}: below memory={memory} (maxmem is the most the domain "
                                      "may ever have)")  # fmt: skip
    return config



def _devices(r: _Reader, cwd: str, lists: dict[str, Callable[[_Setting], list[Any]]]) -> dict[str, Any]:
    """The DomainSpec fields of the devices the config asks for, read from the keys `devices.registry`
    declares: a flag is 0 or 1, a value is the spec type's `parse(text, cwd)`, and a list has its xl
    syntax in `lists` (xl-disk-configuration(5), xl-network-configuration(5))."""
    fields: dict[str, Any] = {}
    for kind, option in options():
        key = option.xlcfg_key
        if key is None:
            continue
        if option.shape is Shape.FLAG:
            fields[option.field] = r.get(key, functools.partial(_bool, key), False)
        elif option.shape is Shape.VALUE:
            fields[option.field] = r.get(key, functools.partial(_spec_value, kind.spec, key, cwd), None)
        else:
            fields[option.field] = r.get(key, lists[key], [])  # a list key needs its syntax: LIST_SYNTAXES
    return fields


def _spec_value(spec: Any, key: str, cwd: str, s: _Setting) -> Any:
    return spec.parse(_string(key, s), cwd)


def _runs_on_uml(kernel: str | None) -> bool:
    """A PV config runs on UML with its kernel a UML one (or none: linux.uml); an ordinary x86
    kernel makes it a PVH domain (engines.resolve_type), which may have more vCPUs."""
    from slimvisor.engines.uml import is_uml_kernel

    return kernel is None or (os.path.isfile(kernel) and is_uml_kernel(kernel))  # a missing one: check_host says so


def _cmdline(r: _Reader, warnings: list[str]) -> str:
    """cmdline= if given (root= and extra= are then ignored, as xl does), else "root=ROOT EXTRA"."""
    cmdline = r.get("cmdline", lambda s: _string("cmdline", s), None)
    root = r.get("root", lambda s: _string("root", s), None)
    extra = r.get("extra", lambda s: _string("extra", s), None)
    from slimvisor.engines.uml import host_options, refusal

    for key, value in (("cmdline", cmdline), ("root", root), ("extra", extra)):
        for word in host_options(value or ""):
            r.problems.add(r.loc(key), refusal(key, word))
    if cmdline is not None:
        if root is not None or extra is not None:
            warnings.append(f"{r.loc('cmdline')}: cmdline= is set, so root= and extra= are ignored")
        return cmdline
    parts = ([f"root={root}"] if root is not None else []) + ([extra] if extra else [])
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# What the host must have (after parsing): every problem, each at the setting it comes from


def check_host(config: DomainConfig) -> None:
    """Check what create would of the host (the engine's kernel, the initrd, every disk, the switches) and raise
    XlCfgError naming each problem at the file and line of its setting."""
    from slimvisor.domain.check import check_disk
    from slimvisor.domain.devices import switch_control
    from slimvisor.engines import engine_for, resolve_type

    problems: list[tuple[str, str]] = []
    spec = config.to_domain_spec()
    try:
        if config.bootloader is None:  # else the kernel is the guest disk's, read at create
            resolve_type(spec)  # a PV config with an ordinary kernel is a PVH domain
            engine_for(spec).check(spec)
    except SpecError as e:
        named = re.split(r"[ =:]", str(e), maxsplit=1)[0]
        key = named if named in ("kernel", "vcpus", "channel") else next(
            (k for k in ("cmdline", "extra", "root") if k in config.sources), "kernel")  # fmt: skip
        problems.append((config.source(key), str(e)))
    if spec.initrd is not None and not os.path.isfile(spec.initrd):
        problems.append((config.source("ramdisk"), f"ramdisk {spec.initrd}: no such file"))
    seen: dict[str, int] = {}
    for i, disk in enumerate(spec.disks):
        if disk.path in seen:
            other = spec.disks[seen[disk.path]].vdev
            problems.append((config.source(f"disk.{i}"), f"disk {disk.path}: the same image as {other}"))
            continue
        seen[disk.path] = i
        try:
            check_disk(disk)
        except SpecError as e:
            problems.append((config.source(f"disk.{i}"), str(e)))
    for i, net in enumerate(spec.nets):
        if not switch_control(net.switch).exists():
            problems.append((config.source("vif"), f"vif {i}: switch {net.switch} is not running (slimvisor switch "
                                                   f"start {net.switch})"))  # fmt: skip
    if len(spec.disks) > MAX_DISKS:
        too_many = f"{len(spec.disks)} disks: at most {MAX_DISKS} (vda..vdz)"
        problems.append((config.source(f"disk.{MAX_DISKS}"), too_many))
    if spec.initrd is None and not spec.disks:
        problems.append((config.source(""), "nothing to boot: give a ramdisk= or a root disk (disk=[...])"))
    if config.bootloader is not None and not spec.disks:
        problems.append((config.source("bootloader"), "bootloader: pygrub reads the first disk: give one"))
    if problems:
        raise XlCfgError([f"{where}: {message}" for where, message in problems])


def load(text: str, filename: str = "<config>", overrides: Sequence[str] = (), cwd: str | None = None) -> DomainConfig:
    """parse_xlcfg, then check_host: everything `slimvisor create` checks before it starts anything."""
    config = parse_xlcfg(text, filename, overrides, cwd)
    check_host(config)
    return config


def config_json(config: DomainConfig) -> dict[str, object]:
    """The domain a config describes, as `slimvisor create -n` prints it."""
    out = dataclasses.asdict(config)
    del out["sources"]
    out["cpus"] = sorted(config.cpus) if config.cpus is not None else None
    for net in out["nets"]:
        net["mac"] = net["mac"].hex(":") if net["mac"] is not None else None
    return out
