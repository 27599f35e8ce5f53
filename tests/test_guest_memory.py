"""Guest RAM read directly from QEMU's process, checked byte for byte against the stub's `m`.

Real QEMU throughout: the bundled guests (i386 without paging, x86_64 with a 4 GiB identity map of 2 MiB
pages), the i386 guest with 2-level and PAE page tables built in its RAM and switched on through the stub,
and a machine with RAM above the 4 GiB hole. The Linux guest (4-level paging, kernel and user addresses) is
in tests/test_linux_guest_memory.py.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random

import pytest
import trio

from probed.api import attach
from probed.guest.memory import GuestMemoryUnavailable
from probed.guest.memory.pagewalk import PageWalker, Paging
from probed.guest.memory.qemu_process import find_qemu_pid, open_process_memory, open_shared_backing
from probed.guest.memory.ram import parse_flat_view
from probed.guest.memory.reader import GuestMemory
from probed.testing.qemu import QemuGuest
from rsp.errors import RemoteError

# -- helpers -------------------------------------------------------------------------------------------


async def stop_in_loop(engine) -> None:
    """Run the guest to its loop (a hit on `elsewhere`), then hold it stopped there."""
    probe = await engine.add_probe("elsewhere")
    with engine.hub.subscribe(probe.id) as sub:
        await engine.resume()
        with trio.fail_after(30):
            await sub.receive()
    await engine.hold()
    await engine.remove_probe(probe.id)


def same_reply(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return isinstance(a, RemoteError) and isinstance(b, RemoteError) and str(a) == str(b)
    return a == b


async def write(client, address: int, data: bytes) -> None:
    """`M` in pieces that fit QEMU's 4 KiB packet buffer in hex."""
    for off in range(0, len(data), 1024):
        await client.checked(b"M%x,%x:%s" % (address + off, len(data[off : off + 1024]), data[off : off + 1024].hex().encode()))


async def compare(engine, requests) -> dict:
    """Read `requests` through the target (direct where it can) and through `m`; every reply must agree."""
    target = engine.target

    async def both():
        g = await target.read_g()
        mine = await target.read_many(requests, registers=g, scope=object())
        theirs = await target.read_many_stub(requests)
        return mine, theirs

    before = dict(target.memory.stats)
    mine, theirs = await engine.call_stopped(both)
    bad = [(hex(a), n, m, t) for (a, n), m, t in zip(requests, mine, theirs, strict=True) if not same_reply(m, t)]
    assert bad == []
    return {k: target.memory.stats[k] - before[k] for k in before}


