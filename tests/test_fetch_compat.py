"""Fetch args of user probes in 32-bit (compat) processes on x86_64, on fake hits: one handler follows the
i386 user ABI or the SysV one at each hit, as the stop's CS selector says (probed.lang.compat)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from probed.lang.compat import USER32_CS, is_compat
from probed.lang.fetch import FetchEnv
from probed.lang.handlers import FetchHandler
from rsp.arch import ARCHES
from tests.btf_builder import model_kernel_types
from tests.test_fetch import FakeHit, put, word

X64 = replace(ARCHES["x86_64"], registers=(*ARCHES["x86_64"].registers, "fs_base", "gs_base", "k_gs_base"))
USER64_CS = 0x33

# The kernel's data in the canonical upper half (pointers there are 8 bytes in any process).
KGS, CURRENT_OFF, TASK = 0xFFFF_8880_0001_0000, 0x100, 0xFFFF_8880_0000_4000
SP32, NAME32, TABLE32 = 0xFFFF_D000, 0x0804_A000, 0x0804_B000  # a 32-bit process's stack and data
NAME64 = 0x7FFF_0000_1000


@pytest.fixture(scope="module")
def types():
    return model_kernel_types(CURRENT_OFF)


def memory() -> dict[int, int]:
    mem: dict[int, int] = {}
    put(mem, KGS + CURRENT_OFF, word(TASK))
    put(mem, TASK, word(1, 4) + word(42, 4) + word(41, 4) + word(0, 4) + word(0) + word(0) + b"u32\0".ljust(16, b"\0"))
    # i386 entry of f(7, -2, NAME32): the return address at sp, then the arguments, 4 bytes each.
    put(mem, SP32, word(0x0804_9123, 4) + word(7, 4) + word(-2, 4) + word(NAME32, 4))
    put(mem, NAME32, b"thirty-two\0")
    put(mem, TABLE32, word(NAME32, 4) + word(NAME32 + 7, 4))  # a 32-bit char *[2]
    put(mem, NAME64, b"sixty-four\0")
    return mem


def compat_hit() -> FakeHit:
    # The upper halves are noise: 32-bit code neither sees nor sets them.
    noise = 0xDEAD_0000_0000_0000
    regs = {"cs": USER32_CS, "rsp": noise | SP32, "rax": noise | 5, "rdi": 1, "rsi": 2, "rdx": 3,
            "rip": 0x0804_9000, "k_gs_base": KGS, "gs_base": 0}
    return FakeHit(regs, memory())


def native_hit() -> FakeHit:
    regs = {"cs": USER64_CS, "rsp": 0x7FFF_0000_8000, "rax": 5, "rdi": 7, "rsi": (-2) & (2**64 - 1), "rdx": NAME64,
            "rip": 0x40_1000, "k_gs_base": KGS, "gs_base": 0}
    return FakeHit(regs, memory())


ARGS = ["$comm", "$pid", "a=$arg1:s32", "b=$arg2:s32", "s=$arg3:ustring", "c=+0($arg3):char", "x=$arg2", "ax=%ax"]


async def test_one_handler_follows_each_hits_abi(types):
    handler = FetchHandler(ARGS, X64, None, FetchEnv(user=True, types=types))
    assert handler.needs_memory  # the i386 ABI's $argN are on the stack
    assert await handler.run(compat_hit()) == {
        "comm": "u32", "pid": 41, "a": 7, "b": -2, "s": "thirty-two", "c": "t", "x": "0xfffffffe", "ax": "0x5"}
    assert await handler.run(native_hit()) == {
        "comm": "u32", "pid": 41, "a": 7, "b": -2, "s": "sixty-four", "c": "s", "x": "0xfffffffffffffffe", "ax": "0x5"}


async def test_user_pointers_are_4_bytes_and_the_stack_is_32_bit(types):
    handler = FetchHandler(["t=+0(%di):string[2]", "sp=$stack", "ra=$stack0", "third=$stack3:u32", "ip=%ip"],
                           X64, None, FetchEnv(user=True, types=types))
    ctx = compat_hit()
    ctx.regs["rdi"] = TABLE32
    assert await handler.run(ctx) == {"t": ["thirty-two", "two"], "sp": hex(SP32), "ra": "0x8049123",
                                      "third": NAME32, "ip": "0x8049000"}


def test_compat_is_told_by_the_code_selector():
    assert is_compat({"cs": 0x23}) and not is_compat({"cs": 0x33}) and not is_compat({})


def test_kernel_probes_and_other_arches_have_one_program(types):
    assert FetchHandler(["$arg1"], X64, None, FetchEnv(types=types)).compat is None
    assert FetchHandler(["$arg1"], ARCHES["i386"], None, FetchEnv(user=True)).compat is None


async def test_retval_is_eax_in_a_return_probe(types):
    handler = FetchHandler(["r=$retval:s32", "$retval"], X64, None, FetchEnv(user=True, types=types, retprobe=True))
    ctx = compat_hit()
    ctx.regs["rax"] |= 0xFFFF_FFFF  # -1 in eax, noise above it
    assert await handler.run(ctx) == {"r": -1, "arg2": "0xffffffff"}  # (x32 by default)
