"""The instruction simulator on made-up register blocks (the layouts are QEMU's own, read once).

What it does step by step on real code is pinned against QEMU itself in `test_stub.py`; here are the
rules around it: what it refuses, and the corners of what it does.
"""

from __future__ import annotations

import pytest
import trio

from probed.engine.target import Target
from probed.guest.symbols import SymbolStore
from probed.sim.emulate import AF, CF, OF, PF, SF, ZF, Emulator
from probed.testing.qemu import QemuGuest
from rsp.connection import RSPClient

KERNEL_CS, USER_CS = 0x08, 0x1B


IMAGE = ([(0x10000, 0x20000), (0x30000, 0x31000)], [(0x30000, 0x31000)])  # text+rodata, then data


def _emulator(arch: str) -> Emulator:
    async def read_layout():
        with QemuGuest(arch) as guest:
            target = Target(await RSPClient.connect(guest.target), SymbolStore())
            await target.attach()
            await target.client.aclose()
            return target

    target = trio.run(read_layout)
    return Emulator(target.arch, target.layout, lambda: IMAGE)


@pytest.fixture(scope="module")
def i386() -> Emulator:
    return _emulator("i386")


@pytest.fixture(scope="module")
def x86_64() -> Emulator:
    return _emulator("x86_64")


def block(emu: Emulator, **values: int) -> bytes:
    regs = {r.name: 0 for r in emu.layout.g_registers}
    regs.update(values)
    return emu.layout.encode(regs)


class Memory:
    """Guest memory as a dict of bytes; reads outside it fail, as unmapped memory does."""

    def __init__(self, contents: dict[int, bytes] | None = None):
        self.bytes: dict[int, int] = {}
        for address, data in (contents or {}).items():
            for i, b in enumerate(data):
                self.bytes[address + i] = b
        self.reads: list[tuple[int, int]] = []

    async def read(self, address: int, length: int) -> bytes | None:
        self.reads.append((address, length))
        if all(address + i in self.bytes for i in range(length)):
            return bytes(self.bytes[address + i] for i in range(length))
        return None


async def simulate(emu: Emulator, code: bytes, g: bytes, pc: int, memory: Memory | None = None):
    plan = emu.plan(code)
    assert plan is not None, code.hex()
    return await emu.run(plan, g, pc, (memory or Memory()).read)


def reg(emu: Emulator, g: bytes, name: str) -> int:
    return emu.layout.value(g, name)


async def test_call_pushes_the_return_address_and_ret_pops_it(i386):
    g = block(i386, esp=0x2100, eip=0x1000, cs=KERNEL_CS)
    out = await simulate(i386, bytes.fromhex("e8 10 00 00 00"), g, 0x1000)  # call 0x1015
    assert reg(i386, out.registers, "eip") == 0x1015 and reg(i386, out.registers, "esp") == 0x20FC
    assert out.writes == [(0x20FC, (0x1005).to_bytes(4, "little"))]
    # Memory goes first, the pc last: the guest never sees a half-done instruction as done.
    assert out.packets[0].startswith(b"M20fc,4:") and out.packets[-1].startswith(b"P8=")
    back = await simulate(i386, b"\xc3", out.registers, 0x1015, Memory({0x20FC: (0x1005).to_bytes(4, "little")}))
    assert reg(i386, back.registers, "eip") == 0x1005 and reg(i386, back.registers, "esp") == 0x2100
    # A push into the page below the stack's: that page may not be there (a guard page); stepped.
    assert await simulate(i386, bytes.fromhex("e8 10 00 00 00"), block(i386, esp=0x2000, cs=KERNEL_CS), 0x1000) is None