def spread(rng: random.Random, lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    sizes = [1, 2, 4, 8, 15, 64, 255, 4096, 5000, 3 * 4096 + 7]
    return [(rng.randrange(lo, hi), rng.choice(sizes)) for _ in range(count)]


# -- the bundled guests -----------------------------------------------------------------------------


async def test_direct_reads_equal_m_on_the_bundled_guests(guest):
    rng = random.Random(15)
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
        memory = engine.target.memory
        assert memory.direct, memory.reason
        assert memory.ram.pid == guest.pid  # found through the socket, not SO_PEERCRED (our own listener)
        await stop_in_loop(engine)
        syms = engine.symbols
        requests = spread(rng, 0, 64 << 20, 300)  # all of RAM (no paging on i386; identity map on x86_64)
        requests += [(syms.lookup(n).address, 8) for n in ("turns", "calls", "names", "probe_target")]
        requests += [(0x9FFF8, 16), (0xF0000, 32), (0xFEE00000, 16), (0xFFFFFFF0, 16)]  # legacy, APIC, BIOS
        if guest.arch == "x86_64":
            requests += [(1 << 32, 8), ((1 << 47) - 8, 8), (1 << 63, 8)]  # past the map, non-canonical
        counts = await compare(engine, requests)
    assert counts["direct"] >= 250 and counts["stub"] >= 4


def _tables_2level(base: int) -> tuple[dict[int, int], dict[str, int]]:
    """32-bit entries: PD at base, one page table at base+0x1000."""
    pd, pt = base, base + 0x1000
    entries = {pd + 1 * 4: pt | 0x3, pd + 2 * 4: 0x000000 | 0x83, pd + 3 * 4: 0x00400000 | 0x83}
    entries[pd + 4 * 4] = 0x83 | (1 << 13)  # PSE-36: physical 4 GiB (not RAM: the stub answers it)
    entries[pd + 0x300 * 4] = pt | 0x7  # the same table mapped high as well (a "kernel half")
    for i in range(256):
        if i != 5:  # a hole
            entries[pt + 4 * i] = (0x100000 + 0x1000 * ((i * 7) % 256)) | 0x1
    return entries, {"width": 4}


def _tables_pae(base: int) -> tuple[dict[int, int], dict[str, int]]:
    """64-bit entries: PDPT at base+0x20 (CR3 need only be 32-byte aligned), PDs, one page table."""
    pdpt, pd0, pd3, pt = base + 0x20, base + 0x1000, base + 0x2000, base + 0x3000
    entries = {pdpt: pd0 | 1, pdpt + 3 * 8: pd3 | 1}
    entries[pd0 + 2 * 8] = pt | 0x3  # 0x400000: 4 KiB pages
    entries[pd0 + 4 * 8] = 0x200000 | 0x83  # 0x800000: a 2 MiB page
    entries[pd3 + 0 * 8] = pt | 0x3  # 0xc0000000: the same table
    entries[pd3 + 1 * 8] = 0x400000 | 0x83 | (1 << 63)  # NX is not an address bit
    for i in range(512):
        if i % 9:
            entries[pt + 8 * i] = (0x100000 + 0x1000 * ((i * 5) % 512)) | 0x1
    return entries, {"width": 8}


@pytest.mark.parametrize("mode", ["2-level", "pae"])
async def test_page_walks_equal_m_for_32_bit_paging(guest_i386, mode):
    """Page tables written into the i386 guest, paging switched on through the stub while it is stopped
    (the guest never runs with them): every read agrees with QEMU's own walk, and the guest is put back."""
    base = 0x2000000
    build = _tables_2level if mode == "2-level" else _tables_pae
    entries, info = build(base)
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        await stop_in_loop(engine)
        target = engine.target
        layout = target.layout

        async def setup():
            saved = await target.read_many_stub([(base, 0x4000)])
            image = bytearray(0x4000)
            for at, value in entries.items():
                image[at - base : at - base + info["width"]] = value.to_bytes(info["width"], "little")
            await write(target.client, base, bytes(image))
            g = await target.read_g()
            regs = {n: layout.value(g, n) for n in ("cr0", "cr3", "cr4")}
            cr3 = base + 0x20 if mode == "pae" else base
            cr4 = regs["cr4"] | (0x20 if mode == "pae" else 0x10)
            for name, value in (("cr3", cr3), ("cr4", cr4), ("cr0", regs["cr0"] | 0x80000001)):
                await target.client.checked(b"P%x=%s" % (layout.regnum(name), layout.encode_p(name, value)))
            return saved[0], regs

        saved, regs = await engine.call_stopped(setup)
        try:
            rng = random.Random(3)
            requests = spread(rng, 0x400000, 0xA00000, 200) + spread(rng, 0xC0000000, 0xC0400000, 100)
            requests += [(0x405000 - 4, 8), (0x402FFE, 4)]  # across a hole, across two mapped pages
            counts = await compare(engine, requests)
            assert counts["direct"] >= 80
        finally:

            async def restore():
                for name in ("cr0", "cr4", "cr3"):
                    await target.client.checked(b"P%x=%s" % (layout.regnum(name), layout.encode_p(name, regs[name])))
                await write(target.client, base, saved)

            await engine.call_stopped(restore)
        # The guest runs on as before.
        await stop_in_loop(engine)


def _tables_5level(base: int) -> tuple[dict[int, int], dict[str, int]]:
    """PML5 at base; the top half (PML5 511) and the bottom (PML5 0) share one PML4."""
    pml5, pml4, pdpt, pd, pt = (base + 0x1000 * i for i in range(5))
    entries = {pml5 + 0x1FF * 8: pml4 | 3, pml5: pml4 | 7, pml4 + 1 * 8: pdpt | 3}
    entries[pdpt + 2 * 8] = pd | 3
    entries[pdpt + 5 * 8] = 0x83  # a 1 GiB page at physical 0 (64 MiB of it is RAM)
    entries[pd + 3 * 8] = pt | 3
    entries[pd + 4 * 8] = 0x200000 | 0x83  # a 2 MiB page
    for i in range(512):
        if i % 7:
            entries[pt + 8 * i] = (0x100000 + 0x1000 * ((i * 3) % 512)) | 1
    return entries, {"width": 8}


async def test_page_walks_equal_m_for_5_level_paging():
    """5-level paging (CR4.LA57, QEMU's `-cpu max` has it) switched on in the stopped x86_64 guest over
    tables written into its RAM: 4 KiB, 2 MiB and 1 GiB pages in both halves agree with `m`."""
    base = 0x2000000
    entries, info = _tables_5level(base)
    guest = QemuGuest("x86_64", extra_args=["-cpu", "max"]).start()
    try:
        async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
            await stop_in_loop(engine)
            target = engine.target
            layout = target.layout

            async def setup():
                saved = await target.read_many_stub([(base, 0x5000)])
                image = bytearray(0x5000)
                for at, value in entries.items():
                    image[at - base : at - base + 8] = value.to_bytes(8, "little")
                await write(target.client, base, bytes(image))
                g = await target.read_g()
                regs = {n: layout.value(g, n) for n in ("cr3", "cr4")}
                for name, value in (("cr3", base), ("cr4", regs["cr4"] | (1 << 12))):
                    await target.client.checked(b"P%x=%s" % (layout.regnum(name), layout.encode_p(name, value)))
                g = await target.read_g()
                return saved[0], regs, layout.value(g, "cr4")

            saved, regs, cr4 = await engine.call_stopped(setup)
            try:
                assert cr4 & (1 << 12), "QEMU did not take CR4.LA57"
                top = 0xFF80000000000000 | (0x1FF << 48)  # PML5 index 511, sign-extended from bit 56
                rng = random.Random(57)
                requests = []
                for half in (0, top):
                    va = half | (1 << 39) | (2 << 30)
                    requests += spread(rng, va + (3 << 21), va + (5 << 21), 120)  # 4 KiB and 2 MiB pages
                    requests += spread(rng, half | (1 << 39) | (5 << 30), half | (1 << 39) | (5 << 30) | (80 << 20), 60)
                requests += [((1 << 56) | (1 << 39), 8), (top ^ (1 << 60), 8)]  # not canonical with 5 levels
                counts = await compare(engine, requests)
                assert counts["direct"] >= 200
            finally:

                async def restore():
                    for name in ("cr4", "cr3"):
                        await target.client.checked(b"P%x=%s" % (layout.regnum(name), layout.encode_p(name, regs[name])))
                    await write(target.client, base, saved)

                await engine.call_stopped(restore)
            await stop_in_loop(engine)
    finally:
        guest.close()


@pytest.mark.parametrize("shared", [False, True])
async def test_ram_above_the_4g_hole(shared):
    """pc with 5 GiB: RAM below the hole and the rest at 4 GiB, both read directly (physical reads
    checked with the stub in physical mode). As shared memfd RAM, mapped into probed: the range at 4 GiB
    is the file from 3 GiB on (`@OFFSET` in QEMU's flat view)."""
    guest = QemuGuest("x86_64", bare=True, memory="5G", shared_ram=shared).start()
    try:
        async with attach(guest.target, stopped=True) as engine:
            ram = engine.target.memory.ram
            assert ram is not None and ram.mapped is shared
            above = [r for r in ram.ranges if r.start >= 1 << 32]
            assert above and above[0].start == 1 << 32 and sum(r.end - r.start for r in ram.ranges) >= (5 << 30) - (1 << 20)
            client = engine.target.client
            places = [0x123456, 0xBFFFF000, 1 << 32, (1 << 32) + 0x7654321, (5 << 30) + (1 << 30) - 0x1000 - 64]
            places = [p for p in places if ram.host_address(p, 64) is not None]

            async def check():
                await client.checked(b"Qqemu.PhyMemMode:1")
                try:
                    for n, p in enumerate(places):
                        await write(client, p, bytes([n + 1]) * 32 + os.urandom(32))
                    return [(ram.read(p, 64), await client.read_memory(p, 64)) for p in places]
                finally:
                    await client.checked(b"Qqemu.PhyMemMode:0")

            pairs = await engine.call_stopped(check)
        assert len(places) >= 4 and all(a == b for a, b in pairs)
    finally:
        guest.close()


@pytest.mark.parametrize(("mode", "mapped"), [("auto", True), ("proc-mem", False)])
async def test_shared_ram_is_mapped_and_reads_equal_m(mode, mapped):
    """QEMU's RAM as a shared memfd (`memory-backend-memfd,share=on`): `auto` maps it into probed (no system
    call per read), `proc-mem` reads it with pread; every read agrees with `m`, and what the stub writes is
    there at once through the mapping (it is the guest's memory, not a copy)."""
    rng = random.Random(16)
    with QemuGuest("i386", stopped=True, shared_ram=True) as guest:
        async with attach(guest.target, symbols=[str(guest.elf)], stopped=True, guest_memory=mode) as engine:
            ram = engine.target.memory.ram
            assert ram is not None and ram.mapped is mapped
            assert ("mapped shared" in engine.target.memory.describe()) is mapped
            await stop_in_loop(engine)
            counts = await compare(engine, spread(rng, 0, 64 << 20, 300) + [(0x9FFF8, 16), (0xFFFFFFF0, 16)])
            assert counts["direct"] >= 250
            turns = engine.symbols.lookup("turns").address

            async def poke():
                await write(engine.target.client, turns, b"\x5a\xa5\x5a\xa5")
                return ram.read(turns, 4)

            assert await engine.call_stopped(poke) == b"\x5a\xa5\x5a\xa5"
            views = list(ram.views.values())
        # Detached: QEMU's memory is let go (a mapping would keep an exited QEMU's RAM allocated).
        assert engine.target.memory.ram is None and all(view.closed for view in views)


def _address_of(view: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_shared_file_mapping_is_found_through_the_process_even_split():
    """A memfd mapped shared in this very process stands in for QEMU's RAM: found through /proc/self, split
    into several VMAs (mprotect) or not; a private mapping is refused with the reason."""
    fd = os.memfd_create("probed-test-ram")
    try:
        os.ftruncate(fd, 16 * 4096)
        view = mmap.mmap(fd, 16 * 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view[5 * 4096 : 5 * 4096 + 5] = b"hello"
        base = _address_of(view)
        backing = open_shared_backing(os.getpid(), base + 4096, 8 * 4096)
        try:
            assert backing.offset == 4096 and os.pread(backing.fd, 5, 5 * 4096) == b"hello"
        finally:
            os.close(backing.fd)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mprotect(ctypes.c_void_p(base + 4 * 4096), 4096, mmap.PROT_READ) == 0  # three VMAs now
        backing = open_shared_backing(os.getpid(), base, 16 * 4096)
        os.close(backing.fd)
        assert backing.offset == 0
        private = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
        with pytest.raises(GuestMemoryUnavailable, match="not a file mapped shared"):
            open_shared_backing(os.getpid(), _address_of(private), 4096)
        with pytest.raises(GuestMemoryUnavailable, match="not one shared file mapping throughout"):
            open_shared_backing(os.getpid(), base + 15 * 4096, 2 * 4096)  # past the file's mapping
    finally:
        os.close(fd)


# -- finding QEMU, and falling back ----------------------------------------------------------------


async def test_qemu_found_over_tcp():
    guest = QemuGuest("i386", gdb="tcp").start()
    try:
        async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
            assert engine.target.memory.ram.pid == guest.pid
            assert find_qemu_pid(engine.target.client._stream.socket) == guest.pid
    finally:
        guest.close()


async def test_wrong_pid_falls_back_and_says_why(guest_i386, caplog):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True, qemu_pid=os.getpid()) as engine:
        memory = engine.target.memory
        assert not memory.direct
        assert f"is {os.getpid()} QEMU's pid?" in memory.reason or "/proc/PID/mem failed" in memory.reason
        await stop_in_loop(engine)
        counts = await compare(engine, [(engine.symbols.lookup("turns").address, 4)])
        assert counts["direct"] == 0
    assert "reading through the gdbstub" in caplog.text


async def test_no_such_process_and_gdbstub_mode(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True, qemu_pid=2**22 + 1) as engine:
        assert engine.target.memory.reason == f"no process {2**22 + 1}"
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True, guest_memory="gdbstub") as engine:
        assert engine.target.memory.reason == "--guest-memory gdbstub"
        assert "through the gdbstub" in engine.target.memory.describe()


async def test_other_architectures_read_through_the_stub_and_say_why():
    with QemuGuest("aarch64", bare=True, extra_args=["-M", "virt", "-cpu", "cortex-a57"], memory="128M") as guest:
        async with attach(guest.target, stopped=True) as engine:
            memory = engine.target.memory
            assert not memory.direct
            assert memory.reason == "direct reads walk x86 page tables; this target is aarch64"


def _open_as_nobody(pid: int, answer) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        open_process_memory(pid)
        answer.send("opened")
    except GuestMemoryUnavailable as exc:
        answer.send(str(exc))


def test_no_permission_says_why(guest_i386):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_open_as_nobody, args=(guest_i386.pid, theirs))
    child.start()
    child.join(10)
    assert ours.recv() == f"cannot open /proc/{guest_i386.pid}/mem: Permission denied"


