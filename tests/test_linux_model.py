"""The Linux guest model's pure parts, without QEMU: kallsyms tables made up in the kernel's layout, the
host's symbol cache, struct module's core_kallsyms by its shape, and module probe specs."""

from __future__ import annotations

import struct

import pytest

from probed.guest.linux.kallsyms import KallsymsError, read_kallsyms
from probed.guest.linux.kaslr import find_kernel_text
from probed.guest.linux.memory import BytesMemory
from probed.guest.linux.modules import ModuleTracker, find_core_kallsyms
from probed.guest.linux.symcache import SymbolCache

TEXT = 0xFFFF_FFFF_A200_0000  # a slid _text
TABLES_AT = TEXT + 0x10_0000 - 16  # so that the 32 KiB sample at +1 MiB falls inside kallsyms_offsets


def _align8(data: bytearray) -> None:
    data += b"\0" * (-len(data) % 8)


def make_kallsyms(symbols: list[tuple[str, str, int]], absolute: list[tuple[str, str, int]], *,
                  seqs: bool = True) -> bytes:
    """kallsyms tables as scripts/kallsyms.c lays them out (6.1), starting at TABLES_AT.

    Tokens: token i is the character i (1..255), token 0 is "__"; names are spelled one character a token
    except that a leading "__" uses token 0.
    """
    entries = [(kind, name, value, True) for name, kind, value in absolute]
    entries += [(kind, name, address, False) for name, kind, address in sorted(symbols, key=lambda s: s[2])]
    out = bytearray()
    for _, _, value, is_abs in entries:
        out += struct.pack("<i", value if is_abs else -1 - (value - TEXT))
    _align8(out)
    out += struct.pack("<Q", TEXT)
    out += struct.pack("<I", len(entries))
    _align8(out)
    names = bytearray()
    starts = []
    for kind, name, _, _ in entries:
        starts.append(len(names))
        if name.startswith("__"):
            tokens = [ord(kind), 0] + [ord(c) for c in name[2:]]
        else:
            tokens = [ord(c) for c in kind + name]
        names += bytes([len(tokens)]) + bytes(tokens)
    out += names
    _align8(out)
    for i in range(0, len(entries), 256):
        out += struct.pack("<I", starts[i])
    _align8(out)
    if seqs:
        out += b"\0" * (3 * len(entries))
        _align8(out)
    table = bytearray()
    index = []
    for i in range(256):
        index.append(len(table))
        table += (b"__" if i == 0 else bytes([i])) + b"\0"
    out += table
    _align8(out)
    out += struct.pack("<256H", *index)
    return bytes(out) + b"\0" * 0x4_0000  # more .rodata after the tables (the reader reads in big chunks)


def _symbols(n: int = 1500) -> list[tuple[str, str, int]]:
    syms = [("_text", "T", TEXT), ("startup_64", "T", TEXT)]
    syms += [(f"func_{i}", "t" if i % 3 else "T", TEXT + 0x1000 + 0x40 * i) for i in range(n)]
    syms += [("__do_sys_thing", "T", TEXT + 0x9_0000), ("jiffies", "D", TEXT + 0x20_0000)]
    return syms


def _memory(tables: bytes) -> BytesMemory:
    # The first 2 MiB slot of the kernel window that is mapped is _text: nothing below it.
    return BytesMemory([(TEXT, b"\xcc" * (TABLES_AT - TEXT)), (TABLES_AT, tables)])


@pytest.mark.parametrize("seqs", [True, False], ids=["6.1.y-with-seqs", "6.1-without"])
async def test_tables_are_found_and_decoded(seqs):
    symbols, absolute = _symbols(), [("fixed_percpu_data", "A", 0), ("cpu_number", "D", 0x2_0000)]
    memory = _memory(make_kallsyms(symbols, absolute, seqs=seqs))
    assert await find_kernel_text(memory) == TEXT
    seen = []
    table = await read_kallsyms(memory, TEXT, progress=lambda done, total: seen.append((done, total)))
    assert sorted(table.symbols) == sorted((n, k, a) for n, k, a in symbols)
    assert table.absolute == [(n, k, v) for n, k, v in absolute]
    assert table.tables.offsets == TABLES_AT and table.tables.num_syms == len(symbols) + len(absolute)
    assert seen and seen[-1][0] == seen[-1][1]  # progress reaches its end


