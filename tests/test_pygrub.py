"""pygrub-style boot's parsing: guest boot configurations are hostile input (a real guest boots
through it in tests/test_hvm.py)."""

from __future__ import annotations

import struct

import pytest

from slimvisor.domain.pygrub import (
    MAX_ENTRIES,
    SECTOR,
    Entry,
    _inner,
    choose,
    parse_args,
    parse_grub2,
    parse_legacy,
    partitions,
)
from slimvisor.model.spec import SpecError

DEBIAN_GRUB_CFG = """\
set default="1"
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
fi
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option 'gnulinux-simple-1' {
	load_video
	insmod ext2
	search --no-floppy --fs-uuid --set=root 0b4c
	echo	'Loading Linux 6.1.0-57-cloud-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-57-cloud-amd64 root=UUID=0b4c ro  quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-57-cloud-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-1' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-57-cloud-amd64 (recovery mode)' --class debian {
		linux	/boot/vmlinuz-6.1.0-57-cloud-amd64 root=UUID=0b4c ro single
		initrd	/boot/initrd.img-6.1.0-57-cloud-amd64
	}
}
"""


def test_debian_grub_cfg_with_a_submenu() -> None:
    entries, default = parse_grub2(DEBIAN_GRUB_CFG)
    assert default == "1"
    assert [e.title for e in entries] == [
        "Debian GNU/Linux", "Debian GNU/Linux, with Linux 6.1.0-57-cloud-amd64 (recovery mode)"]  # fmt: skip
    assert entries[0] == Entry("Debian GNU/Linux", "/boot/vmlinuz-6.1.0-57-cloud-amd64",
                               "/boot/initrd.img-6.1.0-57-cloud-amd64", "root=UUID=0b4c ro  quiet")  # fmt: skip
    assert choose(entries, default, None).args.endswith("single")  # set default="1"
    assert choose(entries, default, "0").title == "Debian GNU/Linux"
    assert choose(entries, default, "Debian GNU/Linux").kernel.endswith("amd64")
    with pytest.raises(SpecError, match=r"bootloader_args: no entry 'nope' \(entries: Debian GNU/Linux, "):
        choose(entries, default, "nope")


def test_grub_legacy_menu_lst() -> None:
    text = "default 1\ntimeout 5\ntitle old\n  root (hd0,0)\n  kernel /vmlinuz-old root=/dev/xvda1 ro\n" \
           "title new\n  kernel /vmlinuz-new root=/dev/xvda1\n  initrd /initrd-new\n"  # fmt: skip
    entries, default = parse_legacy(text)
    assert choose(entries, default, None) == Entry("new", "/vmlinuz-new", "/initrd-new", "root=/dev/xvda1")
    assert entries[0].initrd is None and entries[0].args == "root=/dev/xvda1 ro"


def test_no_entries_and_too_many() -> None:
    with pytest.raises(SpecError, match="the guest's boot configuration has no bootable entry"):
        choose(*parse_grub2("set default=0\nmenuentry 'x' {\n echo no kernel\n}\n"), None)
    flood = "".join(f"menuentry 'e{i}' {{\n linux /k{i}\n}}\n" for i in range(MAX_ENTRIES + 50))
    assert len(parse_grub2(flood)[0]) == MAX_ENTRIES


def test_partitions_from_the_mbr() -> None:
    mbr = bytearray(SECTOR)
    mbr[510:512] = b"\x55\xaa"
    for slot, (kind, start) in enumerate([(0x82, 63), (0x83, 2048), (0x83, 4096)]):
        mbr[446 + slot * 16 + 4] = kind
        struct.pack_into("<I", mbr, 446 + slot * 16 + 8, start)
    assert partitions(bytes(mbr)) == [2048 * SECTOR, 4096 * SECTOR]  # Linux ones only, in order
    assert partitions(bytes(SECTOR)) == [0]  # no table: the filesystem is the whole disk


def test_paths_from_the_guest_are_checked() -> None:
    assert _inner("(hd0,msdos1)/boot/vmlinuz", "") == "/boot/vmlinuz"
    assert _inner("/boot/vmlinuz-6.1", "/boot") == "/vmlinuz-6.1"  # a separate /boot partition
    for hostile in ("vmlinuz", "/boot/a b", "/boot/x\nwrite /etc/x", '/a"b'):
        with pytest.raises(SpecError, match="is not a path on the guest's disk"):
            _inner(hostile, "")


def test_bootloader_args() -> None:
    assert parse_args(["--entry=1", "--args=quiet"]) == {"entry": "1", "args": "quiet"}
    with pytest.raises(SpecError, match="bootloader_args: '-q': expected --entry=N"):
        parse_args(["-q"])
