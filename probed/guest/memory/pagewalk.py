"""x86 virtual -> guest-physical translation by walking the page tables, as QEMU's debug accesses do.

The walk follows QEMU's own for debugger reads (`x86_cpu_get_phys_page_attrs_debug`): only the present
bit is checked (no user/supervisor or write checks: a debugger reads kernel and user halves alike), so a
translation succeeds exactly where the stub's `m` succeeds, and where it fails `m` answers `E14`.

Regimes, chosen from the stopped CPU's CR0, CR4 and EFER (all in QEMU's `g` block on i386 and x86_64):
- CR0.PG clear: no paging, physical == virtual.
- CR4.PAE clear: 2-level, 32-bit entries; 4 MiB pages when PDE.PS and CR4.PSE (with PSE-36 high bits).
- CR4.PAE set, EFER.LMA clear: PAE, a 4-entry PDPT at CR3 & ~0x1f, 64-bit entries, 2 MiB pages.
- EFER.LMA set: 4-level, or 5-level when CR4.LA57; 1 GiB and 2 MiB pages; non-canonical addresses fail.
A20 is taken as enabled (every guest that pages has it on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EntryMissing", "Paging", "PageWalker", "page_through"]

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
PRESENT = 1 << 0
PS = 1 << 7
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51 of an entry
PAGE = 4096


@dataclass(frozen=True)
class Paging:
    """The translation regime of one CPU at one stop.

    Attributes:
        kind: "none", "2-level", "pae", "4-level" or "5-level".
        cr3: the page-table root.
        pse: 4 MiB pages allowed (2-level only).
    """

    kind: str
    cr3: int
    pse: bool = False

    @classmethod
    def from_registers(cls, cr0: int, cr3: int, cr4: int, efer: int) -> Paging:
        if not cr0 & CR0_PG:
            return cls("none", 0)
        if not cr4 & CR4_PAE:
            return cls("2-level", cr3, bool(cr4 & CR4_PSE))
        if not efer & EFER_LMA:
            return cls("pae", cr3)
        return cls("5-level" if cr4 & CR4_LA57 else "4-level", cr3)


class EntryMissing(Exception):  # noqa: N818  (a request for data, not a failure)
    """A walker without a physical reader needs this page-table entry: read it, `give` it, translate again.

    Attributes:
        address: the entry's guest-physical address.
        width: its size in bytes (4 or 8).
    """

    def __init__(self, address: int, width: int):
        super().__init__(f"page-table entry at {address:#x} not read yet")
        self.address = address
        self.width = width


class PageWalker:
    """Translates virtual addresses for one stop (the guest does not run while it is used).

    Page-table pages are read whole once and kept, and translations are remembered per page: valid only
    while the guest stays stopped, so a walker lives for one stop (a hit's reads) or one bulk read.

    Args:
        read_phys: reads guest-physical memory: `(address, length) -> bytes`, or None where it cannot.
            None for a walker fed entry by entry: `translate` raises `EntryMissing` for an entry it has not
            been given yet (reads that cost a round trip each, as through the stub, fetch only entries).
    """

    def __init__(self, read_phys: Callable[[int, int], bytes | None] | None):
        self._read_phys = read_phys
        self._tables: dict[int, bytes | None] = {}
        self._entries: dict[int, int | None] = {}  # fed entries: physical address -> value (None: unreadable)
        self._tlb: dict[tuple[Paging, int], tuple[int, int] | None] = {}
        self.walks = 0

    def translate(self, paging: Paging, vaddr: int) -> tuple[int, int] | None:
        """The guest-physical address of `vaddr` and how many bytes from there stay in its page, or None
        where the page is not present (or a page table is not in RAM)."""
        if paging.kind == "none":
            return vaddr, PAGE - (vaddr % PAGE)
        key = (paging, vaddr & ~(PAGE - 1))
        try:
            hit = self._tlb[key]
        except KeyError:
            hit = self._tlb[key] = self._walk(paging, vaddr)
        if hit is None:
            return None
        base, size = hit
        offset = vaddr & (size - 1)
        return base + offset, size - offset

    def leaf_table(self, paging: Paging, vaddr: int) -> tuple[int | None, int, int] | None:
        """Where `vaddr`'s walk ends, on 4- and 5-level paging: (the table holding the entry that points to
        the last table, or None when the last is the PUD; the last table; the shift of its entries' level:
        12 for a 4 KiB page, 21 for 2 MiB, 30 for 1 GiB), all guest-physical. None where not present.
        `page_through` reads a page's translation from them again at a later stop."""
        leaf = self._long_leaf(paging, vaddr) if paging.kind in ("4-level", "5-level") else None
        return leaf[:3] if leaf is not None else None

    def give(self, address: int, data: bytes | None) -> None:
        """The bytes of the page-table entry at physical `address` (None: not readable), after `EntryMissing`."""
        self._entries[address] = None if data is None else int.from_bytes(data, "little")

    def _entry(self, table: int, index: int, width: int) -> int | None:
        if self._read_phys is None:
            address = table + index * width
            if address not in self._entries:
                raise EntryMissing(address, width)
            return self._entries[address]
        page = table & ~(PAGE - 1)
        data = self._tables.get(page, b"")
        if data == b"":
            data = self._tables[page] = self._read_phys(page, PAGE)
        if data is None:
            return None
        at = (table - page) + index * width
        return int.from_bytes(data[at : at + width], "little")

    def _walk(self, paging: Paging, vaddr: int) -> tuple[int, int] | None:
        """(physical base of the page holding `vaddr`, page size), or None."""
        self.walks += 1
        if paging.kind == "2-level":
            pde = self._entry(paging.cr3 & ~0xFFF, (vaddr >> 22) & 0x3FF, 4)
            if pde is None or not pde & PRESENT:
                return None
            if pde & PS and paging.pse:
                size = 4 << 20
                entry = pde | ((pde & 0x1FE000) << 19)  # PSE-36: PDE bits 13..20 are physical bits 32..39
                return entry & ADDRESS_MASK & ~(size - 1), size
            pte = self._entry(pde & ~0xFFF, (vaddr >> 12) & 0x3FF, 4)
            if pte is None or not pte & PRESENT:
                return None
            return pte & ADDRESS_MASK, PAGE
        if paging.kind == "pae":
            pdpte = self._entry(paging.cr3 & ~0x1F, (vaddr >> 30) & 3, 8)
            if pdpte is None or not pdpte & PRESENT:
                return None
            leaf = self._down(None, pdpte & ADDRESS_MASK, vaddr, 21)
        else:
            leaf = self._long_leaf(paging, vaddr)
        if leaf is None:
            return None
        shift, entry = leaf[2], leaf[3]
        size = 1 << shift
        return entry & ADDRESS_MASK & ~(size - 1), size

    def _long_leaf(self, paging: Paging, vaddr: int) -> tuple[int | None, int, int, int] | None:
        """4- and 5-level paging: `_down` from the PDPT, after the levels above it (None if not canonical)."""
        bits = 57 if paging.kind == "5-level" else 48
        if vaddr >> (bits - 1) not in (0, (1 << (65 - bits)) - 1):
            return None  # not canonical
        table = paging.cr3
        for shift in ((48, 39) if paging.kind == "5-level" else (39,)):
            entry = self._entry(table & ADDRESS_MASK, (vaddr >> shift) & 0x1FF, 8)
            if entry is None or not entry & PRESENT:
                return None
            table = entry
        return self._down(None, table & ADDRESS_MASK, vaddr, 30)

    def _down(self, parent: int | None, table: int, vaddr: int, shift: int) -> tuple[int | None, int, int, int] | None:
        """From the entry for `vaddr` at level `shift` (30: PDPT, 21: PD) in `table` down to the last one:
        (the table above the last, the last table, its level's shift, its entry), or None where not present."""
        while True:
            entry = self._entry(table, (vaddr >> shift) & 0x1FF, 8)
            if entry is None or not entry & PRESENT:
                return None
            if shift == 12 or entry & PS:
                return parent, table, shift, entry
            parent, table, shift = table, entry & ADDRESS_MASK, shift - 9


def page_through(
    read_phys: Callable[[int, int], bytes | None], leaf: tuple[int | None, int, int], vaddr: int
) -> tuple[int, int] | None:
    """(guest-physical base, size) of `vaddr`'s page, read through a walk's end kept from another stop
    (`PageWalker.leaf_table`): its last entry, and the one above it, read live. None when either changed
    (not present, repointed elsewhere above, a large page split, pages merged into a large one and their
    table freed, whose page may hold anything now): then walk again."""
    parent, table, shift = leaf
    if parent is not None:
        data = read_phys(parent + ((vaddr >> (shift + 9)) & 0x1FF) * 8, 8)
        if data is None:
            return None
        above = int.from_bytes(data, "little")
        if not above & PRESENT or above & PS or above & ADDRESS_MASK != table:
            return None
    data = read_phys(table + ((vaddr >> shift) & 0x1FF) * 8, 8)
    if data is None:
        return None
    entry = int.from_bytes(data, "little")
    if not entry & PRESENT or (shift > 12 and not entry & PS):  # (a PTE's bit 7 is PAT, not PS)
        return None
    size = 1 << shift
    return entry & ADDRESS_MASK & ~(size - 1), size
