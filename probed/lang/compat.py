"""Fetch args in 32-bit (compat) processes on an x86_64 Linux kernel: the i386 user ABI, chosen at each hit.

One user probe can fire in 64-bit and 32-bit processes alike (a file is mapped by whoever maps it), so its
fetch args are parsed twice on x86_64: for 64-bit code (SysV: `$argN` in rdi, rsi, rdx, rcx, r8, r9) and
for 32-bit code (i386 cdecl: every argument on the user stack, `$arg1` at sp+4 at the function's entry).
Which one runs is decided per hit by `is_compat`: the stop's CS selector is 0x23 (`__USER32_CS`) in 32-bit
user code; 64-bit user code runs with 0x33 (`__USER_CS`, the kernel's own `user_64bit_mode` test).

In a 32-bit process the registers are their low 32 bits (eax... eip; `$retval` is eax), `x` and `symbol`
fields default to 32 bits, and a pointer read from user memory is 4 bytes (`:ustring` of a `char *`,
`+0(+4(%sp))`). The kernel's own data stays 64-bit: a pointer read from a kernel address (the canonical
upper half, as `$comm`, `$pid` and `$current->...` read the task) is 8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from .program import FetchProgram

__all__ = ["USER32_CS", "CompatProgram", "compat_arch", "is_compat"]

USER32_CS = 0x23  # __USER32_CS: the selector of 32-bit user code on x86_64 Linux
KERNEL_HALF = 1 << 63  # x86_64 kernel addresses are the canonical upper half
_I386_REGISTERS = frozenset(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "eflags"))


def is_compat(regs: Mapping[str, int]) -> bool:
    """Whether the registers of a user-mode stop are a 32-bit (compat) process's."""
    try:
        return regs["cs"] & 0xFFFF == USER32_CS
    except KeyError:  # no CS in the target's description: take it as the target's own width
        return False


def compat_arch(arch: Any) -> Any:
    """The x86_64 arch as a 32-bit process's code sees it: the same registers, i386's word and arguments."""
    return replace(arch, word_size=4, arg_registers=())


class _Low32(Mapping[str, int]):
    """Registers with the i386 ones cut to 32 bits (their upper halves mean nothing to 32-bit code)."""

    def __init__(self, regs: Mapping[str, int]):
        self._regs = regs

    def __getitem__(self, name: str) -> int:
        value = self._regs[name]
        return value & 0xFFFF_FFFF if name in _I386_REGISTERS else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._regs)

    def __len__(self) -> int:
        return len(self._regs)


class CompatProgram(FetchProgram):
    """A fetch program for 32-bit processes on an x86_64 kernel (built with `compat_arch`'s arch)."""

    _address_bits = 64  # user addresses are below 4 GiB anyway; kernel ones ($comm...) must stay whole

    def _registers(self, regs: Mapping[str, int]) -> Mapping[str, int]:
        return _Low32(regs)

    def _pointer_size(self, address: int) -> int:
        return 8 if address & KERNEL_HALF else 4
