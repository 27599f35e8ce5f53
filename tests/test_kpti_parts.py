"""KPTI's parts without a guest: telling a user/kernel PGD pair, a walk fed entry by entry, and physical
reads through the stub's PhyMemMode (a scripted stand-in for QEMU's `pipeline`). The real thing, on a
Debian kernel booted with `pti=on`, is tests/test_linux_kpti.py."""

from __future__ import annotations

import struct

import pytest

from probed.guest.memory.kpti import PhysicalThroughStub, mirrors, pair_roots
from probed.guest.memory.pagewalk import EntryMissing, PageWalker, Paging
from rsp.errors import RemoteError

NX = 1 << 63
P, RW, US, A, PS = 1, 2, 4, 0x20, 0x80
PAGE = 4096


def _half(entries: dict[int, int]) -> bytes:
    return struct.pack("<256Q", *[entries.get(i, 0) for i in range(256)])


def test_a_kpti_pair_is_told_by_its_user_halves():
    user = {0: 0x1234000 | P | RW | US | A, 255: 0x5678000 | P | RW | US}
    kernel = {i: (e | NX) & ~A for i, e in user.items()}  # the kernel's copy: NX added, walked by no one yet
    assert mirrors(_half(kernel), _half(user))
    assert mirrors(_half({**kernel, 7: 0x9000 | P}), _half(user))  # being written: present in one only
    assert not mirrors(_half({**kernel, 0: 0x1235000 | P | RW | US}), _half(user))  # another table
    assert not mirrors(_half({**kernel, 0: 0x1234000 | P | US}), _half(user))  # other rights
    assert not mirrors(_half({}), _half({}))  # nothing present: nothing tells
    assert not mirrors(_half(kernel)[:100], _half(user))


def test_pair_roots_strip_pcid_noflush_and_the_user_bit():
    assert pair_roots((1 << 63) | 0x7F5A000 | 0x1000 | 0x801) == (0x7F5A000, 0x7F5B000)
    assert pair_roots(0x7F5A000) == (0x7F5A000, 0x7F5B000)


class _Ram:
    """Made-up guest-physical memory with 4-level page tables."""

    def __init__(self):
        self.pages: dict[int, bytearray] = {}
        self.next = 0x100000

    def page(self) -> int:
        at, self.next = self.next, self.next + PAGE
        self.pages[at] = bytearray(PAGE)
        return at

    def put(self, address: int, value: int) -> None:
        struct.pack_into("<Q", self.pages[address & ~(PAGE - 1)], address % PAGE, value)

    def read(self, address: int, length: int) -> bytes | None:
        out = b""
        while length > 0:
            page = self.pages.get(address & ~(PAGE - 1))
            if page is None:
                return None
            n = min(length, PAGE - address % PAGE)
            out += bytes(page[address % PAGE : address % PAGE + n])
            address, length = address + n, length - n
        return out

    def map(self, root: int, vaddr: int, phys: int, huge: bool = False) -> None:
        table = root
        for shift in (39, 30) + (() if huge else (21,)):
            slot = table + ((vaddr >> shift) & 0x1FF) * 8
            entry = struct.unpack("<Q", self.read(slot, 8))[0]
            if not entry & P:
                entry = self.page() | P | RW
                self.put(slot, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        shift = 21 if huge else 12
        self.put(table + ((vaddr >> shift) & 0x1FF) * 8, phys | P | RW | (PS if huge else 0))


def _fed(walker: PageWalker, ram: _Ram, paging: Paging, vaddr: int):
    for _ in range(8):
        try:
            return walker.translate(paging, vaddr)
        except EntryMissing as need:
            walker.give(need.address, ram.read(need.address, need.width))
    raise AssertionError("the walk did not end")


def test_a_walk_fed_entry_by_entry_equals_one_reading_pages():
    ram = _Ram()
    root = ram.page()
    data = ram.page()
    ram.map(root, 0xFFFF_8880_0001_2000, data)
    ram.map(root, 0x0000_7FFF_F000_0000, data)
    ram.map(root, 0xFFFF_FFFF_8100_0000, 0x4000_0000, huge=True)
    paging = Paging("4-level", root | 0x801)  # PCID bits are not part of the root
    places = [0xFFFF_8880_0001_2010, 0x0000_7FFF_F000_0FF8, 0xFFFF_FFFF_8112_3456, 0xFFFF_8880_0001_3000,
              0xFFFF_8000_0000_0000, 0x0000_8000_0000_0000]
    reading, fed = PageWalker(ram.read), PageWalker(None)
    got = [_fed(fed, ram, paging, v) for v in places]
    assert got == [reading.translate(paging, v) for v in places]
    assert got == [(data + 0x10, PAGE - 0x10), (data + 0xFF8, 8), (0x4012_3456, (2 << 20) - 0x12_3456),
                   None, None, None]


class _Stub:
    """QEMU's side of `pipeline` for `m` and `Qqemu.PhyMemMode` (physical mode is global state, as in QEMU)."""

    def __init__(self, ram: _Ram, phys_mode: bool = True):
        self.ram = ram
        self.phys_mode = phys_mode
        self.physical = False
        self.writes: list[list[bytes]] = []

    async def pipeline(self, packets):
        self.writes.append(list(packets))
        out = []
        for packet in packets:
            if packet.startswith(b"Qqemu.PhyMemMode:"):
                if not self.phys_mode:
                    out.append(b"")
                    continue
                self.physical = packet.endswith(b"1")
                out.append(b"OK")
            elif packet.startswith(b"m"):
                address, length = (int(x, 16) for x in packet[1:].split(b","))
                data = self.ram.read(address, length) if self.physical else None
                out.append(data.hex().encode() if data is not None else b"E14")
        return out


async def test_virtual_reads_through_a_root_of_ours_over_physical_mode():
    ram = _Ram()
    kernel_root = ram.page()
    task = ram.page()
    ram.pages[task][0x10:0x20] = b"utarget\0\0\0\0\0\0\0\0\0"
    ram.map(kernel_root, 0xFFFF_8880_0200_0000, task)
    stub = _Stub(ram)
    reads = PhysicalThroughStub(stub)
    walker = PageWalker(None)
    paging = Paging("4-level", kernel_root)
    got = await reads.read_virtual(walker, paging, [(0xFFFF_8880_0200_0010, 8), (0xFFFF_8880_0300_0000, 8)])
    assert got[0] == b"utarget\0"
    assert isinstance(got[1], RemoteError) and "E14" in str(got[1])  # not mapped in the kernel either
    assert not stub.physical  # every write ends in virtual mode again
    assert all(w[0] == b"Qqemu.PhyMemMode:1" and w[-1] == b"Qqemu.PhyMemMode:0" for w in stub.writes)
    walks = len(stub.writes)
    again = await reads.read_virtual(walker, paging, [(0xFFFF_8880_0200_0014, 4)])
    assert again == [b"get\0"] and len(stub.writes) == walks + 1  # the walk is kept: one write for the data


async def test_no_physical_mode_means_no_bytes():
    ram = _Ram()
    reads = PhysicalThroughStub(_Stub(ram, phys_mode=False))
    assert await reads.read([(0x100000, 8)]) == [None]
    assert "PhyMemMode" in reads.unsupported


def test_entry_missing_names_the_entry():
    walker = PageWalker(None)
    with pytest.raises(EntryMissing) as need:
        walker.translate(Paging("4-level", 0x200000), 0xFFFF_8880_0000_0000)
    assert (need.value.address, need.value.width) == (0x200000 + 0x111 * 8, 8)