# -- without QEMU: the page walker's large pages and 5 levels, the flat view ----------------------


class FakePhysical:
    """Guest-physical memory made of page-table entries, for walks QEMU's machines here cannot show."""

    def __init__(self):
        self.words: dict[int, int] = {}

    def set(self, table: int, index: int, value: int) -> None:
        self.words[table + 8 * index] = value

    def read(self, phys: int, length: int) -> bytes:
        out = bytearray(length)
        for at, value in self.words.items():
            if phys <= at < phys + length:
                out[at - phys : at - phys + 8] = value.to_bytes(8, "little")
        return bytes(out)


def test_walker_5_level_and_1g_pages():
    mem = FakePhysical()
    pml5, pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    va = (0x1FF << 48) | (0x1 << 39) | (0x2 << 30) | (0x3 << 21) | (0x4 << 12) | 0x123
    va |= 0x7F << 57  # bits 57..63: the sign extension of bit 56
    mem.set(pml5, 0x1FF, pml4 | 1)
    mem.set(pml4, 1, pdpt | 1)
    mem.set(pdpt, 2, pd | 1)
    mem.set(pdpt, 5, (7 << 30) | 0x81)  # a 1 GiB page
    mem.set(pd, 3, pt | 1)
    mem.set(pt, 4, 0xABC000 | 1)
    walker = PageWalker(mem.read)
    five = Paging.from_registers(cr0=0x80000011, cr3=pml5, cr4=0x1020, efer=0x500)
    assert five.kind == "5-level"
    assert walker.translate(five, va) == (0xABC123, 0x1000 - 0x123)
    big = (va & ~((1 << 39) - 1)) | (5 << 30) | 0x12345
    assert walker.translate(five, big) == ((7 << 30) | 0x12345, (1 << 30) - 0x12345)
    assert walker.translate(five, va ^ (1 << 60)) is None  # not canonical
    assert walker.translate(five, va + 0x1000) is None  # not present
    four = Paging.from_registers(cr0=0x80000011, cr3=pml4, cr4=0x20, efer=0x500)
    assert four.kind == "4-level"
    low = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12)
    assert walker.translate(four, low) == (0xABC000, 0x1000)
    assert walker.translate(four, 1 << 47) is None  # not canonical with 4 levels


