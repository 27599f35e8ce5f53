"""Target descriptions and the arch table, from small hand-written XML (the live QEMU ones: test_registers)."""

from __future__ import annotations

import pytest

from rsp.arch import ARCHES, UnknownArchitecture, UnknownRegister, arch_for
from rsp.tdesc import TargetDescriptionError, includes_of, parse_target_description

# Shaped like QEMU's: no xmlns:xi declaration, the core feature first, an extra feature after it.
TARGET = """<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target><architecture>i386</architecture><osabi>none</osabi>
<xi:include href="core.xml"/><xi:include href="extra.xml"/></target>"""
CORE = """<?xml version="1.0"?>
<feature name="org.gnu.gdb.i386.core">
  <flags id="i386_eflags" size="4"><field name="CF" start="0" end="0"/></flags>
  <reg name="eax" bitsize="32" type="int32"/>
  <reg name="ecx" bitsize="32"/>
  <reg name="esp" bitsize="32" type="data_ptr"/>
  <reg name="eip" bitsize="32" type="code_ptr" regnum="8"/>
  <reg name="eflags" bitsize="32" type="i386_eflags"/>
  <reg name="st0" bitsize="80" type="i387_ext" group="float"/>
</feature>"""
EXTRA = """<feature name="org.example.extra">
  <vector id="v4i32" type="int32" count="4"/>
  <reg name="extra" bitsize="16" group="system"/>
  <reg name="wide" bitsize="128" type="v4i32" regnum="40"/>
</feature>"""
DOCS = {"target.xml": TARGET, "core.xml": CORE, "extra.xml": EXTRA}


def test_includes_of_lists_hrefs_in_document_order():
    assert includes_of(TARGET) == ["core.xml", "extra.xml"]
    assert includes_of(CORE) == []


def test_register_numbers_continue_across_features_and_includes():
    tdesc = parse_target_description(DOCS)
    assert (tdesc.architecture, tdesc.osabi) == ("i386", "none")
    assert tdesc.features == ("org.gnu.gdb.i386.core", "org.example.extra")
    rows = [(r.name, r.regnum, r.bitsize, r.type, r.offset) for r in tdesc.registers]
    assert rows == [
        ("eax", 0, 32, "int32", 0),
        ("ecx", 1, 32, "int", 4),
        ("esp", 2, 32, "data_ptr", 8),
        ("eip", 8, 32, "code_ptr", 12),
        ("eflags", 9, 32, "i386_eflags", 16),
        ("st0", 10, 80, "i387_ext", 20),
        # The second feature continues the numbering but is not in g (QEMU sends only its core feature).
        ("extra", 11, 16, "int", None),
        ("wide", 40, 128, "v4i32", None),
    ]
    assert tdesc.g_size == 30
    assert tdesc.register("st0").group == "float"
    assert tdesc.register("extra").feature == "org.example.extra"


def test_an_unknown_register_is_a_key_error_listing_the_names():
    tdesc = parse_target_description(DOCS)
    with pytest.raises(
        UnknownRegister, match="unknown register %nope on i386; valid: eax, ecx, esp, eip"
    ) as info:
        tdesc.register("nope")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, TargetDescriptionError)
    assert info.value.valid[-1] == "wide"


