"""Target descriptions and register blocks, from hand-written XML."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsp.arch import ARCHES, UnknownRegister, arch_for
from rsp.registers import RegisterLayout
from rsp.tdesc import TargetDescriptionError, includes_of, parse_target_description

TARGET = """<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target><architecture>i386</architecture><xi:include href="core.xml"/><xi:include href="extra.xml"/></target>"""
CORE = """<feature name="org.gnu.gdb.i386.core">
  <reg name="eax" bitsize="32" type="int32"/>
  <reg name="ecx" bitsize="32"/>
  <reg name="esp" bitsize="32" type="data_ptr"/>
  <reg name="eip" bitsize="32" type="code_ptr" regnum="8"/>
  <reg name="st0" bitsize="80" type="i387_ext"/>
</feature>"""
EXTRA = """<feature name="org.example.extra"><reg name="extra" bitsize="16" group="system"/></feature>"""
DOCS = {"target.xml": TARGET, "core.xml": CORE, "extra.xml": EXTRA}


def test_includes_and_register_numbers_continue():
    assert includes_of(TARGET) == ["core.xml", "extra.xml"]
    tdesc = parse_target_description(DOCS)
    assert tdesc.architecture == "i386"
    assert tdesc.features == ("org.gnu.gdb.i386.core", "org.example.extra")
    rows = [(r.name, r.regnum, r.bitsize, r.offset) for r in tdesc.registers]
    assert rows == [("eax", 0, 32, 0), ("ecx", 1, 32, 4), ("esp", 2, 32, 8), ("eip", 8, 32, 12),
                    ("st0", 9, 80, 16), ("extra", 10, 16, 26)]
    assert tdesc.register("extra").group == "system"
    with pytest.raises(TargetDescriptionError, match="no register 'nope'"):
        tdesc.register("nope")


def test_a_missing_include_is_an_error():
    with pytest.raises(TargetDescriptionError, match="includes 'extra.xml'"):
        parse_target_description({"target.xml": TARGET, "core.xml": CORE})
    with pytest.raises(TargetDescriptionError, match="malformed"):
        parse_target_description({"target.xml": "<target><reg"})


def test_arch_aliases_and_arguments():
    tdesc = parse_target_description(DOCS)
    arch = arch_for(tdesc)
    assert arch.name == "i386" and arch.pc == "eip"
    assert arch.resolve_register("%ax") == "eax"
    assert arch.resolve_register("esp") == "esp"
    with pytest.raises(UnknownRegister, match="unknown register %rdi"):
        arch.resolve_register("%rdi")
    assert arch.arg_location(1) == ("stack", 4)
    assert ARCHES["x86_64"].arg_location(2) == ("reg", "rsi")
    assert ARCHES["x86_64"].arg_location(8) == ("stack", 16)


def test_layout_fast_path_agrees_with_construct():
    layout = RegisterLayout(parse_target_description(DOCS))
    g = bytes(range(28)).hex().encode()
    full = layout.decode(g)
    assert full["eip"] == int.from_bytes(bytes(range(12, 16)), "little")
    for name in full:
        assert layout.value(g, name) == full[name]
    # A shorter block (QEMU sends only its core registers) leaves the rest absent.
    assert "extra" not in layout.decode(g[:52])
    assert layout.value(g[:52], "extra") is None
    # Unavailable registers ('xx') are None.
    assert layout.decode(b"xxxxxxxx" + g[8:])["eax"] is None
    assert layout.encode_p("eip", 0x100026) == b"26001000"


@given(st.binary(min_size=28, max_size=28))
def test_g_blocks_round_trip(block):
    layout = RegisterLayout(parse_target_description(DOCS))
    g = block.hex().encode()
    assert layout.encode(layout.decode(g), 28) == g