class _Arch:
    word_size = 8


class _Target:
    arch = _Arch()


def _kernel_tables() -> tuple[FakePhysical, Paging, dict[str, int]]:
    """A 4-level kernel half: a 4 KiB page and a 2 MiB page in a "direct map", and a 4 KiB page outside it."""
    mem = FakePhysical()
    pml4, pdpt, pd, pt = 0x8000, 0x2000, 0x3000, 0x4000  # (CR3 bit 12 clear: no KPTI user PGD)
    mem.set(pml4, 0x111, pdpt | 3)
    mem.set(pdpt, 0, pd | 3)
    mem.set(pd, 0, pt | 3)  # 0..2 MiB: 4 KiB pages
    mem.set(pt, 5, 0x10000 | 3)
    mem.set(pd, 1, 0x400000 | 0x83)  # 2..4 MiB: one 2 MiB page
    mem.set(pd, 9, pt | 3)  # 18..20 MiB: outside the lasting range (the same table, for brevity)
    mem.words[0x10000 + 0x40] = 0x1111
    mem.words[0x400000 + 0x1000] = 0x2222
    base = 0xFFFF888000000000
    paging = Paging.from_registers(cr0=0x80000011, cr3=pml4, cr4=0x20, efer=0x500)
    places = {"small": base + 0x5040, "large": base + 0x201000, "outside": base + (9 << 21) + 0x5040, "base": base}
    return mem, paging, places


