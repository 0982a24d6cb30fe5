"""xl.cfg parsing (slimvisor.toolstack.xlcfg): syntax, keys, disks, vifs, cpus, overrides, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimvisor.model.spec import DEFAULT_UML, DiskSpec, DomainSpec, NetSpec, SpecError, VsockSpec
from slimvisor.toolstack.xlcfg import (
    DomainConfig,
    XlCfgError,
    parse_cpulist,
    parse_disk,
    parse_vif,
    parse_xlcfg,
)

MAC = bytes.fromhex("525400123456")


def cfg(text: str, *overrides: str) -> DomainConfig:
    return parse_xlcfg(text, "node1.cfg", list(overrides))


def problems(text: str, *overrides: str) -> list[str]:
    with pytest.raises(XlCfgError) as e:
        cfg(text, *overrides)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def problem(text: str, *overrides: str) -> str:
    found = problems(text, *overrides)
    assert len(found) == 1, found
    return found[0]


def spec_error(parse: Callable[[str], object], text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse(text)
    assert not isinstance(e.value, XlCfgError)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# Good configurations


def test_minimal_config_takes_the_defaults() -> None:
    c = cfg('name = "node1"\n')
    assert c == DomainConfig(name="node1")
    assert (c.type, c.memory_mib, c.vcpus, c.kernel, c.cmdline) == ("pv", 256, 1, None, "")
    assert (c.on_poweroff, c.on_reboot, c.on_crash) == ("destroy", "restart", "destroy")
    assert (c.disks, c.nets, c.cpus, c.vsock, c.rng, c.balloon, c.warnings) == ([], [], None, None, False, False, [])


def test_a_full_config(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    c = cfg(f"""\
# A lab node, as xl would take it
name = "node1"
type = "pv"
memory = 512
maxmem = 512
vcpus = 1
kernel = "/opt/linux.uml"
ramdisk = "/opt/initrd.img"
root = "/dev/vda"
extra = "console=tty0 quiet"
disk = [ '/img/node1.raw,raw,xvda,rw',
         '/img/data.raw,raw,xvdb,ro' ]
vif = [ 'mac=52:54:00:12:34:56,bridge=lab0,rate=100Mb/s' ]
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "preserve"
cpu_weight = 512
cap = 50
cpus = "0"
uuid = "4B1E5FE5-2D7C-4E2B-9C3E-0B8F0D1C2A3F"
vsock = "cid=3,uds={uds}"
rng = 1
balloon = 1
""")
    assert c == DomainConfig(
        name="node1", memory_mib=512, maxmem_mib=512, kernel="/opt/linux.uml", ramdisk="/opt/initrd.img",
        cmdline="root=/dev/vda console=tty0 quiet",
        disks=[DiskSpec("/img/node1.raw"), DiskSpec("/img/data.raw", readonly=True)],
        nets=[NetSpec("lab0", MAC, 100_000_000 // 8)], on_crash="preserve", cpu_weight=512, cap=50, cpus={0},
        uuid="4b1e5fe5-2d7c-4e2b-9c3e-0b8f0d1c2a3f", vsock=c.vsock, rng=True, balloon=True,
    )  # fmt: skip
    assert c.vsock is not None and (c.vsock.cid, c.vsock.uds) == (3, str(uds))
    spec = c.to_domain_spec()
    assert (spec.name, spec.kernel, spec.initrd, spec.memory_mib) == ("node1", "/opt/linux.uml", "/opt/initrd.img", 512)
    assert (spec.disks, spec.nets, spec.vsock) == (c.disks, c.nets, c.vsock)
    assert (spec.cmdline, spec.root, spec.rng, spec.balloon) == ("root=/dev/vda console=tty0 quiet", None, True, True)


def test_to_domain_spec_defaults_the_kernel_to_linux_uml() -> None:
    spec = cfg('name="a"').to_domain_spec()
    assert (spec.kernel, spec.memory_mib, spec.initrd, spec.disks) == (DEFAULT_UML, 256, None, [])


def test_to_domain_spec_copies_the_lists() -> None:
    c = cfg("name='a'\ndisk=['/a,,xvda']")
    c.to_domain_spec().disks.clear()
    assert len(c.disks) == 1


def test_semicolons_comments_blank_lines_and_crlf() -> None:
    c = cfg('\r\n  # comment\r\nname="a"; memory=128 ;\r\n\r\n;;\r\nvcpus=1 # trailing comment\r\n')
    assert (c.name, c.memory_mib, c.vcpus) == ("a", 128, 1)


def test_last_statement_needs_no_newline() -> None:
    assert cfg('memory=128\nname="a"').name == "a"


@pytest.mark.parametrize(
    ("value", "mib"),
    [("512", 512), ("0x200", 512), ("0X200", 512), ("01000", 512), ('"512"', 512), ("' 0x80'", 128), ("'+128'", 128)],
)
def test_numbers_decimal_hex_octal_and_quoted_as_xl(value: str, mib: int) -> None:
    assert cfg(f'name="a"\nmemory={value}').memory_mib == mib


def test_strings_in_either_quotes_with_escapes() -> None:
    c = cfg("name='a'\nextra=\"a\\\"b\\tc\\x41\\101\\\\\"\nkernel='/it\\'s #1'\n")
    assert c.cmdline == 'a"b\tcAA\\'
    assert c.kernel == "/it's #1"


def test_a_hash_inside_a_string_is_not_a_comment() -> None:
    assert cfg("name='a' # x\nextra='a#b'").cmdline == "a#b"


def test_lists_span_lines_with_comments_and_a_trailing_comma() -> None:
    c = cfg("""name = 'a'