async def test_no_tables_is_an_error():
    memory = BytesMemory([(TEXT, b"\xcc" * 0x20_0000)])
    with pytest.raises(KallsymsError, match="no kallsyms_offsets table"):
        await read_kallsyms(memory, TEXT)


async def test_damaged_markers_are_an_error():
    tables = bytearray(make_kallsyms(_symbols(), []))
    table = await read_kallsyms(_memory(bytes(tables)), TEXT)
    tables[table.tables.markers - TABLES_AT + 4] ^= 0x01  # the second marker
    with pytest.raises(KallsymsError, match="kallsyms_markers"):
        await read_kallsyms(_memory(bytes(tables)), TEXT)


async def test_cache_round_trip_at_another_slide(tmp_path):
    symbols = _symbols()
    tables = make_kallsyms(symbols, [("fixed_percpu_data", "A", 0)])
    banner = b"Linux version 6.1.0-test (probed) #1 SMP\n\0"
    memory = BytesMemory([(TEXT, b"\xcc" * (TABLES_AT - TEXT)), (TABLES_AT, tables), (TEXT + 0x20_0000, banner)])
    table = await read_kallsyms(memory, TEXT)
    cache = SymbolCache(tmp_path)
    assert await cache.lookup(memory, TEXT) is None
    cache.store(table, banner, TEXT + 0x20_0000)
    hit = await cache.lookup(memory, TEXT)
    assert hit is not None and sorted(hit.symbols) == sorted(table.symbols) and hit.absolute == table.absolute
    # The same build at another slide: the cache matches by offsets from _text.
    moved = BytesMemory([(a + 0x20_0000, d) for a, d in memory.regions])
    again = await cache.lookup(moved, TEXT + 0x20_0000)
    assert again is not None
    assert sorted(a for _, _, a in again.symbols) == sorted(a + 0x20_0000 for _, _, a in table.symbols)
    # Another build (another banner) does not match.
    other = BytesMemory([*memory.regions[:2], (TEXT + 0x20_0000, b"Linux version 6.1.0-other #2 SMP\n\0")])
    assert await cache.lookup(other, TEXT) is None


def test_core_kallsyms_is_found_by_its_shape():
    module = bytearray(0x800)
    struct.pack_into("<I", module, 0, 1)  # MODULE_STATE_COMING
    module[24:29] = b"dummy"
    symtab = 0xFFFF_FFFF_C050_0000
    # A decoy: module pointers, but strtab is not right after symtab's entries.
    struct.pack_into("<QIIQQ", module, 0x100, symtab, 10, 0, symtab + 0x1000, symtab + 0x2000)
    struct.pack_into("<QIIQQ", module, 0x228, symtab, 31, 0, symtab + 31 * 24, symtab + 31 * 24 + 400)
    assert find_core_kallsyms(bytes(module)) == 0x228
    assert find_core_kallsyms(bytes(0x800)) is None


def test_module_specs_wait_only_for_modules_not_loaded():
    tracker = ModuleTracker(engine=None, memory=BytesMemory([]))
    tracker.loaded["loop"] = 0xFFFF_FFFF_C000_1000
    location, why = tracker.pending_location("dummy:dummy_xmit+0x10")
    assert (location.file, location.symbol, location.offset, location.address) == ("dummy", "dummy_xmit", 0x10, 0)
    assert why == "module dummy not loaded"
    assert tracker.pending_location("loop:lo_rw") is None  # loaded: resolved (and refused) as usual
    assert tracker.pending_location("dummy:0x1000") is None
    assert tracker.pending_location("dummy:f+zz") is None
    assert tracker.pending_location("vfs_read") is None