def _memory_over(mem: FakePhysical, paging: Paging, monkeypatch) -> GuestMemory:
    import probed.guest.memory.reader as reader

    monkeypatch.setattr(reader, "CHECK_FIRST", 0)
    monkeypatch.setattr(reader, "CHECK_EVERY", 1 << 40)
    memory = GuestMemory(_Target(), mem)
    memory._paging = lambda registers: paging
    return memory


def test_kept_translations_read_live_entries(monkeypatch):
    """In a lasting range (Linux's direct map), where a page's last entries lie is kept across stops: the
    next stop reads two entries, not a walk; an entry made not present, repointed, a 2 MiB page split or
    4 KiB pages merged are seen at once; outside the range, and after a reboot, every stop walks."""
    mem, paging, at = _kernel_tables()
    memory = _memory_over(mem, paging, monkeypatch)
    memory.keep_translations([(at["base"], at["base"] + (8 << 21))])

    def stop(address: int) -> tuple[bytes | None, int]:
        g = object()  # a new stop: new registers, a new scope
        data = memory.read_now(address, 8, g, g)
        return data, (memory._walker.walks if memory._walker is not None else 0)

    word = (0x1111).to_bytes(8, "little")
    assert stop(at["small"]) == (word, 1)
    assert stop(at["small"]) == (word, 0)  # kept: no walk
    assert stop(at["large"]) == ((0x2222).to_bytes(8, "little"), 1)
    assert stop(at["large"]) == ((0x2222).to_bytes(8, "little"), 0)
    assert stop(at["outside"]) == (word, 1)
    assert stop(at["outside"]) == (word, 1)  # not in a lasting range: walked at every stop
    # A read across two pages: each page's bytes, kept or walked.
    mem.set(0x4000, 6, 0x14000 | 3)
    mem.words[0x10000 + 0xFF8] = 0x6666
    mem.words[0x14000] = 0x7777
    for _ in range(2):
        g = object()
        assert memory.read_now(at["small"] - 0x40 + 0xFF8, 16, g, g) == (0x6666).to_bytes(8, "little") + (0x7777).to_bytes(8, "little")
    # The page made not present: the stub answers (None here), as `m` would fault.
    mem.set(0x4000, 5, 0x10000 | 2)
    assert stop(at["small"]) == (None, 1)
    # Repointed: the new page's bytes.
    mem.set(0x4000, 5, 0x11000 | 3)
    mem.words[0x11000 + 0x40] = 0x3333
    assert stop(at["small"])[0] == (0x3333).to_bytes(8, "little")
    # The 2 MiB page split into 4 KiB pages (a new table): walked again, then kept.
    mem.set(0x3000, 1, 0x5000 | 3)
    mem.set(0x5000, 1, 0x12000 | 3)
    mem.words[0x12000] = 0x4444
    assert stop(at["large"]) == ((0x4444).to_bytes(8, "little"), 1)
    assert stop(at["large"]) == ((0x4444).to_bytes(8, "little"), 0)
    # The 4 KiB pages merged back into a 2 MiB page (their table freed, its page reused): not read through.
    mem.set(0x3000, 1, 0x600000 | 0x83)
    mem.set(0x5000, 1, 0x13000 | 3)  # (what the freed table's page holds now)
    mem.words[0x600000 + 0x1000] = 0x5555
    assert stop(at["large"]) == ((0x5555).to_bytes(8, "little"), 1)
    # A stop on what may be a KPTI user PGD (CR3 bit 12) reads nothing through what was kept (`m` may refuse).
    mem.set(0x9000, 0x111, 0x2000 | 3)
    memory._paging = lambda registers: Paging.from_registers(cr0=0x80000011, cr3=0x9000, cr4=0x20, efer=0x500)
    assert stop(at["small"])[1] == 1 and stop(at["small"])[1] == 1
    memory._paging = lambda registers: paging
    # A reboot: nothing kept, no lasting ranges until the new boot's are given.
    memory.forget_boot()
    assert stop(at["small"])[1] == 1 and stop(at["small"])[1] == 1