disk = [
    # the root disk
    '/img/a.raw,raw,xvda,rw',   # first

    '/img/b.raw,raw,xvdb,rw',
]
vif = [ ]
""")
    assert [d.path for d in c.disks] == ["/img/a.raw", "/img/b.raw"]
    assert c.nets == []


def test_the_last_setting_wins_with_a_warning() -> None:
    c = cfg("name='a'\nmemory=128\nmemory=256\n")
    assert c.memory_mib == 256
    assert c.warnings == ["node1.cfg:3: memory is set again (first on line 2); this one counts"]


def test_plus_equals_appends_to_strings_and_lists() -> None:
    c = cfg("name='a'\nextra='quiet'\nextra+=' debug'\ndisk=['/a,,xvda']\ndisk+=['/b,,xvdb']\ncmdline+='x'")
    assert (c.cmdline, [d.path for d in c.disks]) == ("x", ["/a", "/b"])
    assert "node1.cfg:6: cmdline= is set, so root= and extra= are ignored" in c.warnings
    assert cfg("name='a'\nextra='quiet'\nextra+=' debug'").cmdline == "quiet debug"


@pytest.mark.parametrize(
    ("lines", "cmdline"),
    [
        ("", ""),
        ("root='/dev/vda'", "root=/dev/vda"),
        ("extra='quiet'", "quiet"),
        ("root='/dev/vda1 ro'\nextra='quiet'", "root=/dev/vda1 ro quiet"),
        ("cmdline='init=/bin/sh'", "init=/bin/sh"),
    ],
)
def test_cmdline_root_and_extra_as_xl_joins_them(lines: str, cmdline: str) -> None:
    c = cfg(f"name='a'\n{lines}")
    assert c.cmdline == cmdline
    assert c.warnings == []


def test_cmdline_wins_over_root_and_extra_with_a_warning() -> None:
    c = cfg("name='a'\nroot='/dev/vda'\ncmdline='console=tty0'\nextra='quiet'")
    assert c.cmdline == "console=tty0"
    assert c.warnings == ["node1.cfg:3: cmdline= is set, so root= and extra= are ignored"]


@pytest.mark.parametrize("action", ["destroy", "restart", "rename-restart", "preserve"])
def test_actions(action: str) -> None:
    c = cfg(f"name='a'\non_poweroff='{action}'\non_reboot='{action}'\non_crash='{action}'")
    assert (c.on_poweroff, c.on_reboot, c.on_crash) == (action, action, action)


def test_booleans_are_numbers_as_in_xl() -> None:
    assert (cfg("name='a'\nrng=0\nballoon=0").rng, cfg("name='a'\nrng=1").rng) == (False, True)
    assert cfg("name='a'\nballoon=2").balloon is True


def test_balloon_deflate_on_oom_implies_a_balloon() -> None:
    spec = cfg("name='a'\nballoon_deflate_on_oom=1").to_domain_spec()
    assert (spec.balloon, spec.balloon_deflate_on_oom) == (True, True)
    spec = cfg("name='a'\nballoon=1").to_domain_spec()
    assert (spec.balloon, spec.balloon_deflate_on_oom) == (True, False)
    assert DomainSpec.from_json(spec.to_json()) == spec


def test_a_number_is_taken_where_a_string_is_wanted_as_xl_does() -> None:
    assert cfg("name=123").name == "123"


def test_bounds_that_fit() -> None:
    c = cfg("name='a'\ncpu_weight=1\ncap=0")
    assert (c.cpu_weight, c.cap) == (1, 0)
    c = cfg("name='a'\ncpu_weight=65535\ncap=100")
    assert (c.cpu_weight, c.cap) == (65535, 100)


# ---------------------------------------------------------------------------------------------
# Errors: each with file and line, all of them together


def test_unterminated_string_names_file_and_line() -> None:
    text = "name='a'\n\n\n\n\n\nkernel = \"/boot/linux\n"
    assert problem(text) == "node1.cfg:7: unterminated string"


def test_unknown_key_names_file_and_line() -> None:
    assert problem("name='a'\n\nmemroy = 512\n") == "node1.cfg:3: unknown key 'memroy' (did you mean 'memory'?)"
    assert problem("name='a'\nfrobnicate = 1") == "node1.cfg:2: unknown key 'frobnicate'"


def test_xl_keys_slimvisor_lacks_are_named_as_such() -> None:
    assert problem("name='a'\nvtpm=['backend=vtpmmgr']") == (
        "node1.cfg:2: vtpm is not supported by slimvisor: there is no vTPM device")
    assert problem("name='a'\nbootloader='grub-legacy'") == (
        'node1.cfg:2: bootloader="grub-legacy": only pygrub (or a path ending in pygrub) is offered')


def test_all_errors_are_collected_in_line_order() -> None:
    text = """\
