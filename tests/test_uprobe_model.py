"""The user-probe guest model without a guest: the maple-tree walker on a tree laid out in a fake memory as
6.1 lays out mm_mt, VMAs' offset arithmetic, and user probe specs and ELF symbols (the test programs)."""

from __future__ import annotations

import struct

import pytest

from probed.errors import BadSpec, UnknownSymbol
from probed.guest.insn import NotAnInstructionBoundary, verify_boundary
from probed.guest.linux.maple import MapleError, MapleLayout, _NodeShape, maple_entries
from probed.guest.linux.mm import Vma
from probed.guest.userfile import UserElf, copy_for_saved, is_user_spec, parse_user_spec
from probed.testing.qemu import CACHE
from tests.linux.uprogs import uprog_path

# 6.1 x86_64: struct maple_tree { spinlock_t; unsigned int ma_flags; void *ma_root; }, 256-byte nodes.
LAYOUT = MapleLayout(root=8, node_size=256, range64=_NodeShape(8, 128, 16, 248), arange64=_NodeShape(8, 80, 10, 240))
LEAF, ARANGE = 1, 3


class Memory:
    def __init__(self):
        self.bytes: dict[int, bytes] = {}

    def node(self, address: int, kind: int, pivots: list[int], slots: list[int], end: int) -> int:
        shape = LAYOUT.range64 if kind == LEAF else LAYOUT.arange64
        data = bytearray(256)
        struct.pack_into(f"<{len(pivots)}Q", data, shape.pivots, *pivots)
        struct.pack_into(f"<{len(slots)}Q", data, shape.slots, *slots)
        data[shape.meta] = end  # maple_metadata.end: the last used slot
        self.bytes[address] = bytes(data)
        return address | kind << 3 | 4  # an encoded node: type bits, as mt_mk_node makes it

    def read(self, address: int, length: int):
        yield (address, length)
        for base, data in self.bytes.items():
            if base <= address and address + length <= base + len(data):
                return data[address - base : address - base + length]
        raise AssertionError(f"read of unmapped {address:#x}")


def _run(gen):
    try:
        next(gen)
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


def test_maple_walk_of_a_two_level_tree():
    mem = Memory()
    vmas = [0xFFFF888000100000 + 0x100 * i for i in range(5)]
    # Leaves: [0, 0x400fff] empty, [0x401000, 0x401fff] vma0, [0x402000, 0x7ffff] empty, ... as mm_mt holds gaps.
    left = mem.node(0x1000, LEAF, [0x400FFF, 0x401FFF, 0x4FFFFF, 0x500FFF] + [0] * 11, [0, vmas[0], 0, vmas[1]] + [0] * 12,
                    end=3)
    right = mem.node(0x2000, LEAF, [0x7FF000000FFF, 0x7FF000001FFF, 0xFFFFFFFFFFFFFFFF] + [0] * 12,
                     [vmas[2], vmas[3], 0, vmas[4]] + [0] * 12, end=2)  # vmas[4] past the data end: stale
    root = mem.node(0x3000, ARANGE, [0x500FFF, 0xFFFFFFFFFFFFFFFF] + [0] * 7, [left, right] + [0] * 8, end=1)
    mem.bytes[0x100] = struct.pack("<QQ", 0, root | 2)  # ma_root marks a node with MAPLE_ROOT_NODE
    assert _run(maple_entries(LAYOUT, 0x100, mem.read)) == [
        (0x401000, 0x401FFF, vmas[0]), (0x500000, 0x500FFF, vmas[1]),
        (0x501000, 0x7FF000000FFF, vmas[2]), (0x7FF000001000, 0x7FF000001FFF, vmas[3]),
    ]


def test_maple_empty_tree_and_bad_node():
    mem = Memory()
    mem.bytes[0x100] = struct.pack("<QQ", 0, 0)
    assert _run(maple_entries(LAYOUT, 0x100, mem.read)) == []
    mem.bytes[0x200] = struct.pack("<QQ", 0, 0x3000 | 7 << 3 | 2)
    mem.bytes[0x3000] = bytes(256)
    with pytest.raises(MapleError, match="type 7"):
        _run(maple_entries(LAYOUT, 0x200, mem.read))


def test_vma_offset_arithmetic():
    text = Vma(address=1, start=0x7F0000001000, end=0x7F0000080000, pgoff=1, mm=2, inode=3)
    assert text.address_of(0x9699) == 0x7F0000009699
    assert text.address_of(0x500) is None  # page 0 of the file is another VMA
    assert text.address_of(0x7F000 + 0x1000) is None
    assert text.file_offset(0x7F0000009699) == 0x9699


def test_user_specs():
    assert is_user_spec("/bin/utarget:0x1000") and not is_user_spec("vfs_read+4") and not is_user_spec("0x1000")
    spec = parse_user_spec("/bin/utarget:1a2b")
    assert (spec.path, spec.offset, spec.symbol) == ("/bin/utarget", 0x1A2B, None)
    spec = parse_user_spec("/bin/utarget-pie:uname_len+0x4")
    assert (spec.path, spec.offset, spec.symbol, spec.symbol_offset) == ("/bin/utarget-pie", None, "uname_len", 4)
    assert parse_user_spec("/lib/x.so:add").symbol == "add"  # hex digits only, but a name: a symbol
    with pytest.raises(BadSpec, match="column 14"):
        parse_user_spec("/bin/utarget:utarget+zz")


async def test_symbols_of_a_host_copy_as_file_offsets():
    static, pie = UserElf(uprog_path(CACHE / "linux", "utarget")), UserElf(uprog_path(CACHE / "linux", "utarget-pie"))
    for elf in (static, pie):
        offset = elf.resolve("utarget")
        assert elf.symbolize(offset) == "utarget" and elf.symbolize(offset + 4) == "utarget+0x4"
        (code,) = await elf.read_many([(offset, 5)])
        assert code == bytes.fromhex("488d0437c3")  # lea (%rdi,%rsi),%rax; ret: as compiled, at that offset
    assert static.resolve("utarget") == static.file_offset(0x400000 + static.resolve("utarget"))
    with pytest.raises(UnknownSymbol) as err:
        static.resolve("utarge")
    assert "utarget" in err.value.suggestions
    with pytest.raises(NotAnInstructionBoundary):
        await verify_boundary(static.read_many, "x86_64", "/bin/utarget:utarget+2", "utarget", 2,
                              static.resolve("utarget") + 2)


def test_a_saved_offset_uses_the_copy_only_while_it_agrees(tmp_path, caplog):
    static, pie = uprog_path(CACHE / "linux", "utarget"), uprog_path(CACHE / "linux", "utarget-pie")
    spec = parse_user_spec("/bin/utarget:utarget")
    offset = UserElf(static).resolve("utarget")
    assert copy_for_saved(str(static), spec, offset).symbolize(offset) == "utarget"
    assert UserElf(pie).resolve("utarget") != offset  # a rebuilt copy: the symbol moved
    assert copy_for_saved(str(pie), spec, offset) is None
    assert "not at the saved offset" in caplog.text
    assert copy_for_saved(str(tmp_path / "gone"), spec, offset) is None
    assert copy_for_saved(None, spec, offset) is None