def test_flat_view_keeps_ram_outside_the_legacy_window():
    text = """FlatView #0
 AS "memory", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 1, ram): pc.ram @00000000000e0000
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000

FlatView #1
 AS "I/O", root: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""
    got = [(r.start, r.end, r.name) for r in parse_flat_view(text)]
    assert got == [(0, 0xA0000, "pc.ram"), (0x100000, 0xC0000000, "pc.ram"), (1 << 32, 0x140000000, "pc.ram")]


# -- the stub's path: one round trip a hit for dependent reads, predicted and verified ----------------

NAMES = ["alpha", "beta", "gamma", "delta"]


async def test_stub_path_predicts_dependent_reads(guest_i386):
    """Through the stub only, a probe whose fields need two rounds (a pointer, then what it points at) costs
    one batch of `m` per hit from the second hit on: the last hit's dependent reads go with the first round
    and are found in the stop's cache. A pointer that changes every hit (the name) is read again, right."""
    stable = ["a=+4(%sp):s32", "ret=+0(%sp):x32", "code=+0(+0(%sp)):x32", "turns=@turns:u32"]
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True, guest_memory="gdbstub") as engine:
        target = engine.target
        assert not target.memory.direct
        batches = []
        read_many_stub = target.read_many_stub

        async def counted(requests):
            batches.append(list(requests))
            return await read_many_stub(requests)

        target.read_many_stub = counted
        runs = {}
        for label, fields in (("stable", stable), ("name", [*stable, "name=+0(+12(%sp)):string"])):
            probe = await engine.add_probe("probe_target", pre=fields)
            batches.clear()
            with engine.hub.subscribe(probe.id) as sub:
                await engine.resume()
                runs[label] = [(await sub.receive())["pre"] for _ in range(20)]
            await engine.hold()
            await engine.remove_probe(probe.id)
            if label == "stable":
                # Only the probe's batches: each one reads the stack (the engine's own reads are code at pc).
                ours = [b for b in batches if any(n == 4 for _, n in b)]
                cached, hits = target.memory.stats["cached"], probe.hits
        ret = int(runs["stable"][0]["ret"], 16)
        (want,) = await engine.call_stopped(lambda: read_many_stub([(ret, 4)]))
    for label, records in runs.items():
        first = records[0]["a"]
        for n, rec in enumerate(records, start=first):
            assert rec["a"] == n and rec["turns"] == n - 1 and rec["code"] == f"{int.from_bytes(want, 'little'):#x}"
            if label == "name":
                assert rec["name"] == NAMES[n % 4]
    assert hits >= 20
    assert cached == hits - 1  # the code at the return address, from hit 2 on
    assert len(ours) == 2 + hits - 1  # two rounds at the first hit, then one a hit