name = "node 1"
type = "xen"
memroy = 512
vcpus = 4
kernel = "/boot/linux
disk = [ '/a.qcow,qcow,xvda,rw' ]
on_crash = "coredump-restart"
vif = [ 'mac=01:00:00:00:00:00', 'bridge=b,vifname=e1000' ]
cap = 1000
uuid = "nope"
"""
    assert problems(text) == [
        "node1.cfg:1: name 'node 1': use letters, digits, '.', '_' and '-' (at most 64)",
        "node1.cfg:2: type=\"xen\": expected one of 'pv', 'pvh', 'hvm'",
        "node1.cfg:3: unknown key 'memroy' (did you mean 'memory'?)",
        "node1.cfg:4: vcpus=4: PV domains (User-Mode Linux) have exactly one vCPU; "
        'type="pvh" or "hvm" domains have more',
        "node1.cfg:5: unterminated string",
        "node1.cfg:6: disk '/a.qcow,qcow,xvda,rw': format qcow is not supported by slimvisor (raw, qcow2 and "
        "overlay images only)",
        'node1.cfg:7: on_crash="coredump-restart" is not supported',
        "node1.cfg:8: vif 'mac=01:00:00:00:00:00': mac: '01:00:00:00:00:00' is a multicast address",
        "node1.cfg:8: vif 'bridge=b,vifname=e1000': vifname= is not supported",
        "node1.cfg:9: cap=1000: expected 0 to 400",
        "node1.cfg:10: uuid 'nope': expected 8-4-4-4-12 hex digits, like 4b1e5fe5-2d7c-4e2b-9c3e-0b8f0d1c2a3f",
    ]


def test_errors_in_list_items_name_the_items_line() -> None:
    text = "name='a'\ndisk = [\n  '/a,,xvda',\n  '/b,,xvdb,rx',\n  '/c,vhd,xvdc',\n]"
    assert problems(text) == [
        "node1.cfg:4: disk '/b,,xvdb,rx': access 'rx': expected r, ro, rw or w",
        "node1.cfg:5: disk '/c,vhd,xvdc': format vhd is not supported by slimvisor (raw, qcow2 and overlay images "
        "only)",
    ]


def test_a_list_left_open_does_not_swallow_the_rest() -> None:
    text = "name='a'\ndisk = [ '/a,,xvda',\n   '/b,,xvdb'\nmemroy = 1\nvcpus = 2\n"
    assert problems(text) == [
        "node1.cfg:2: the list of disk opened here is not closed with ']'",
        "node1.cfg:4: unknown key 'memroy' (did you mean 'memory'?)",
        "node1.cfg:5: vcpus=2: PV domains (User-Mode Linux) have exactly one vCPU; "
        'type="pvh" or "hvm" domains have more',
    ]
    unclosed = "node1.cfg:2: the list of disk opened here is not closed with ']'"
    assert problem("name='a'\ndisk = [ '/a,,xvda',") == unclosed


def test_one_syntax_error_a_line_and_parsing_goes_on() -> None:
    assert problems("name='a'\nmemory=128 vcpus=1 'x\nvcpus='2\nrng=1") == [
        "node1.cfg:2: expected a new line or ';' after the value of memory, found 'vcpus'",
        "node1.cfg:3: unterminated string",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("memory 512", "expected '=' after memory, found '512'"),
        ("memory =", "no value after memory="),
        ("memory = ;", "no value after memory="),
        ("= 5", "expected a key (like memory=...), found '='"),
        ("'memory' = 5", "expected a key (like memory=...), found \"'memory'\""),
        ("extra = quiet", "'quiet' is not a value: put strings in quotes (\"quiet\")"),
        ("rng = True", "'True' is not a value: put strings in quotes (\"True\")"),
        ("memory = 1.5", "'1.5' is not a number (xl numbers are whole: decimal, 0x hex or 0 octal)"),
        ("memory = 512M", "'512M' is not a number (xl numbers are whole: decimal, 0x hex or 0 octal)"),
        ("memory = 08", "'08' is not a number (xl numbers are whole: decimal, 0x hex or 0 octal)"),
        ("memory = 0x", "'0x' is not a number (xl numbers are whole: decimal, 0x hex or 0 octal)"),
        ("memory = -5", "unexpected '-5' (xl.cfg is not Python: values are strings, numbers and [lists])"),
        ("disk = ('a', 'b')", "unexpected \"('a'\" (xl.cfg is not Python: values are strings, numbers and [lists])"),
        ("extra = 'a' 'b'", "expected a new line or ';' after the value of extra, found \"'b'\""),
        ("disk = [ 'a' 'b' ]", "expected ',' or ']' in the list of disk, found \"'b'\""),
        ("disk = [ , ]", "expected a value for disk, found ','"),
        ("disk = [ 'a',, ]", "expected a value for disk, found ','"),
        ("]", "expected a key (like memory=...), found ']'"),
        ("extra = 'a\\qb'", "unknown escape '\\q' in a string (known: \\\" \\' \\\\ \\n \\t \\xHH ...)"),
        ("memory = 5 = 6", "expected a new line or ';' after the value of memory, found '='"),
        ("@name = 'x'", "unexpected '@name'"),
        ("disk = " + "[" * 20 + "]" * 20, "lists nested more than 16 deep"),
    ],
)
def test_syntax_errors(line: str, message: str) -> None:
    assert problems(f"name='a'\n{line}\n") == [f"node1.cfg:2: {message}"]


def test_the_error_type_is_a_spec_error_with_the_problems() -> None:
    with pytest.raises(SpecError) as e:
        cfg("vcpus=2\nmemroy=1")
    assert isinstance(e.value, XlCfgError)
    assert e.value.problems == [
        "node1.cfg:1: vcpus=2: PV domains (User-Mode Linux) have exactly one vCPU; "
        'type="pvh" or "hvm" domains have more',
        "node1.cfg:2: unknown key 'memroy' (did you mean 'memory'?)",
        'node1.cfg: no name: every domain needs one (name="...")',
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("type='xen'", 'type="xen": expected one of'),
        ("vcpus=0", "vcpus=0: expected 1 to 4096"),
        ("memory=8", "memory: '8' is below the minimum of 16 MiB"),
        ("memory='lots'", "memory: 'lots' is not a number (MiB, like 512)"),
        ("memory=[512]", "memory: expected a single value, not a list"),
        ("memory+=5", "memory: += cannot be used with numbers"),
        ("memory=0x7fffffffffffffff", "is more than this host's"),
        ("cpu_weight=0", "cpu_weight=0: expected 1 to 65535"),
        ("cpu_weight=65536", "cpu_weight=65536: expected 1 to 65535"),
        ("cap=101", "cap=101: expected 0 to 100"),
        ("on_reboot='reboot'", "on_reboot='reboot': expected one of destroy, restart, rename-restart, preserve"),
        ("on_poweroff='coredump-destroy'", 'on_poweroff="coredump-destroy" is not supported'),
        ("on_crash='soft-reset'", 'on_crash="soft-reset" is not supported'),
        ("kernel=''", "kernel: empty path"),
        ("rng='yes'", "rng: 'yes' is not a number (0 or 1)"),
        ("memory='--512'", "memory: '--512' is not a number (MiB, like 512)"),
        ("memory='-512'", "memory: '-512' is not a size"),
        ("vsock='cid=²,uds=/tmp/x.sock'", "vsock 'cid=²,uds=/tmp/x.sock': cid must be a number from 3"),
        ("vsock='cid=2,uds=/tmp/x.sock'", "vsock 'cid=2,uds=/tmp/x.sock': cid must be a number from 3"),
        ("vsock='cid=3'", "vsock 'cid=3': give cid=N and uds=PATH"),
        ("disk='/a,,xvda'", "disk: expected a list, like disk = [ '...', '...' ]"),
        ("disk=[['/a,,xvda']]", "disk: each entry is a string, not a list"),
        ("vif=[['']]", "vif: each entry is a string, not a list"),
        ("extra=['a']", "extra: expected a single value, not a list"),
        ("extra='a'\nextra+=['b']", "extra+=: cannot add a list to a string or a string to a list"),
    ],
)
def test_bad_values(line: str, message: str) -> None:
    found = problem(f"name='a'\n{line}\n")
    assert found.startswith(f"node1.cfg:{1 + line.count(chr(10)) + 1}: ")
    assert message in found


@pytest.mark.parametrize("name", ["", "-a", "a b", "a/b", "x" * 65, "é"])
def test_names_follow_domain_spec_rules(name: str) -> None:
    rule = "use letters, digits, '.', '_' and '-' (at most 64)"
    assert problem(f"name='{name}'") == f"node1.cfg:1: name {name!r}: {rule}"


def test_a_name_of_64_is_fine() -> None:
    assert cfg(f"name='{'x' * 64}'").name == "x" * 64


def test_memory_against_maxmem() -> None:
    assert cfg("name='a'\nmemory=256\nmaxmem=256").maxmem_mib == 256
    assert problem("name='a'\nmemory=512\nmaxmem=256") == (
        "node1.cfg:3: maxmem=256: below memory=512 (maxmem is the most the domain may ever have)"
    )
    assert cfg("name='a'\nmemory=256\nmaxmem=512").maxmem_mib == 512  # starts ballooned down to 256
    # maxmem against the default memory (256), and no second error for a memory that was bad already
    assert "below memory=256" in problem("name='a'\nmaxmem=128")
    assert problem("name='a'\nmemory='x'\nmaxmem=128") == "node1.cfg:2: memory: 'x' is not a number (MiB, like 512)"


def test_no_name_is_an_error_for_the_whole_file() -> None:
    assert problem("memory=128") == 'node1.cfg: no name: every domain needs one (name="...")'


def test_empty_text_needs_a_name() -> None:
    assert problem("") == 'node1.cfg: no name: every domain needs one (name="...")'


# ---------------------------------------------------------------------------------------------
# Command-line overrides (xl create CFG KEY=VALUE ...)


def test_overrides_take_numbers_strings_and_bare_words() -> None:
    c = cfg("name='node1'\nmemory=128\nextra='quiet'", "memory=512", "name=node2", "extra+= debug", "rng=1")
    assert (c.name, c.memory_mib, c.cmdline, c.rng) == ("node2", 512, "quietdebug", True)
    assert c.warnings == []  # an override replacing a setting is what it is for


def test_overrides_in_xl_syntax() -> None:
    c = cfg("name='node1'", 'name="node3"', "disk=['/a,,xvda', '/b,,xvdb']", "extra = 'x y'", "memory=0x100")
    assert (c.name, [d.path for d in c.disks], c.cmdline, c.memory_mib) == ("node3", ["/a", "/b"], "x y", 256)


def test_override_bare_words_keep_quotes_backslashes_and_spaces() -> None:
    assert cfg("name='a'", 'extra=say "hi" \\o/').cmdline == 'say "hi" \\o/'
    assert cfg("name='a'", "extra=a\nb").cmdline == "a\nb"
    assert cfg("name='a'", "cpus=0").cpus == {0}


def test_override_errors_come_after_the_files() -> None:
    found = problems("name='a'\nmemroy=1", "vcpus=2", "name=")
    assert found == [
        "node1.cfg:2: unknown key 'memroy' (did you mean 'memory'?)",
        "override 'vcpus=2': vcpus=2: PV domains (User-Mode Linux) have exactly one vCPU; "
        'type="pvh" or "hvm" domains have more',
        "override 'name=': name '': use letters, digits, '.', '_' and '-' (at most 64)",
    ]
    assert problems("name='a'", 'name="x', "memory=", "nothing") == [
        "override 'name=\"x': unterminated string",
        "override 'memory=': memory: '' is not a number (MiB, like 512)",
        "override 'nothing': expected KEY=VALUE, like memory=512 or name=node2",
    ]


# ---------------------------------------------------------------------------------------------
# Disks (xl-disk-configuration(5))


@pytest.mark.parametrize(
    "spec",
    [
        "/img/a.raw,raw,xvda,rw",
        "/img/a.raw,,xvda",
        "/img/a.raw,raw,xvda",
        "/img/a.raw,,xvda,w",
        " /img/a.raw , raw , xvda , rw ",
        "format=raw, vdev=xvda, access=rw, target=/img/a.raw",
        "vdev=xvda,target=/img/a.raw",
        "/img/a.raw,format=raw,xvda,access=rw",
        "/img/a.raw,raw,vdev=xvda,devtype=disk",
        "raw:/img/a.raw,xvda,w",
        "phy:/img/a.raw,xvda,w",
        "file:/img/a.raw,xvda,rw",
        "tap:aio:/img/a.raw,xvda,w",
        "/img/a.raw,raw,xvda,rw,",
    ],
)
def test_disk_spec_forms(spec: str) -> None:
    assert parse_disk(spec) == ("xvda", 0, DiskSpec("/img/a.raw", readonly=False))


@pytest.mark.parametrize("access", ["r", "ro"])
def test_disk_read_only(access: str) -> None:
    assert parse_disk(f"/img/a.raw,raw,xvdb,{access}")[2] == DiskSpec("/img/a.raw", readonly=True)
    assert parse_disk(f"access={access},vdev=xvdb,target=/img/a.raw")[2].readonly


def test_disk_target_by_name_takes_the_rest_commas_and_all() -> None:
    assert parse_disk("vdev=xvda, target=/img/a,b=c.raw")[2].path == "/img/a,b=c.raw"


def test_relative_paths_are_taken_against_the_clients_directory(tmp_path: Path) -> None:
    """The parser runs in the daemon: relative paths are the client's (as with xl), not the daemon's."""
    assert parse_disk("a.raw,,xvda")[2].path == "a.raw"
    text = "name = 'd'\nkernel = 'k/linux'\nramdisk = '../i.img'\ndisk = ['a.raw,,xvda', '/b.raw,,xvdb']\n"
    c = parse_xlcfg(text + "vsock = 'cid=3,uds=v.sock'\n", "d.cfg", cwd=str(tmp_path))
    assert (c.kernel, c.ramdisk) == (f"{tmp_path}/k/linux", f"{tmp_path}/../i.img")
    assert c.disks == [DiskSpec(f"{tmp_path}/a.raw"), DiskSpec("/b.raw")]
    assert c.vsock == VsockSpec(3, f"{tmp_path}/v.sock")
    with pytest.raises(XlCfgError, match="directory /nonexistent/sub does not exist"):
        parse_xlcfg("name = 'd'\nvsock = 'cid=3,uds=sub/v.sock'\n", "d.cfg", cwd="/nonexistent")


@pytest.mark.parametrize(
    ("vdev", "index"),
    [("xvda", 0), ("hda", 0), ("sda", 0), ("vda", 0), ("xvdb", 1), ("hdd", 3), ("sdz", 25), ("vdc", 2)],
)
def test_vdev_names(vdev: str, index: int) -> None:
    assert parse_disk(f"/a,,{vdev}")[:2] == (vdev, index)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("format=qed,vdev=xvda,target=/a", "format qed is not supported by slimvisor (raw, qcow2 and overlay images "
         "only)"),
        ("qcow:/a,xvda,w", "format qcow is not supported by slimvisor (raw, qcow2 and overlay images only)"),
        ("/a,iso,xvda", "unknown format 'iso' (known: raw, overlay, qcow2)"),
        ("/a,,hdc,cdrom,w", "a cdrom is read-only: leave access out or give r"),
        ("raw:/a,hdc:tape,ro", "vdev 'hdc:tape': unknown device type 'tape'"),
        ("/a,raw,xvda,devtype=tape", "devtype 'tape': expected disk or cdrom"),
        ("nbd:host:1234,xvda,w", "nbd: (script=block-nbd) is not supported by slimvisor"),
        ("/a,raw,xvda,rx", "access 'rx': expected r, ro, rw or w"),
        ("/a,raw,xvda,rw,extra", "too many positional parameters at 'extra'"),
        ("/a,raw", "no vdev: say which disk the guest sees (xvda, xvdb, ...)"),
        (",,xvda", "no target: give the image path first, or target=PATH last"),
        ("", "no target: give the image path first, or target=PATH last; no vdev: say which disk the guest sees "
         "(xvda, xvdb, ...)"),
        ("vdev=xvda,target=", "no target: give the image path first, or target=PATH last"),
        ("/a,raw,xvda,format=raw", "format is given twice"),
        ("/a,,xvda,vdev=xvdb", "vdev is given twice"),
        ("/a,,xvda,backendtype=ioemu", "backendtype 'ioemu': expected one of phy, qdisk, tap"),
        ("/a,qcow2,xvda,backendtype=phy", "backendtype=phy serves raw images; qcow2 needs backendtype=qdisk (or none)"),
        ("/a,overlay,xvda,backendtype=qdisk", "backendtype=qdisk serves raw and qcow2 images, not overlay"),
        ("/a,,xvda,discard", "discard is not supported by slimvisor"),
        ("/a,,xvda,backend=1", "backend= is not supported by slimvisor"),
        ("/a,,xvda,speed=fast", "unknown option 'speed' (known: target, format, vdev, access, devtype, backendtype)"),
        ("/a,,xvda16", "vdev xvda16: partitions are numbered 1 to 15"),
        ("/a,,xvdaa", "vdev xvdaa: at most 26 disks (xvda to xvdz)"),
        ("/a,,nvme0n1", "vdev 'nvme0n1': expected xvdX, hdX, sdX or vdX (like xvda), with a partition number or not"),
        ("/a,,XVDA", "vdev 'XVDA': expected xvdX, hdX, sdX or vdX (like xvda), with a partition number or not"),
        ("/a,qcow,xvdaa,rx,speed=1", "unknown option 'speed' (known: target, format, vdev, access, devtype, "
         "backendtype); format qcow is not supported by slimvisor (raw, qcow2 and overlay images only); access 'rx': "
         "expected r, ro, rw or w; vdev xvdaa: at most 26 disks (xvda to xvdz)"),
    ],
)
def test_bad_disk_specs(spec: str, message: str) -> None:
    assert spec_error(parse_disk, spec) == f"disk {spec!r}: {message}"


def test_disks_come_in_vdev_order() -> None:
    c = cfg("name='a'\ndisk=['/c,,xvdc', '/a,,hda', '/b,,sdb']")
    assert [d.path for d in c.disks] == ["/a", "/b", "/c"]


def test_two_disks_on_one_vdev() -> None:
    text = "name='a'\ndisk=['/a,,xvda',\n  '/b,,hda']"
    assert problem(text) == "node1.cfg:3: disk '/b,,hda': vdev hda is the same disk as xvda (node1.cfg:2)"


def test_partitions_and_gaps_follow_xens_device_order() -> None:
    c = cfg("name='a'\ndisk=['/c,,xvdc', '/a1,,xvda1', '/a,,xvda', '/e,,hde2']")
    assert [(d.path, d.vdev) for d in c.disks] == [("/a", "xvda"), ("/a1", "xvda1"), ("/c", "xvdc"), ("/e", "hde2")]
    assert c.source("disk.0") == "node1.cfg:2"


@pytest.mark.parametrize(
    ("spec", "disk"),
    [
        ("/a.qcow2,qcow2,xvda,w", DiskSpec("/a.qcow2", format="qcow2", backend="qsd")),
        ("qcow2:/a.qcow2,xvda,w", DiskSpec("/a.qcow2", format="qcow2", backend="qsd")),
        ("/a.raw,raw,xvda,w,backendtype=qdisk", DiskSpec("/a.raw", backend="qsd")),
        ("phy:/dev/loop0,xvda,w", DiskSpec("/dev/loop0")),
        ("/dev/vg/guest,raw,xvda,w,backendtype=phy", DiskSpec("/dev/vg/guest")),
        ("/a.iso,,hdc,cdrom", DiskSpec("/a.iso", readonly=True)),
        ("file:/a.iso,hdc:cdrom,r", DiskSpec("/a.iso", readonly=True)),
        ("format=raw,vdev=hdc,access=ro,devtype=cdrom,target=/a.iso", DiskSpec("/a.iso", readonly=True)),
    ],
)
def test_xen_storage_forms(spec: str, disk: DiskSpec) -> None:
    assert parse_disk(spec)[2] == disk


def test_every_bad_disk_is_reported() -> None:
    found = problems("name='a'\ndisk=['/a,qcow,xvda', '/b,,hdc,cdrom,w', '/c,raw', '/d,vhd,xvdz,rx']")
    assert [p.split(": ", 2)[2] for p in found] == [
        "format qcow is not supported by slimvisor (raw, qcow2 and overlay images only)",
        "a cdrom is read-only: leave access out or give r",
        "no vdev: say which disk the guest sees (xvda, xvdb, ...)",
        "format vhd is not supported by slimvisor (raw, qcow2 and overlay images only)",
        "access 'rx': expected r, ro, rw or w",
    ]


# ---------------------------------------------------------------------------------------------
# Network interfaces (xl-network-configuration(5))


@pytest.mark.parametrize(
    ("spec", "net"),
    [
        ("mac=52:54:00:12:34:56,bridge=lab0,rate=100Mb/s", NetSpec("lab0", MAC, 12_500_000)),
        ("", NetSpec("xenbr0")),
        ("bridge=lab0", NetSpec("lab0")),
        (" bridge = lab0 , mac = 52:54:00:12:34:56 ,", NetSpec("lab0", MAC)),
        ("bridge=lab0,rate=10MB/s", NetSpec("lab0", None, 10_000_000)),
        ("bridge=lab0,rate=250KB/s", NetSpec("lab0", None, 250_000)),
        ("bridge=lab0,type=vif,script=vif-bridge", NetSpec("lab0")),
        ("bridge=lab0,script=/etc/xen/scripts/vif-bridge", NetSpec("lab0")),
    ],
)
def test_vif_specs(spec: str, net: NetSpec) -> None:
    assert parse_vif(spec) == (net, [])


def test_vif_notes_what_is_accepted_but_not_applied() -> None:
    net, notes = parse_vif("bridge=b,ip=10.0.0.2 fd00::2/64,rate=1MB/s@20ms")
    assert net == NetSpec("b", None, 1_000_000)
    assert notes == [
        "vif 'bridge=b,ip=10.0.0.2 fd00::2/64,rate=1MB/s@20ms': ip= is accepted and not enforced",
        "vif 'bridge=b,ip=10.0.0.2 fd00::2/64,rate=1MB/s@20ms': the @20ms refill interval is ignored "
        "(slimvisor refills continuously)",
    ]
    c = cfg("name='a'\nvif=['bridge=b,ip=10.0.0.2']")
    assert c.warnings == ["node1.cfg:2: vif 'bridge=b,ip=10.0.0.2': ip= is accepted and not enforced"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bridge=b,foo=bar", "unknown option 'foo' (known: mac, bridge, rate, ip, script, type, model)"),
        ("vifname=v1", "vifname= is not supported"),
        ("bridge", "bridge needs a value (bridge=...)"),
        ("bridge=", "bridge needs a value (bridge=...)"),
        ("bridge=a,bridge=b", "bridge is given twice"),
        ("type=netfront", "type=netfront is not supported: expected vif or ioemu"),
        ("script=vif-route", "script vif-route is not supported (a slimvisor switch does what vif-bridge does)"),
        ("mac=52:54:00:12:34", "mac: '52:54:00:12:34' is not a MAC address (like 52:54:00:12:34:56)"),
        ("mac=01:00:5e:00:00:01", "mac: '01:00:5e:00:00:01' is a multicast address"),
        ("rate=fast", "rate 'fast': expected a number with an optional k/M/G unit, e.g. 100M or 10MB/s"),
        ("rate=1MB/s@soon", "rate interval 'soon': expected a time like 20ms, 50000us or 1s"),
        ("ip=10.0.0.300", "ip '10.0.0.300' is not an IP address"),
    ],
)
def test_bad_vif_specs(spec: str, message: str) -> None:
    assert spec_error(parse_vif, spec) == f"vif {spec!r}: {message}"


def test_vifs_in_a_config() -> None:
    c = cfg("name='a'\nvif=['bridge=lab0', 'mac=52:54:00:12:34:56,bridge=lab1', '']")
    assert c.nets == [NetSpec("lab0"), NetSpec("lab1", MAC), NetSpec("xenbr0")]


# ---------------------------------------------------------------------------------------------
# cpus (xl's CPULIST)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("all", None),
        ("2", {2}),
        ("0-3", {0, 1, 2, 3}),
        ("0,2-3", {0, 2, 3}),
        ("0-3,5,^1", {0, 2, 3, 5}),
        ("all,^7", {0, 1, 2, 3, 4, 5, 6}),
        ("all,^5-7", {0, 1, 2, 3, 4}),
        ("all,^7,7", None),
        ("0-7", set(range(8))),
        (" 1 , 3 ", {1, 3}),
    ],
)
def test_cpulist(text: str, cpus: set[int] | None) -> None:
    assert parse_cpulist(text, 8) == cpus


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("^1", "cpus '^1': selects no CPU (to leave some out of all of them, write \"all,^N\")"),
        ("1,^1", "cpus '1,^1': selects no CPU"),
        ("^all", "cpus '^all': selects no CPU"),
        ("8", "cpus '8': this host has CPUs 0-7"),
        ("0-99999999999999999999", "cpus '0-99999999999999999999': this host has CPUs 0-7"),
        ("3-1", "cpus '3-1': range 3-1 goes backwards"),
        ("node:1", "cpus 'node:1': NUMA node selection (node:1) is not supported"),
        ("all,^nodes:0", "NUMA node selection (nodes:0) is not supported"),
        ("", "cpus '': '' is not a CPU, a range like 0-3, all, or ^ before one"),
        ("0,,1", "cpus '0,,1': '' is not a CPU"),
        ("a", "cpus 'a': 'a' is not a CPU"),
        ("-1", "cpus '-1': '-1' is not a CPU"),
    ],
)
def test_bad_cpulists(text: str, message: str) -> None:
    assert message in spec_error(lambda t: parse_cpulist(t, 8), text)


def test_cpus_in_a_config() -> None:
    assert cfg("name='a'\ncpus='0'").cpus == {0}
    assert cfg("name='a'\ncpus=0").cpus == {0}
    assert cfg("name='a'\ncpus=['0']").cpus == {0}
    assert cfg("name='a'\ncpus=[]").cpus is None
    assert cfg("name='a'\ncpus='all'").cpus is None
    assert problem("name='a'\ncpus=['0', '0']") == "node1.cfg:2: cpus: 2 entries pin 2 vCPUs, but vcpus=1"
    assert problem("name='a'\ncpus='^0'").startswith("node1.cfg:2: cpus '^0': selects no CPU")


# ---------------------------------------------------------------------------------------------
# Whatever the text, only the parser's own error


ATOMS = [
    "0", "1", "2", "512", "0x10", "010", "'pv'", "'hvm'", "'node1'", "''", "'all,^1'", "'0-3'", "'^0'", "'0'",
    "'/img/a.raw,raw,xvda,rw'", "'/img/b.raw,,xvdb,ro'", "'format=qcow2,vdev=hdb,target=/x'", "'phy:/a,xvdb:cdrom,w'",
    "'mac=52:54:00:12:34:56,bridge=b,rate=1MB/s@20ms'", "'ip=1.2.3.4,type=ioemu'", "'cid=3,uds=/nonexistent/s'",
    "'destroy'", "'coredump-destroy'", "'4b1e5fe5-2d7c-4e2b-9c3e-0b8f0d1c2a3f'", "'a\\tb'", "'cid=²,uds=/tmp/s'",
    "'rate=²M'", "'-5'", "'--5'", "'+0x10'",
]  # fmt: skip
KEYWORDS = [
    "name", "memory", "maxmem", "vcpus", "kernel", "ramdisk", "extra", "root", "cmdline", "disk", "vif", "cpus", "cap",
    "cpu_weight", "uuid", "vsock", "rng", "balloon", "type", "on_poweroff", "on_crash", "memroy", "bootloader",
]  # fmt: skip
FRAGMENTS = [
    *ATOMS, *KEYWORDS, "=", "+=", " ", "\n", ";", ",", "[", "]", "#", "'", '"', "\\", "08", "-", ".", "(", "'\\x4'",
    "é", "\x00",
]  # fmt: skip
LISTS = st.recursive(
    st.sampled_from(ATOMS), lambda inner: st.lists(inner, max_size=4).map(lambda xs: f"[{', '.join(xs)}]"), max_leaves=6
)
VALUES = st.one_of(st.sampled_from(ATOMS), st.sampled_from(ATOMS), st.sampled_from(ATOMS), LISTS)
STATEMENTS = st.tuples(st.sampled_from(KEYWORDS), st.sampled_from(["=", " += ", " = "]), VALUES).map("".join)


def _check(text: str, overrides: list[str]) -> None:
    try:
        c = parse_xlcfg(text, "f.cfg", overrides)
    except XlCfgError as e:
        assert e.problems and all(p.startswith(("f.cfg:", "f.cfg: ", "override ")) for p in e.problems), e.problems
    else:
        assert isinstance(c, DomainConfig)
        c.to_domain_spec()


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.text(max_size=20), max_size=3))
def test_any_text_gives_a_config_or_the_parsers_error(text: str, overrides: list[str]) -> None:
    _check(text, overrides)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join), max_size=3),
)
def test_any_token_soup_gives_a_config_or_the_parsers_error(text: str, overrides: list[str]) -> None:
    _check(text, overrides)


@settings(max_examples=200, deadline=None)
@given(st.lists(STATEMENTS, max_size=10), st.sampled_from(["\n", "; ", "\n\n# c\n"]), st.lists(STATEMENTS, max_size=2))
def test_any_statements_give_a_config_or_the_parsers_error(
    statements: list[str], separator: str, overrides: list[str]
) -> None:
    _check(separator.join(["name='n'", *statements]), overrides)


@settings(max_examples=100, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
    st.integers(16, 1024),
    st.sampled_from(["'{}'", '"{}"']),
    st.sampled_from(["{}", "0x{:x}", "0{:o}"]),
)
def test_good_values_read_back(name: str, memory: int, quote: str, number: str) -> None:
    c = cfg(f"name = {quote.format(name)}\nmemory = {number.format(memory)}\n")
    assert (c.name, c.memory_mib) == (name, memory)
    c = cfg("name='x'", f"name={name}", f"memory={memory}")
    assert (c.name, c.memory_mib) == (name, memory)


# ---------------------------------------------------------------------------------------------
# Every key xl.cfg(5) documents has an answer (slimvisor.toolstack.xlkeys)


def test_the_key_table_covers_xl_cfg_5_and_renders_docs_xlcfg_md() -> None:
    from slimvisor.toolstack import xlkeys

    documented = [k for k in xlkeys.TABLE if k.documented]
    assert len(documented) == 161  # the top-level items of Xen's docs/man/xl.cfg.5.pod.in
    assert sum(xlkeys.counts().values()) == 161
    doc = Path(__file__).parent.parent / "docs" / "xlcfg.md"
    assert doc.read_text() == xlkeys.render_markdown(), (
        "docs/xlcfg.md is out of date: python -m slimvisor.toolstack.xlkeys > docs/xlcfg.md"
    )


def test_harmless_keys_are_ignored_with_one_warning_each() -> None:
    c = cfg("name='a'\nlocaltime = 0\nacpi = 1\nsdl = 0\nserial = 'none'\nbuilder = 'generic'\nvnc=0\npci = []\n"
            "acpi = 0\n")  # fmt: skip
    assert c.type == "pv"
    assert c.warnings == [
        "node1.cfg:9: acpi is set again (first on line 3); this one counts",
        "node1.cfg:2: localtime is ignored: an HVM guest setting, which xl too ignores for a PV guest (the emulated "
        "RTC); a PV guest keeps UTC",
        "node1.cfg:9: acpi is ignored: an HVM guest setting, which xl too ignores for a PV guest",
        "node1.cfg:4: sdl is ignored: an HVM emulated display setting; a PV domain here has its console only (xl "
        "ignores it for PV)",
        "node1.cfg:5: serial is ignored: an HVM or PVH domain's console is its serial port (ttyS0) already; a PV "
        "one's is its own; both are `slimvisor console`",
        "node1.cfg:7: vnc is ignored: an HVM emulated display setting; a PV domain here has its console only (xl "
        "ignores it for PV)",
        "node1.cfg:8: pci is ignored: there is no PCI passthrough (no IOMMU here)",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("pci = ['0000:01:00.0']", "pci is not supported by slimvisor: there is no PCI passthrough"),
        ("maxvcpus = 2", "maxvcpus is not supported by slimvisor: vCPU hot-plug is not offered"),
        ("builder = 'xen'", 'builder="xen": expected "generic" (type="pv") or "hvm" (type="hvm")'),
        ("builder = 'linux'", 'builder="linux": expected "generic" (type="pv") or "hvm" (type="hvm")'),
        ("seclabel = 'system_u:system_r:domU_t'", "seclabel is not supported by slimvisor: XSM/FLASK labels"),
        ("vcpus = 2", "vcpus=2: PV domains (User-Mode Linux) have exactly one vCPU"),
    ],
)
def test_refused_keys_say_why(line: str, message: str) -> None:
    assert problem(f"name='a'\n{line}\n").startswith(f"node1.cfg:2: {message}")


def test_unknown_keys_are_only_those_xl_cfg_does_not_document() -> None:
    assert problem("name='a'\nlocaltme = 0") == "node1.cfg:2: unknown key 'localtme' (did you mean 'localtime'?)"
    assert problem("name='a'\nvcpu = 1") == "node1.cfg:2: unknown key 'vcpu' (did you mean 'vcpus'?)"


# ---------------------------------------------------------------------------------------------
# Real configurations (tests/data/xlcfg: Xen's examples, libvirt's test data, xen-tools' template),
# each with its origin and its expected outcome in comments


CORPUS = sorted((Path(__file__).parent / "data" / "xlcfg").glob("*.cfg"))


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 15
    for path in CORPUS:
        text = path.read_text()
        assert text.startswith("# origin: "), path.name
        assert "# expect: " in text, path.name


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_outcome(path: Path) -> None:
    text = path.read_text()
    expected = [line.removeprefix("# expect: ") for line in text.splitlines() if line.startswith("# expect: ")]
    try:
        parse_xlcfg(text, path.name, cwd="/")
        found: list[str] = []
    except XlCfgError as e:
        found = [p.removeprefix(f"{path.name}:") for p in e.problems]
    if expected[0].startswith("accepted"):
        assert found == []
    else:
        assert len(found) == len(expected), found
        for got, want in zip(found, expected, strict=True):
            assert got.startswith(want), (got, want)


def test_xen_names_reach_the_guest_and_hvc0_is_the_console() -> None:
    from slimvisor.domain.check import fill_defaults
    from slimvisor.engines.uml.engine import uml_argv

    c = cfg("name='a'\nramdisk='/i'\nextra='root=/dev/xvda1 console=hvc0'\ndisk=['/c,,xvdc','/a,,xvda','/b,,xvda1']")
    spec = c.to_domain_spec()
    fill_defaults(spec)
    assert spec.root is None  # root= is the config's, for the boot initramfs to map
    assert spec.cmdline == "root=/dev/xvda1 console=hvc0 sv.vdevs=xvda,xvda1,xvdc"
    argv = uml_argv(spec, [], [], True)
    assert "console=tty0" in argv and "console=hvc0" not in argv
    plain = cfg("name='a'\nramdisk='/i'\ndisk=['/a,,vda','/b,,vdb']").to_domain_spec()
    fill_defaults(plain)
    assert "sv.vdevs" not in plain.cmdline  # the names are the guest's already