async def test_leave_and_ret_imm(i386):
    g = block(i386, esp=0x1F00, ebp=0x1F80, cs=KERNEL_CS)
    out = await simulate(i386, b"\xc9", g, 0x100, Memory({0x1F80: (0x1FC0).to_bytes(4, "little")}))
    assert (reg(i386, out.registers, "esp"), reg(i386, out.registers, "ebp")) == (0x1F84, 0x1FC0)
    out = await simulate(i386, bytes.fromhex("c2 08 00"), g, 0x100, Memory({0x1F00: b"\x00\x02\x00\x00"}))
    assert (reg(i386, out.registers, "eip"), reg(i386, out.registers, "esp")) == (0x200, 0x1F0C)


async def test_conditional_jumps_follow_the_flags(i386):
    zf = 1 << 6
    for eflags, taken in ((zf, True), (0, False)):
        out = await simulate(i386, b"\x74\x10", block(i386, eflags=eflags), 0x500)  # je +0x10
        assert reg(i386, out.registers, "eip") == (0x512 if taken else 0x502)
    sf, of = 1 << 7, 1 << 11
    for eflags, less in ((sf, True), (of, True), (sf | of, False), (0, False)):
        out = await simulate(i386, b"\x7c\x10", block(i386, eflags=eflags), 0x500)  # jl +0x10
        assert reg(i386, out.registers, "eip") == (0x512 if less else 0x502)


async def test_a_32_bit_write_clears_the_upper_half_on_x86_64(x86_64):
    g = block(x86_64, rax=0xFFFF_FFFF_0000_0001, rcx=0x1234_5678_9ABC_DEF0)
    out = await simulate(x86_64, b"\x89\xc8", g, 0x1000)  # mov eax, ecx
    assert reg(x86_64, out.registers, "rax") == 0x9ABC_DEF0
    out = await simulate(x86_64, b"\x48\x89\xc8", g, 0x1000)  # mov rax, rcx
    assert reg(x86_64, out.registers, "rax") == 0x1234_5678_9ABC_DEF0


async def test_rip_relative_loads_and_lea(x86_64):
    g = block(x86_64, cs=KERNEL_CS, rsp=0x8000)
    memory = Memory({0x11017: (0xDEADBEEF).to_bytes(8, "little")})
    out = await simulate(x86_64, bytes.fromhex("48 8b 05 10 10 00 00"), g, 0x10000, memory)  # mov rax, [rip+0x1010]
    assert reg(x86_64, out.registers, "rax") == 0xDEADBEEF
    out = await simulate(x86_64, bytes.fromhex("48 8d 05 10 10 00 00"), g, 0x10000)  # lea rax, [rip+0x1010]
    assert reg(x86_64, out.registers, "rax") == 0x11017


async def test_memory_only_in_kernel_mode_and_stores_only_on_the_stack(i386):
    store = bytes.fromhex("89 45 fc")  # mov [ebp-4], eax
    kernel = block(i386, cs=KERNEL_CS, esp=0x1F00, ebp=0x1F80, eax=7)
    out = await simulate(i386, store, kernel, 0x100)
    assert out.writes == [(0x1F7C, (7).to_bytes(4, "little"))]
    # In user mode the debugger's access would skip the CPU's checks (copy-on-write, read-only pages).
    assert await simulate(i386, store, block(i386, cs=USER_CS, esp=0x1F00, ebp=0x1F80), 0x100) is None
    assert await simulate(i386, b"\x50", block(i386, cs=USER_CS, esp=0x1F00), 0x100) is None  # push eax
    # Away from the stack's pages: stepped, whatever the mode.
    assert await simulate(i386, store, block(i386, cs=KERNEL_CS, esp=0x1F00, ebp=0x9000), 0x100) is None
    # Register-only instructions need no memory, in any mode.
    out = await simulate(i386, b"\x89\xc3", block(i386, cs=USER_CS, eax=5), 0x100)  # mov ebx, eax
    assert reg(i386, out.registers, "ebx") == 5


