"""Symbol files (ELF, System.map, kallsyms), probe specs and relocation."""

from __future__ import annotations

import subprocess

import pytest

from probed.errors import BadSpec, NotFound, UnknownSymbol
from probed.guest.symbols import SymbolFile, SymbolStore, parse_file_arg
from probed.testing.qemu import build_guest

SYSTEM_MAP = """ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000040 t helper
ffffffff81000090 W weak_fn
ffffffff810000a0 U undefined_thing
ffffffff81200000 R rodata_table
ffffffff81300000 D data_var
ffffffff81300010 d local_data
ffffffff81400000 b bss_var
ffffffff81400100 A abs_marker
ffffffff81500000 t helper
not a symbol line
"""

# Two files each with a static `helper` (repeated names), a global function, a data object, an absolute
# zero symbol that must be skipped, and a sizeless label in .text.
ELF_A = r"""
static int helper(int x) { return x * 3 + 1; }
int table[16] = {1};
extern int second(int);
void _start(void) { table[1] = helper(table[0]) + second(2); for (;;) {} }
__asm__(".globl abs_zero\n.set abs_zero, 0\n"
        ".text\n.globl bare_label\nbare_label:\n nop\n nop\n ret\n");
"""
ELF_B = r"""
static int helper(int x) { return x - 7; }
int second(int x) { return helper(x) * 2; }
"""


@pytest.fixture(scope="module")
def tiny_elf(tmp_path_factory):
    """A static freestanding x86_64 ELF built with gcc from two C files."""
    d = tmp_path_factory.mktemp("elf")
    (d / "a.c").write_text(ELF_A)
    (d / "b.c").write_text(ELF_B)
    out = d / "tiny.elf"
    subprocess.run(
        ["gcc", "-O1", "-fno-inline", "-nostdlib", "-static", "-no-pie", "-o", str(out), "a.c", "b.c"],
        cwd=d, check=True, capture_output=True,
    )
    return out


def _nm(path):
    """(address, size) per symbol name, as binutils' nm sees them: the reference to compare against."""
    out = subprocess.run(["nm", "-S", str(path)], check=True, capture_output=True, text=True).stdout
    seen = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            seen.setdefault(parts[3], []).append((int(parts[0], 16), int(parts[1], 16)))
    return seen

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


def test_a_gcc_built_elf(tiny_elf):
    nm = _nm(tiny_elf)
    store = SymbolStore()
    sf = store.add_file(tiny_elf)
    assert sf.name == "tiny" and sf.bias == 0
    names = {s.name for s in sf.symbols()}
    assert "abs_zero" not in names
    start = store.lookup("_start")
    assert (start.address, start.size, start.kind, start.file) == (*nm["_start"][0], "code", "tiny")
    table = store.lookup("table")
    assert (table.address, table.size, table.kind) == (nm["table"][0][0], 64, "data")
    # Two static helpers: both listed, the first by address wins a plain lookup.
    helpers = [s for s in store.functions("helper")]
    assert sorted((s.address, s.size) for s in helpers) == sorted(nm["helper"])
    assert store.lookup("helper").address == min(a for a, _ in nm["helper"])
    # A label without a size extends to the next symbol.
    label = store.lookup("bare_label")
    assert label.kind == "code" and label.size >= 3
    assert store.symbolize(label.address + 2) == "bare_label+0x2"
    with pytest.raises(BadSpec, match="data, not code"):
        store.resolve("table")
    loc, size = store.resolve_data("table")
    assert (loc.symbol, loc.address, size) == ("table", table.address, 64)
    loc, size = store.resolve_data("table+8")
    assert (loc.offset, loc.address, size) == (8, table.address + 8, 0)
    with pytest.raises(BadSpec, match="past the end"):
        store.resolve_data("table+64")


def test_a_stripped_elf_says_so(tiny_elf, tmp_path):
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["strip", "-o", str(stripped), str(tiny_elf)], check=True)
    with pytest.raises(BadSpec, match="no symbol table"):
        SymbolFile.load(stripped)


