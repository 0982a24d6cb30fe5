"""Memory sizes: one parser and one formatter (model/units.py), bytes inside."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimvisor.model import units
from slimvisor.model.spec import SpecError, parse_size_mib


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("256", 256 << 20), ("256M", 256 << 20), ("256MiB", 256 << 20), ("1g", 1 << 30), ("262144K", 256 << 20),
     (" 2 GB ", 2 << 30), ("1T", 1 << 40)],
)
def test_sizes_as_xl_writes_them(text, nbytes):
    assert units.parse_size(text, "memory") == nbytes


def test_bad_sizes_name_what_and_why():
    with pytest.raises(units.SizeError, match=r"memory: '12Q' is not a size \(examples"):
        units.parse_size("12Q", "memory")
    with pytest.raises(units.SizeError, match="size: '1025K' is not a whole number of MiB"):
        units.parse_size("1025K", "size", multiple_of=units.MiB)
    with pytest.raises(units.SizeError, match="is not a whole number of 4 KiB"):
        units.parse_size("6K", "target", multiple_of=units.PAGE)
    with pytest.raises(SpecError, match="--memory: '1025K' is not a whole number of MiB"):
        parse_size_mib("1025K", "--memory")  # the spec's parser: a SpecError, as its callers expect


@given(st.integers(0, 1 << 50))
def test_formatting_parses_back(nbytes):
    text = units.format_size(nbytes)
    if text.endswith(" bytes"):
        assert int(text.split()[0]) == nbytes
    else:
        assert units.parse_size(text.replace(" ", "").removesuffix("B").removesuffix("i"), "x") == nbytes


def test_conversions_at_the_edges():
    assert units.format_size(256 << 20) == "256 MiB" and units.format_size(1536 << 20) == "1536 MiB"
    assert (units.kib(256 << 20), units.mib(256 << 20), units.pages(256 << 20)) == (262144, 256, 65536)