async def test_a_load_the_target_cannot_read_is_stepped(i386):
    memory = Memory()
    g = block(i386, cs=KERNEL_CS, ebp=0x1F80)
    assert await simulate(i386, bytes.fromhex("8b 45 08"), g, 0x100, memory) is None  # mov eax, [ebp+8]
    assert memory.reads == [(0x1F88, 4)]


@pytest.mark.parametrize(
    "code, what",
    [
        ("d1 e8", "shr eax, 1: shifts are stepped"),
        ("11 c8", "adc eax, ecx: carries in"),
        ("00 c8", "add al, cl: an 8-bit register written"),
        ("01 08", "add [eax], ecx: a read-modify-write"),
        ("66 89 c8", "mov ax, cx: a 16-bit write keeps the upper bits"),
        ("64 a1 00 00 00 00", "mov eax, fs:[0]: a segment base"),
        ("f0 ff 00", "lock inc [eax]"),
        ("f3 a4", "rep movsb"),
        ("0f 22 c0", "mov cr0, eax"),
        ("8e d8", "mov ds, eax"),
        ("67 8b 00", "an address-size override"),
        ("ff 10", "call [eax]"),
        ("cd 80", "int 0x80"),
    ],
)
def test_what_is_not_simulated(i386, code, what):
    assert i386.plan(bytes.fromhex(code)) is None, what


async def test_memory_outside_the_stack_only_in_the_image(i386):
    g = block(i386, cs=KERNEL_CS, esp=0x1F00, eax=0x30010, ebx=0x10010, ecx=0xFEE00300, edx=7)
    memory = Memory({0x30010: b"\x01\x00\x00\x00", 0x10010: b"\x02\x00\x00\x00", 0xFEE00300: b"\x00" * 4})
    out = await simulate(i386, b"\x8b\x30", g, 0x100, memory)  # mov esi, [eax]: data
    assert reg(i386, out.registers, "esi") == 1
    out = await simulate(i386, b"\x8b\x33", g, 0x100, memory)  # mov esi, [ebx]: read-only data
    assert reg(i386, out.registers, "esi") == 2
    # A device register: what the debugger reads there is not what the CPU reads.
    assert await simulate(i386, b"\x8b\x31", g, 0x100, memory) is None  # mov esi, [ecx]
    out = await simulate(i386, b"\x89\x10", g, 0x100)  # mov [eax], edx: writable data
    assert out.writes == [(0x30010, b"\x07\x00\x00\x00")]
    assert await simulate(i386, b"\x89\x13", g, 0x100) is None  # mov [ebx], edx: read-only


@pytest.mark.parametrize(
    "code, eax, ecx, eflags, want_eax, want_flags",
    [
        # add: carry out, signed overflow, auxiliary carry, parity of the low byte.
        ("01 c8", 0xFFFFFFFF, 1, 0, 0, ZF | CF | AF | PF),
        ("01 c8", 0x7FFFFFFF, 1, 0, 0x80000000, SF | OF | AF | PF),
        # sub and cmp: borrow; cmp writes nothing.
        ("29 c8", 0, 1, 0, 0xFFFFFFFF, CF | SF | AF | PF),
        ("39 c8", 5, 5, CF, 5, ZF | PF),
        # inc keeps CF; logic clears CF, OF and AF.
        ("40", 0xFFFFFFFF, 0, CF, 0, ZF | PF | AF | CF),
        ("21 c8", 0xF0, 0x0F, CF | OF | AF, 0, ZF | PF),
        ("85 c0", 0x80000000, 0, 0, 0x80000000, SF | PF),
    ],
)
async def test_arithmetic_sets_the_flags(i386, code, eax, ecx, eflags, want_eax, want_flags):
    g = block(i386, eax=eax, ecx=ecx, eflags=eflags | 0x2)
    out = await simulate(i386, bytes.fromhex(code), g, 0x100)
    assert reg(i386, out.registers, "eax") == want_eax
    assert reg(i386, out.registers, "eflags") == want_flags | 0x2