def test_system_map_kinds_sizes_and_duplicates(tmp_path):
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    store = SymbolStore()
    sf = store.add_file(path, name="vmlinux")
    assert store.files() == [sf] and sf.name == "vmlinux"
    kinds = {s.name: s.kind for s in sf.symbols()}
    assert kinds == {
        "_text": "code", "startup_64": "code", "helper": "code", "weak_fn": "code", "rodata_table": "data",
        "data_var": "data", "local_data": "data", "bss_var": "data", "abs_marker": "data",
    }
    assert store.lookup("startup_64").size == 0x40
    assert store.lookup("weak_fn").size == 0x200000 - 0x90
    assert store.lookup("helper").address == 0xFFFFFFFF81000040
    assert store.lookup("data_var").size == 0x10
    # Two code names at one address: the one with fewer leading underscores names it.
    assert store.symbolize(0xFFFFFFFF81000004) == "startup_64+0x4"
    assert store.symbolize(0xFFFFFFFF81000040) == "helper"
    assert store.symbolize(0xFFFFFFFF80000000) is None


def test_specs(kallsyms):
    store = SymbolStore()
    store.add_file(kallsyms)
    base = 0xFFFFFFFF81000100
    assert store.resolve("do_sys_openat2").address == base
    assert store.resolve("do_sys_openat2+16").address == base + 16
    assert store.resolve("do_sys_openat2+0x7f").offset == 0x7F
    assert store.resolve(" kallsyms:do_sys_openat2+0x10 ").file == "kallsyms"
    assert store.resolve("0xffffffff81000104").address == base + 4
    loc = store.resolve("kallsyms:0x1234")
    assert (loc.file, loc.symbol, loc.address) == ("kallsyms", None, 0x1234)
    for spec, reason in [
        ("do_sys_openat2+0x80", "past the end"),
        ("do_sys_openat2+zz", "bad offset"),
        ("do_sys_openat2+", "bad offset"),
        ("do_sys_openat2+-4", "must not be negative"),
        ("0xzz", "bad address"),
        ("+4", "expected sym"),
        ("1234", "expected sym"),
        ("jiffies", "data, not code"),
    ]:
        with pytest.raises(BadSpec, match=reason):
            store.resolve(spec)
    with pytest.raises(UnknownSymbol, match="in kallsyms"):
        store.resolve("kallsyms:nothing_here")


def test_files_that_are_not_symbol_files(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\nworld\n")
    with pytest.raises(BadSpec, match="no symbols found"):
        SymbolStore().add_file(junk)
    with pytest.raises(NotFound, match="symbol file"):
        SymbolStore().add_file(tmp_path / "missing.map")
    hidden = tmp_path / "kallsyms"
    hidden.write_text("0000000000000000 T _text\n0000000000000000 T startup_64\n")
    with pytest.raises(BadSpec, match="as root"):
        SymbolStore().add_file(hidden)
    damaged = tmp_path / "damaged.elf"
    damaged.write_bytes(b"\x7fELF" + bytes(10))
    with pytest.raises(BadSpec, match="cannot read symbols"):
        SymbolStore().add_file(damaged)


def test_loading_and_suggesting_among_100k_symbols(tmp_path):
    # Exact answers at kernel scale; how fast is bench/'s business, not a timed test's.
    path = tmp_path / "System.map"
    words = ["do", "sys", "open", "read", "ext4", "inode", "page", "alloc", "lock", "irq", "sched", "task"]
    with path.open("w") as f:
        for i in range(100_000):
            name = "_".join(words[(i >> k) % len(words)] for k in (0, 3, 6)) + f"_{i}"
            f.write(f"{0xffffffff81000000 + 16 * i:016x} T {name}\n")
    store = SymbolStore()
    store.add_file(path)
    target = store.lookup("irq_alloc_do_12345")
    assert target.address == 0xFFFFFFFF81000000 + 16 * 12345
    with pytest.raises(UnknownSymbol) as info:
        store.lookup("irq_aloc_do_12345")
    assert info.value.suggestions[0] == "irq_alloc_do_12345"


def test_a_symbol_file_short_name_keeps_its_version(tmp_path):
    dump = tmp_path / "kallsyms-6.1.0-57-amd64.txt"
    dump.write_text("ffffffff81000000 T _stext\nffffffff81363fa0 T do_sys_openat2\n")
    store = SymbolStore()
    sf = store.add_file(dump)
    assert sf.name == "kallsyms-6.1.0-57-amd64"
    assert store.resolve("kallsyms-6.1.0-57-amd64:do_sys_openat2").address == 0xFFFFFFFF81363FA0
    sysmap = tmp_path / "System.map-6.1.0-57-amd64"
    sysmap.write_text("ffffffff81000000 T _stext\n")
    assert store.add_file(sysmap).name == "System.map-6.1.0-57-amd64"
