"""What probes need to know about each architecture: pc, sp, argument registers, breakpoint kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import RSPError
from .tdesc import TargetDescription

__all__ = ["ARCHES", "Arch", "UnknownArchitecture", "UnknownRegister", "arch_for"]


class UnknownArchitecture(RSPError):
    """The target's architecture is not one probed knows."""


class UnknownRegister(RSPError, KeyError):
    """A register name that is neither a target register nor an alias."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "unknown register"


@dataclass(frozen=True)
class Arch:
    """One architecture's conventions.

    `arg_registers` empty means all arguments are on the stack (i386 cdecl: at function entry the return
    address is at sp and argument N at sp + word * N).
    """

    name: str
    word_size: int
    pc: str
    sp: str
    fp: str | None
    breakpoint_kind: int
    arg_registers: tuple[str, ...]
    return_register: str
    registers: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    def resolve_register(self, name: str) -> str:
        """`%di`, `di` or `rdi` to the target-description name `rdi`.

        Raises:
            UnknownRegister: with the valid names.
        """
        bare = name[1:] if name.startswith("%") else name
        if bare in self.registers:
            return bare
        if bare in self.aliases:
            return self.aliases[bare]
        valid = ", ".join(list(self.registers[:24]) + sorted(self.aliases))
        raise UnknownRegister(f"unknown register %{bare} on {self.name}; valid: {valid}")

    def arg_location(self, n: int) -> tuple[str, int]:
        """Where argument `n` (1-based) is at function entry: ("reg", name) or ("stack", byte offset from sp)."""
        if n < 1:
            raise ValueError("arguments are numbered from 1")
        if n <= len(self.arg_registers):
            return ("reg", self.arg_registers[n - 1])  # type: ignore[return-value]
        extra = n - len(self.arg_registers)
        # x86: the return address is at sp; stacked arguments follow it.
        return ("stack", self.word_size * extra)


_X86_64_REGS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    *(f"r{i}" for i in range(8, 16)), "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)
_I386_REGS = (
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags",
    "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)
_X86_ALIASES = ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip")

ARCHES: dict[str, Arch] = {
    "i386": Arch(
        "i386", 4, "eip", "esp", "ebp", 1, (), "eax", _I386_REGS,
        {**{a: "e" + a for a in _X86_ALIASES}, "flags": "eflags"},
    ),
    "x86_64": Arch(
        "x86_64", 8, "rip", "rsp", "rbp", 1, ("rdi", "rsi", "rdx", "rcx", "r8", "r9"), "rax", _X86_64_REGS,
        {**{a: "r" + a for a in _X86_ALIASES}, "flags": "eflags",
         **{f"e{a}": "r" + a for a in _X86_ALIASES}},
    ),
    "aarch64": Arch(
        "aarch64", 8, "pc", "sp", "x29", 4, tuple(f"x{i}" for i in range(8)), "x0",
        (*(f"x{i}" for i in range(31)), "sp", "pc", "cpsr"), {"lr": "x30", "fp": "x29"},
    ),
    "riscv64": Arch(
        "riscv64", 8, "pc", "sp", "fp", 4, tuple(f"a{i}" for i in range(8)), "a0",
        ("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "fp", "s1", *(f"a{i}" for i in range(8)),
         *(f"s{i}" for i in range(2, 12)), "t3", "t4", "t5", "t6", "pc"),
        {**{f"x{i}": n for i, n in enumerate(("zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "fp", "s1"))},
         **{f"x{10 + i}": f"a{i}" for i in range(8)}, "s0": "fp"},
    ),
}

_BY_TDESC = {"i386": "i386", "i386:x86-64": "x86_64", "aarch64": "aarch64", "riscv:rv64": "riscv64"}


def arch_for(tdesc: TargetDescription) -> Arch:
    """The arch of a target description, its register names taken from the description itself.

    Raises:
        UnknownArchitecture: an architecture probed does not know.
    """
    key = _BY_TDESC.get(tdesc.architecture or "")
    if key is None:
        raise UnknownArchitecture(f"unsupported architecture {tdesc.architecture!r}; known: {', '.join(_BY_TDESC)}")
    base = ARCHES[key]
    names = tuple(r.name for r in tdesc.registers)
    return Arch(base.name, base.word_size, base.pc, base.sp, base.fp, base.breakpoint_kind, base.arg_registers,
                base.return_register, names, {k: v for k, v in base.aliases.items() if v in names})