def test_features_inline_in_target_xml():
    text = """<target><architecture>riscv:rv64</architecture>
      <feature name="a"><reg name="pc" bitsize="64" regnum="32"/></feature>
      <feature name="b"><reg name="fcsr" bitsize="32"/></feature></target>"""
    tdesc = parse_target_description({"target.xml": text})
    assert [(r.name, r.regnum, r.offset) for r in tdesc.registers] == [("pc", 32, 0), ("fcsr", 33, None)]


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ({"target.xml": TARGET, "core.xml": CORE}, "target.xml includes 'extra.xml', which was not provided"),
        ({"core.xml": CORE}, "the root document 'target.xml' was not provided"),
        ({"target.xml": "<target><reg"}, "target.xml: malformed XML"),
        ({"target.xml": '<target><feature name="f"><reg bitsize="8"/></feature></target>'}, "without name"),
        (
            {"target.xml": '<target><feature name="f"><reg name="a" bitsize="x"/></feature></target>'},
            "bad bitsize",
        ),
        (
            {"target.xml": '<target><feature name="f"><reg name="a" bitsize="0"/></feature></target>'},
            "out of range",
        ),
        (
            {
                "target.xml": '<target><feature name="f"><reg name="a" bitsize="8"/><reg name="a" bitsize="8"/>'
                "</feature></target>"
            },
            "'a' .number 1. is described twice",
        ),
        ({"target.xml": '<target><xi:include href="target.xml"/></target>'}, "nested deeper"),
    ],
)
def test_bad_descriptions_are_typed_errors(documents, message):
    with pytest.raises(TargetDescriptionError, match=message):
        parse_target_description(documents)


def test_arch_for_takes_register_names_from_the_description():
    arch = arch_for(parse_target_description(DOCS))
    assert (arch.name, arch.pc, arch.sp, arch.word_size, arch.breakpoint_kind) == ("i386", "eip", "esp", 4, 1)
    assert arch.registers[:3] == ("eax", "ecx", "esp")
    assert arch.resolve_register("%ax") == "eax"
    assert arch.resolve_register("ip") == "eip"
    assert arch.resolve_register("%flags") == "eflags"
    assert arch.resolve_register("esp") == "esp"
    # This description has no ebx: its alias is dropped rather than answering a register it cannot read.
    with pytest.raises(UnknownRegister, match="unknown register %bx on i386"):
        arch.resolve_register("%bx")
    with pytest.raises(UnknownRegister, match="valid: eax, ecx"):
        arch.resolve_register("%rdi")


def test_unknown_architecture():
    text = '<target><architecture>mips</architecture><feature name="f"><reg name="a" bitsize="32"/></feature></target>'
    with pytest.raises(
        UnknownArchitecture, match="'mips'; supported: i386, i386:x86-64, aarch64, riscv:rv64"
    ):
        arch_for(parse_target_description({"target.xml": text}))


@pytest.mark.parametrize(
    ("arch", "n", "where"),
    [
        # i386 cdecl: the return address at sp, argument 1 at sp+4.
        ("i386", 1, ("stack", 4)),
        ("i386", 3, ("stack", 12)),
        ("x86_64", 1, ("reg", "rdi")),
        ("x86_64", 6, ("reg", "r9")),
        ("x86_64", 7, ("stack", 8)),
        ("x86_64", 8, ("stack", 16)),
        ("aarch64", 8, ("reg", "x7")),
        # The return address is in a register on aarch64 and riscv: the first stacked argument is at sp.
        ("aarch64", 9, ("stack", 0)),
        ("riscv64", 1, ("reg", "a0")),
        ("riscv64", 10, ("stack", 8)),
    ],
)
def test_argument_locations_at_function_entry(arch, n, where):
    assert ARCHES[arch].arg_location(n) == where


def test_argument_numbers_start_at_one():
    with pytest.raises(ValueError, match="counted from 1"):
        ARCHES["x86_64"].arg_location(0)


@pytest.mark.parametrize(
    ("arch", "alias", "name"),
    [
        ("x86_64", "%di", "rdi"),
        ("x86_64", "di", "rdi"),
        ("x86_64", "rdi", "rdi"),
        ("x86_64", "%r8", "r8"),
        ("x86_64", "ip", "rip"),
        ("x86_64", "sp", "rsp"),
        ("x86_64", "flags", "eflags"),
        ("i386", "%sp", "esp"),
        ("aarch64", "%lr", "x30"),
        ("aarch64", "fp", "x29"),
        ("riscv64", "x10", "a0"),
        ("riscv64", "s0", "fp"),
        ("riscv64", "%x8", "fp"),
    ],
)
def test_kprobe_event_aliases(arch, alias, name):
    assert ARCHES[arch].resolve_register(alias) == name
