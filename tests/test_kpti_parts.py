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


class _Target:
    """What GuestMemory uses of a Target, over `_Ram`: `m` walks CR3 as QEMU's does (E14 where unmapped)."""

    class _Layout:
        @staticmethod
        def value(g, name):
            return g.get(name)

    class _Arch:
        word_size = 8

    layout_names = frozenset({"cr0", "cr3", "cr4", "efer"})
    layout = _Layout()
    arch = _Arch()

    def __init__(self, ram: _Ram, g: dict, phys_mode: bool = True):
        self.ram, self.g = ram, g
        self.client = _Stub(ram, phys_mode)
        self.m = 0

    async def read_g(self):
        return self.g

    async def read_many_stub(self, requests, timeout=None):
        self.m += len(requests)
        walker = PageWalker(self.ram.read)
        paging = Paging.from_registers(self.g["cr0"], self.g["cr3"], self.g["cr4"], self.g["efer"])
        out = []
        for address, length in requests:
            hit = walker.translate(paging, address)
            data = self.ram.read(hit[0], length) if hit is not None and hit[1] >= length else None
            out.append(data if data is not None else RemoteError(0x14, None, b"m%x,%x" % (address, length)))
        return out


def _guest(kpti: bool = True):
    """A process's page tables: its user half, and the kernel's per-CPU data mapped in the kernel PGD only."""
    ram = _Ram()
    ram.next = 0x200000  # 8 KiB aligned: the pair
    kernel, user = ram.page(), ram.page()
    percpu, code = ram.page(), ram.page()
    ram.pages[percpu][:8] = b"current!"
    ram.map(kernel, 0xFFFF_8880_0002_0000, percpu)
    ram.map(kernel, 0x40_1000, code)
    entry = struct.unpack("<Q", ram.read(kernel, 8))[0]
    if kpti:  # the user half: one set of tables under both PGDs, the kernel's entry with NX added
        ram.put(user, entry | A)
        ram.put(kernel, entry | NX)
    else:
        ram.map(user, 0x40_1000, ram.page())  # another process's PGD next door: its own tables
    ram.pages[code][:4] = b"user"
    g = {"cr0": 1 << 31, "cr3": user | 0x801, "cr4": 1 << 5, "efer": 1 << 10}  # PCID 0x801 in the low bits
    return ram, kernel, g


async def test_guest_memory_reads_the_kernel_through_the_kernel_pgd_at_a_user_pgd_stop():
    from probed.guest.memory.reader import GuestMemory

    ram, kernel, g = _guest()
    target = _Target(ram, g)
    memory = GuestMemory(target, None, "--guest-memory gdbstub")
    wanted = [(0xFFFF_8880_0002_0000, 8), (0x40_1000, 4), (0xFFFF_8880_0003_0000, 8)]
    for registers in (None, g):  # unknown yet (and no registers), then known
        got = await memory.read_many(wanted, registers)
        assert got[:2] == [b"current!", b"user"]
        assert isinstance(got[2], RemoteError) and "E14" in str(got[2])  # the kernel does not map it either
    assert memory.stats["kpti"] == 2 + 2
    assert await memory.address_space(g) == kernel  # what mm->pgd holds
    m = target.m
    await memory.read_many(wanted[:1], g)
    assert target.m == m  # once known: no `m` that would be refused first


async def test_without_kpti_a_cr3_with_bit_12_is_just_a_root():
    from probed.guest.memory.reader import GuestMemory

    ram, _, g = _guest(kpti=False)
    memory = GuestMemory(_Target(ram, g), None, "--guest-memory gdbstub")
    got = await memory.read_many([(0xFFFF_8880_0002_0000, 8)], g)
    assert isinstance(got[0], RemoteError)  # not read through the page next door
    assert await memory.address_space(g) == g["cr3"] & ~0xFFF
    assert memory.stats["kpti"] == 0


async def test_no_physical_mode_is_a_clear_error_at_a_user_pgd_stop():
    from probed.errors import TargetError
    from probed.guest.memory.reader import GuestMemory

    ram, _, g = _guest()
    memory = GuestMemory(_Target(ram, g, phys_mode=False), None, "--guest-memory gdbstub")
    (got,) = await memory.read_many([(0xFFFF_8880_0002_0000, 8)], g)
    assert isinstance(got, RemoteError)  # the pair cannot be checked: `m`'s own answer stands
    target = _Target(ram, g)
    memory = GuestMemory(target, None, "--guest-memory gdbstub")
    assert (await memory.read_many([(0xFFFF_8880_0002_0000, 8)], g)) == [b"current!"]
    target.client.phys_mode = False  # the pair was checked; physical reads fail from now on
    (got,) = await memory.read_many([(0xFFFF_8880_0002_0000, 8)], g)
    assert isinstance(got, TargetError) and "KPTI" in str(got) and "physical" in str(got)


async def test_a_reboot_forgets_which_roots_were_user_pgds():
    from probed.guest.memory.reader import GuestMemory

    ram, kernel, g = _guest()
    memory = GuestMemory(_Target(ram, g), None, "--guest-memory gdbstub")
    assert await memory.address_space(g) == kernel
    after, _, g2 = _guest(kpti=False)  # the new boot: no KPTI, the same CR3 value
    assert g2["cr3"] == g["cr3"]
    ram.pages = after.pages  # the same RAM, rewritten by the new boot
    assert await memory.address_space(g2) == kernel  # still the old boot's verdict...
    memory.forget_boot()
    assert await memory.address_space(g2) == g2["cr3"] & ~0xFFF  # ...until the reboot is known
