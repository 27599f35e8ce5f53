"""Symbol files (ELF, System.map, kallsyms), probe specs and relocation."""

from __future__ import annotations

import pytest

from probed.errors import BadSpec, NotFound, UnknownSymbol
from probed.qemu import build_guest
from probed.symbols import SymbolStore, parse_file_arg

KALLSYMS = """ffffffff81000000 T _stext
ffffffff81000100 T do_sys_openat2
ffffffff81000180 t do_sys_open_helper
ffffffff81000200 T __x64_sys_openat
ffffffff82000000 D jiffies
ffffffff82000008 B some_bss
ffffffffc0001000 t ext4_readdir\t[ext4]
ffffffffc0001100 t ext4_release\t[ext4]
"""


@pytest.fixture
def kallsyms(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    return path


def test_elf_symbols_of_the_guest():
    store = SymbolStore()
    store.add_file(build_guest("i386"))
    target = store.lookup("probe_target")
    assert target.kind == "code" and target.size > 0 and target.file == "guest"
    assert store.lookup("calls").kind == "data"
    assert store.lookup("reg_change_insn").size == 6
    assert store.symbolize(target.address + 3) == "probe_target+0x3"
    loc = store.resolve("guest:probe_target+3")
    assert (loc.file, loc.symbol, loc.offset, loc.address) == ("guest", "probe_target", 3, target.address + 3)
    with pytest.raises(BadSpec, match="past the end"):
        store.resolve(f"probe_target+{target.size}")
    with pytest.raises(BadSpec, match="data, not code"):
        store.resolve("calls")


def test_kallsyms_sizes_kinds_and_close_matches(kallsyms):
    store = SymbolStore()
    store.add_file(kallsyms)
    sym = store.lookup("do_sys_openat2")
    assert (sym.address, sym.size, sym.kind) == (0xFFFFFFFF81000100, 0x80, "code")
    assert store.lookup("jiffies").kind == "data"
    assert store.lookup("ext4_readdir").size == 0x100
    with pytest.raises(UnknownSymbol) as info:
        store.lookup("do_sys_opnat2")
    assert info.value.suggestions[0] == "do_sys_openat2"
    assert "did you mean do_sys_openat2" in str(info.value)
    assert [s.name for s in store.functions("do_sys_*")] == ["do_sys_openat2", "do_sys_open_helper"]
    assert store.resolve("0xffffffff81000104").symbol is None


def test_relocation_moves_locations(kallsyms):
    store = SymbolStore()
    store.add_file(kallsyms, bias=0x1000)
    loc = store.resolve("kallsyms:do_sys_openat2+0x10")
    assert loc.address == 0xFFFFFFFF81000110 + 0x1000
    store.set_bias("kallsyms", 0x200000)
    assert store.relocate(loc).address == 0xFFFFFFFF81000110 + 0x200000
    assert store.symbolize(0xFFFFFFFF81000110 + 0x200000) == "do_sys_openat2+0x10"
    with pytest.raises(NotFound, match="symbol file 'nope'"):
        store.resolve("nope:do_sys_openat2")


def test_a_big_system_map_loads(tmp_path):
    path = tmp_path / "System.map"
    with path.open("w") as f:
        for i in range(100_000):
            f.write(f"{0xffffffff81000000 + 16 * i:016x} {'T' if i % 3 else 'd'} sym_{i:06d}\n")
    store = SymbolStore()
    store.add_file(path)
    assert store.lookup("sym_099999").address == 0xFFFFFFFF81000000 + 16 * 99999
    with pytest.raises(UnknownSymbol) as info:
        store.lookup("sym_09999x")
    assert "sym_099999" in info.value.suggestions


def test_file_args():
    assert parse_file_arg("vmlinux@0x1000") == ("vmlinux", 0x1000)
    assert parse_file_arg("System.map") == ("System.map", 0)
    with pytest.raises(BadSpec):
        parse_file_arg("x@zz")
