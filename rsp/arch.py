"""What probes need to know about each architecture: pc, sp, arguments, breakpoint kind, register aliases.

Register names are the ones QEMU 7.2's target descriptions use (`eax`, `rip`, `x0`, and for RISC-V the ABI
names `zero ra sp ... fp s1 a0 ...`, with x8 called `fp`). Aliases are what Linux `kprobe_events` accepts
(`%ax`, `%di`, `%ip`, `%flags` on x86, which are `pt_regs` field names) plus the numeric or ABI names the
description does not use (`x10` or `s0` on RISC-V, `lr`/`fp` on AArch64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import RSPError
from .tdesc import TargetDescription, UnknownRegister

__all__ = ["ARCHES", "Arch", "UnknownArchitecture", "UnknownRegister", "arch_for"]


class UnknownArchitecture(RSPError):
    """The target's architecture is not one probed knows."""


ArgLocation = tuple[Literal["reg"], str] | tuple[Literal["stack"], int]


@dataclass(frozen=True)
class Arch:
    """One architecture's conventions.

    Attributes:
        name: "i386", "x86_64", "aarch64" or "riscv64".
        word_size: bytes in a pointer.
        pc, sp, fp: the register names of the program counter, stack pointer and frame pointer.
        breakpoint_kind: the `kind` of `Z0`/`Z1` (the breakpoint instruction's length).
        arg_registers: where the first arguments are at function entry; () when all are on the stack.
        return_register: where a function's return value is.
        return_address_on_stack: True when a call pushes the return address (x86), so that stacked
            arguments start one word above sp at function entry.
        registers: the register names of the target (from its description, see `arch_for`).
        aliases: other names for registers, alias -> register name.
    """

    name: str
    word_size: int
    pc: str
    sp: str
    fp: str | None
    breakpoint_kind: int
    arg_registers: tuple[str, ...]
    return_register: str
    return_address_on_stack: bool
    registers: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict, hash=False)

    def resolve_register(self, name: str) -> str:
        """The description's name for a register: `%di`, `di` and `rdi` all give `rdi` on x86_64.

        Raises:
            UnknownRegister: neither a register nor an alias; the message lists the valid names.
        """
        bare = name[1:] if name.startswith("%") else name
        if bare in self.registers:
            return bare
        alias = self.aliases.get(bare)
        if alias is not None:
            return alias
        raise UnknownRegister(bare, (*self.registers, *sorted(self.aliases)), self.name)

    def arg_location(self, n: int) -> ArgLocation:
        """Where argument `n` (counted from 1) is at function entry, for integer and pointer arguments.

        Returns:
            ("reg", register name), or ("stack", byte offset from sp) for the word to read.

        Raises:
            ValueError: n < 1.
        """
        if n < 1:
            raise ValueError(f"arguments are counted from 1, not {n}")
        if n <= len(self.arg_registers):
            return ("reg", self.arg_registers[n - 1])
        # The stacked arguments follow the return address on x86 (cdecl and the SysV AMD64 ABI); AArch64
        # and RISC-V pass the return address in a register, so the first stacked argument is at sp.
        stacked = n - len(self.arg_registers) - (0 if self.return_address_on_stack else 1)
        return ("stack", self.word_size * stacked)


def _x86_aliases(prefix: str) -> dict[str, str]:
    # kprobe_events uses pt_regs names: ax bx cx dx si di bp sp ip flags, plus r8..r15 on x86_64.
    aliases = {short: prefix + short for short in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip")}
    aliases["flags"] = "eflags"
    return aliases


# x0..x31 in order; QEMU calls x8 `fp` (not `s0`).
_RISCV_ABI_NAMES = (
    *"zero ra sp gp tp t0 t1 t2 fp s1".split(),
    *(f"a{i}" for i in range(8)),
    *(f"s{i}" for i in range(2, 12)),
    *"t3 t4 t5 t6".split(),
)

ARCHES: dict[str, Arch] = {
    "i386": Arch(
        name="i386",
        word_size=4,
        pc="eip",
        sp="esp",
        fp="ebp",
        breakpoint_kind=1,
        arg_registers=(),
        return_register="eax",
        return_address_on_stack=True,
        registers=tuple("eax ecx edx ebx esp ebp esi edi eip eflags cs ss ds es fs gs".split()),
        aliases=_x86_aliases("e"),
    ),
    "x86_64": Arch(
        name="x86_64",
        word_size=8,
        pc="rip",
        sp="rsp",
        fp="rbp",
        breakpoint_kind=1,
        arg_registers=("rdi", "rsi", "rdx", "rcx", "r8", "r9"),
        return_register="rax",
        return_address_on_stack=True,
        registers=(
            *"rax rbx rcx rdx rsi rdi rbp rsp".split(),
            *(f"r{i}" for i in range(8, 16)),
            *"rip eflags cs ss ds es fs gs".split(),
        ),
        aliases=_x86_aliases("r"),
    ),
    "aarch64": Arch(
        name="aarch64",
        word_size=8,
        pc="pc",
        sp="sp",
        fp="x29",
        breakpoint_kind=4,
        arg_registers=tuple(f"x{i}" for i in range(8)),
        return_register="x0",
        return_address_on_stack=False,
        registers=(*(f"x{i}" for i in range(31)), "sp", "pc", "cpsr"),
        aliases={"lr": "x30", "fp": "x29", "pstate": "cpsr"},
    ),
    # Kind 4: QEMU emulates breakpoints without patching memory, so the kind only has to be one a RISC-V
    # GDB would send; 4 (a full `ebreak`) is valid with or without the C extension.
    "riscv64": Arch(
        name="riscv64",
        word_size=8,
        pc="pc",
        sp="sp",
        fp="fp",
        breakpoint_kind=4,
        arg_registers=tuple(f"a{i}" for i in range(8)),
        return_register="a0",
        return_address_on_stack=False,
        registers=(*_RISCV_ABI_NAMES, "pc"),
        aliases={**{f"x{i}": abi for i, abi in enumerate(_RISCV_ABI_NAMES)}, "s0": "fp"},
    ),
}

# <architecture> as QEMU 7.2 writes it (BFD names), to our arch names.
_BY_TDESC_ARCHITECTURE = {
    "i386": "i386",
    "i386:x86-64": "x86_64",
    "aarch64": "aarch64",
    "riscv:rv64": "riscv64",
}


def arch_for(tdesc: TargetDescription) -> Arch:
    """The arch of a target, its register names taken from the target's own description.

    Aliases whose target the description lacks are dropped, so `resolve_register` never answers a name
    the target cannot read.

    Raises:
        UnknownArchitecture: an `<architecture>` probed does not know (the message lists those it does).
    """
    key = _BY_TDESC_ARCHITECTURE.get(tdesc.architecture or "")
    if key is None:
        known = ", ".join(_BY_TDESC_ARCHITECTURE)
        raise UnknownArchitecture(
            f"unsupported target architecture {tdesc.architecture!r}; supported: {known}"
        )
    base = ARCHES[key]
    names = tuple(r.name for r in tdesc.registers)
    aliases = {alias: real for alias, real in base.aliases.items() if real in names and alias not in names}
    return replace(base, registers=names, aliases=aliases)
