"""Probes start on instruction boundaries, on every guest: offsets inside an instruction are refused with the
nearest boundaries named, and the guest goes on as if nothing had been asked."""

from __future__ import annotations

import pytest
import trio

from probed.api import attach
from probed.errors import BadSpec
from probed.guest.insn import NotAnInstructionBoundary, check_boundary

FENTRY_NOP = bytes.fromhex("0f1f440000")  # nopl 0x0(%rax,%rax,1): the 5-byte ftrace site Debian's functions open with
PROLOGUE = FENTRY_NOP + bytes.fromhex("55") + bytes.fromhex("4889e5") + bytes.fromhex("c3")  # push rbp; mov rbp,rsp; ret


@pytest.mark.parametrize("offset", [0, 5, 6, 9])
def test_boundaries_pass(offset):
    check_boundary(f"f+{offset}", "f", offset, PROLOGUE, "x86_64")


@pytest.mark.parametrize(("offset", "before", "after", "what"), [
    (1, 0, 5, "nop dword ptr [rax + rax], 5 bytes"), (4, 0, 5, "nop dword ptr [rax + rax], 5 bytes"),
    (7, 6, 9, "mov rbp, rsp, 3 bytes"),
])
def test_offsets_inside_an_instruction_are_refused(offset, before, after, what):
    with pytest.raises(NotAnInstructionBoundary) as info:
        check_boundary(f"vfs_read+{offset}", "vfs_read", offset, PROLOGUE, "x86_64")
    error = info.value
    assert isinstance(error, BadSpec) and (error.before, error.after) == (before, after)
    assert error.reason == (f"offset {offset:#x} is inside the instruction at vfs_read+{before:#x} ({what}): the nearest "
                            f"instruction boundaries are vfs_read+{before:#x} and vfs_read+{after:#x}")
    assert error.data()["before"] == before and error.data()["after"] == after


def test_fixed_width_isas_need_alignment_only():
    check_boundary("f+8", "f", 8, b"", "aarch64")
    with pytest.raises(NotAnInstructionBoundary, match="aarch64 instructions are 4-byte aligned\\): nearest are f\\+0x4 and f\\+0x8"):
        check_boundary("f+6", "f", 6, b"", "aarch64")
    check_boundary("f+6", "f", 6, b"", "riscv64")
    with pytest.raises(NotAnInstructionBoundary, match="2-byte aligned"):
        check_boundary("f+3", "f", 3, b"", "riscv64")


def test_undecodable_code_is_not_refused():
    check_boundary("f+3", "f", 3, b"\xff\xff\xff\xff\xff\xff", "x86_64")  # nothing proves 3 is inside anything


async def test_every_bundled_guest_refuses_an_offset_inside_an_instruction(guest):
    # reg_change_insn is `mov $0x22222222, %eax` (5 bytes) then `ret` (tests' guests/common.S).
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
        for offset in (1, 2, 4):
            with pytest.raises(NotAnInstructionBoundary) as info:
                await engine.add_probe(f"reg_change_insn+{offset}")
            assert (info.value.before, info.value.after) == (0, 5)
            assert "inside the instruction at reg_change_insn+0x0 (mov eax, 0x22222222, 5 bytes)" in str(info.value)
        assert engine.probes() == []
        probe = await engine.add_probe("reg_change_insn+5", pre=["pc=%ip:u64"])  # the ret: a boundary
        with trio.fail_after(30), engine.hub.subscribe(probe.id) as sub:
            await engine.resume()
            rec = await sub.receive()
    assert rec["pre"]["pc"] == engine.symbols.lookup("reg_change_insn").address + 5
