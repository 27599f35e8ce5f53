"""Executing simple x86 instructions without the CPU: a probe hit or a GDB step with no single-step.

Why: under TCG, QEMU flushes every translated block when single-stepping is switched on and again when
it is switched off (`cpu_single_step`), so every step makes the guest retranslate its hot code, and a
step costs two round trips (the step, then reading what it did). kprobes itself simulates instructions
instead of stepping them where it can; probed does the same: it works out the instruction's effect from
the registers (and memory it reads), and writes it with `M` (memory first) and `P` (registers, pc last).

Handled, in code of the target's own width (see `probed.sim.cpumode`), none of which changes the flags:
- `nop` forms (with `endbr32/64` and ftrace's 5-byte `nopl`);
- `mov` between registers, from an immediate, a load (`mov reg, [mem]`, `movzx`), a store
  (`mov [mem], reg/imm`), and `lea`;
- the stack: `push reg/imm`, `pop reg`, `leave`, `call` (relative or register), `ret` (and `ret imm16`);
- `jmp` (relative or register) and the conditional jumps (`jcc`), decided from EFLAGS.
Registers written must be full width (on x86_64 also 32-bit ones, which clear the upper half, as the CPU
does). Not handled (stepped instead): anything that computes flags, string and `lock`ed instructions,
`fs:`/`gs:` and address-size overrides, control, segment and system registers.

Memory is touched only in kernel mode (CPL 0; in user mode the privilege and copy-on-write checks that
the debugger's accesses skip would matter), and only where it is surely RAM that the CPU may use: the
stack's current page and the one above it, and the program's own image as the symbol files lay it out
(ELF sections; writable ones for stores). Elsewhere may be a device: QEMU answers a debugger's read of
the local APIC with zeros, where the CPU reads its registers. A load the debugger cannot read is stepped
too (the CPU would fault).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rsp.packets import write_memory, write_register

__all__ = ["Emulator", "NoEmulator", "Outcome", "Plan"]

MAX_INSN = 16
PAGE = 4096

Reader = Callable[[int, int], Awaitable[bytes | None]]
"""`read(address, length)`: guest memory, or None when it cannot be read."""

_FULL32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_FULL64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi") + tuple(f"r{n}" for n in range(8, 16))
_JCC = {
    "jo": lambda f: f["of"], "jno": lambda f: not f["of"],
    "jb": lambda f: f["cf"], "jae": lambda f: not f["cf"],
    "je": lambda f: f["zf"], "jne": lambda f: not f["zf"],
    "jbe": lambda f: f["cf"] or f["zf"], "ja": lambda f: not (f["cf"] or f["zf"]),
    "js": lambda f: f["sf"], "jns": lambda f: not f["sf"],
    "jp": lambda f: f["pf"], "jnp": lambda f: not f["pf"],
    "jl": lambda f: f["sf"] != f["of"], "jge": lambda f: f["sf"] == f["of"],
    "jle": lambda f: f["zf"] or f["sf"] != f["of"], "jg": lambda f: not f["zf"] and f["sf"] == f["of"],
}


_ALU = ("add", "sub", "cmp", "and", "or", "xor", "test")
CF, PF, AF, ZF, SF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11
_STATUS = CF | PF | AF | ZF | SF | OF


def _alu(op: str, a: int, b: int, size: int, eflags: int) -> tuple[int, int]:
    """The result and EFLAGS of `op a, b` on `size`-byte operands (`inc`/`dec`: b is 1; CF kept).

    The status flags as the SDM defines them; for the logic operations, whose AF the SDM leaves
    undefined, 0 (what QEMU's TCG gives, which the lockstep test holds us to).
    """
    bits = 8 * size
    mask = (1 << bits) - 1
    sign = 1 << (bits - 1)
    a &= mask
    b &= mask
    flags = 0
    if op in ("add", "inc"):
        full = a + b
        result = full & mask
        flags |= CF if full > mask else 0
        flags |= OF if (~(a ^ b) & (a ^ result)) & sign else 0
        flags |= AF if (a ^ b ^ result) & 0x10 else 0
    elif op in ("sub", "cmp", "dec"):
        result = (a - b) & mask
        flags |= CF if a < b else 0
        flags |= OF if ((a ^ b) & (a ^ result)) & sign else 0
        flags |= AF if (a ^ b ^ result) & 0x10 else 0
    else:
        result = {"and": a & b, "test": a & b, "or": a | b, "xor": a ^ b}[op]
    flags |= ZF if result == 0 else 0
    flags |= SF if result & sign else 0
    flags |= PF if bin(result & 0xFF).count("1") % 2 == 0 else 0
    if op in ("inc", "dec"):
        flags = (flags & ~CF) | (eflags & CF)
    return result, (eflags & ~_STATUS) | flags


@dataclass(frozen=True)
class Mem:
    """A memory operand: base + index * scale + disp (`base` "rip" counts from the next instruction)."""

    base: str | None
    index: str | None
    scale: int
    disp: int
    size: int


@dataclass(frozen=True)
class Plan:
    """How to simulate one decoded instruction.

    `dst`/`src` are register names (capstone's), `Mem` operands or int immediates, as `kind` needs.
    """

    kind: str  # nop mov movzx lea push pop leave call ret jmp jcc
    length: int
    dst: Any = None
    src: Any = None
    size: int = 0  # bytes moved (loads, stores, movzx sources)
    cond: str | None = None

    @property
    def touches_memory(self) -> bool:
        """Whether it reads or writes memory (a watchpoint would see the CPU do it, not a simulation)."""
        return self.kind in ("store", "push", "pop", "call", "ret", "leave") or (
            self.kind in ("mov", "movzx", "alu") and (isinstance(self.src, Mem) or isinstance(self.dst, Mem))
        )


@dataclass
class Outcome:
    """A simulated instruction: the register block after it, its memory writes, and the packets."""

    registers: bytes
    writes: list[tuple[int, bytes]]
    packets: list[bytes]


class Emulator:
    """Plans and effects of simulated instructions, for one x86 target (arch + register layout)."""

    def __init__(self, arch: Any, layout: Any, image: Callable[[], tuple[list, list]] | None = None):
        """Args:
            image: where the program's own memory is, `(readable, writable)` lists of (start, end) (see
                `SymbolStore.image_ranges`); loads and stores outside it and the stack are stepped.
        """
        self.arch = arch
        self.layout = layout
        self._image = image or (lambda: ([], []))
        self.word = {"i386": 4, "x86_64": 8}.get(arch.name, 0)
        self.mask = (1 << (8 * self.word)) - 1
        names = set(layout.registers)
        full = _FULL32 if self.word == 4 else _FULL64
        # Every general register name capstone may print -> (register in the layout, shift, bits).
        self._regs: dict[str, tuple[str, int, int]] = {}
        if self.word and all(n in names for n in full):
            self._map_registers(full)
        self._writable = {n for n, (_, shift, bits) in self._regs.items() if shift == 0 and bits >= 32}
        self._plan = lru_cache(maxsize=4096)(self._decode)

    def _map_registers(self, full: tuple[str, ...]) -> None:
        bits = 8 * self.word
        legacy = ("a", "c", "d", "b")
        for name in full:
            self._regs[name] = (name, 0, bits)
        for i, letter in enumerate(legacy):
            wide = full[i]
            if bits == 64:
                self._regs[f"e{letter}x"] = (wide, 0, 32)
            self._regs[f"{letter}x"] = (wide, 0, 16)
            self._regs[f"{letter}l"] = (wide, 0, 8)
            self._regs[f"{letter}h"] = (wide, 8, 8)
        for i, short in enumerate(("sp", "bp", "si", "di")):
            wide = full[4 + i]
            if bits == 64:
                self._regs[f"e{short}"] = (wide, 0, 32)
                self._regs[f"{short}l"] = (wide, 0, 8)
            self._regs[short] = (wide, 0, 16)
        if bits == 64:
            for n in range(8, 16):
                self._regs[f"r{n}d"] = (f"r{n}", 0, 32)
                self._regs[f"r{n}w"] = (f"r{n}", 0, 16)
                self._regs[f"r{n}b"] = (f"r{n}", 0, 8)

    @property
    def supported(self) -> bool:
        return bool(self._regs)

    # -- decoding ------------------------------------------------------------------------------------

    def plan(self, code: bytes) -> Plan | None:
        """The simulation plan for the instruction at the start of `code`, or None (step it)."""
        if not self.supported or not code:
            return None
        return self._plan(bytes(code[:MAX_INSN]))

    def _decode(self, code: bytes) -> Plan | None:
        import capstone

        md = _disassembler(capstone.CS_MODE_64 if self.word == 8 else capstone.CS_MODE_32)
        insn = next(md.disasm(code, 0, count=1), None)
        if insn is None:
            return None
        mnem, n = insn.mnemonic, insn.size
        if mnem in ("nop", "endbr64", "endbr32"):
            return Plan("nop", n)
        lock_rep, segment, _opsize, addrsize = insn.prefix
        if lock_rep or addrsize or segment in (0x64, 0x65):
            return None
        ops = [self._operand(insn, op) for op in insn.operands]
        if any(op is None for op in ops):
            return None
        word = self.word
        if mnem == "mov" or mnem == "movabs":
            dst, src = ops
            if isinstance(dst, str) and dst in self._writable:
                if isinstance(src, Mem):
                    return Plan("mov", n, dst, src, size=src.size) if src.size == self._bits(dst) // 8 else None
                return Plan("mov", n, dst, src) if isinstance(src, int) or self._bits(src) == self._bits(dst) else None
            if isinstance(dst, Mem) and (isinstance(src, int) or (isinstance(src, str) and self._bits(src) // 8 == dst.size)):
                return Plan("store", n, dst, src, size=dst.size)
            return None
        if mnem in _ALU and len(ops) == 2:
            dst, src = ops
            writes = mnem not in ("cmp", "test")
            if isinstance(dst, str):
                size = self._bits(dst) // 8
                if writes and dst not in self._writable:
                    return None
            elif isinstance(dst, Mem) and not writes:
                size = dst.size
            else:
                return None
            if isinstance(src, Mem):
                if isinstance(dst, Mem) or src.size != size:
                    return None
            elif isinstance(src, str) and self._bits(src) // 8 != size:
                return None
            return Plan("alu", n, dst, src, size=size, cond=mnem)
        if mnem in ("inc", "dec") and len(ops) == 1 and isinstance(ops[0], str) and ops[0] in self._writable:
            return Plan("alu", n, ops[0], 1, size=self._bits(ops[0]) // 8, cond=mnem)
        if mnem == "movzx":
            dst, src = ops
            if isinstance(dst, str) and dst in self._writable:
                size = src.size if isinstance(src, Mem) else self._bits(src) // 8
                return Plan("movzx", n, dst, src, size=size)
            return None
        if mnem == "lea":
            dst, src = ops
            if isinstance(dst, str) and dst in self._writable and isinstance(src, Mem):
                return Plan("lea", n, dst, src)
            return None
        if mnem == "push" and len(ops) == 1 and insn.operands[0].size == word and not isinstance(ops[0], Mem):
            return Plan("push", n, src=ops[0])
        if mnem == "pop" and len(ops) == 1 and isinstance(ops[0], str) and self._bits(ops[0]) == 8 * word:
            return Plan("pop", n, dst=ops[0])
        if mnem == "leave" and not ops:
            return Plan("leave", n)
        if mnem == "ret":
            if not ops:
                return Plan("ret", n, src=0)
            return Plan("ret", n, src=insn.operands[0].imm & 0xFFFF)
        if mnem in ("call", "jmp") and len(ops) == 1 and not isinstance(ops[0], Mem):
            if isinstance(ops[0], str) and self._bits(ops[0]) != 8 * word:
                return None
            return Plan(mnem, n, src=ops[0])
        if mnem in _JCC and len(ops) == 1 and isinstance(ops[0], int):
            return Plan("jcc", n, src=ops[0], cond=mnem)
        return None

    def _operand(self, insn: Any, op: Any) -> str | Mem | int | None:
        import capstone.x86 as x86

        if op.type == x86.X86_OP_REG:
            name = insn.reg_name(op.reg)
            return name if name in self._regs else None
        if op.type == x86.X86_OP_IMM:
            return op.imm
        if op.type == x86.X86_OP_MEM:
            mem = op.mem
            if mem.segment not in (0, x86.X86_REG_INVALID) and insn.reg_name(mem.segment) in ("fs", "gs"):
                return None
            base = insn.reg_name(mem.base) if mem.base else None
            index = insn.reg_name(mem.index) if mem.index else None
            if base not in (None, "rip") and base not in self._regs:
                return None
            if index is not None and index not in self._regs:
                return None
            return Mem(base, index, mem.scale, mem.disp, op.size)
        return None

    def _bits(self, name: str) -> int:
        return self._regs[name][2]

    # -- effects -------------------------------------------------------------------------------------

    def _get(self, g: bytes, name: str) -> int | None:
        wide, shift, bits = self._regs[name]
        value = self.layout.value(g, wide)
        return None if value is None else (value >> shift) & ((1 << bits) - 1)

    def _put(self, g: bytes, name: str, value: int, touched: set[str]) -> bytes:
        wide, _shift, bits = self._regs[name]
        touched.add(wide)
        # A 32-bit register write clears the upper half on x86_64; full width writes all of it.
        return self.layout.patch(g, wide, value & ((1 << bits) - 1))

    def _put_eflags(self, g: bytes, value: int, touched: set[str]) -> bytes:
        touched.add("eflags")
        return self.layout.patch(g, "eflags", value)

    def _address(self, g: bytes, mem: Mem, next_pc: int) -> int | None:
        total = mem.disp
        if mem.base == "rip":
            total += next_pc
        elif mem.base is not None:
            base = self._get(g, mem.base)
            if base is None:
                return None
            total += base
        if mem.index is not None:
            index = self._get(g, mem.index)
            if index is None:
                return None
            total += index * mem.scale
        return total & self.mask

    def _kernel(self, g: bytes) -> bool:
        cs = self.layout.value(g, "cs")
        return cs is not None and cs & 3 == 0

    def _may_access(self, g: bytes, address: int, size: int, *, store: bool) -> bool:
        """Kernel mode, and the stack's page (or the one above), or the program's own image: memory
        that is RAM, so the debugger's access does what the CPU's would (a device register read through
        the debugger is not what the CPU reads: QEMU's local APIC answers it with zeros)."""
        if not self._kernel(g):
            return False
        sp = self.layout.value(g, self.arch.sp)
        if sp is not None:
            low = sp - sp % PAGE
            if low <= address and address + size <= low + 2 * PAGE:
                return True
        readable, writable = self._image()
        return any(start <= address and address + size <= end for start, end in (writable if store else readable))

    async def run(self, plan: Plan, g: bytes, pc: int, read: Reader) -> Outcome | None:
        """Simulate `plan` at `pc` on registers `g`; None when it cannot be (then step it).

        Args:
            read: reads guest memory for loads (None back: the CPU would fault; step instead).
        """
        word, mask = self.word, self.mask
        g0 = g
        touched: set[str] = set()
        next_pc = (pc + plan.length) & mask
        new_pc = next_pc
        writes: list[tuple[int, bytes]] = []
        sp_name = self.arch.sp
        kind = plan.kind

        async def load(address: int, size: int) -> int | None:
            if not self._may_access(g, address, size, store=False):
                return None
            data = await read(address, size)
            return None if data is None or len(data) != size else int.from_bytes(data, "little")

        def value_of(operand: Any) -> int | None:
            return operand & mask if isinstance(operand, int) else self._get(g, operand)

        if kind == "nop":
            pass
        elif kind in ("mov", "movzx"):
            src = plan.src
            if isinstance(src, Mem):
                address = self._address(g, src, next_pc)
                value = None if address is None else await load(address, plan.size)
            else:
                value = value_of(src)
            if value is None:
                return None
            g = self._put(g, plan.dst, value, touched)
        elif kind == "lea":
            address = self._address(g, plan.src, next_pc)
            if address is None:
                return None
            g = self._put(g, plan.dst, address, touched)
        elif kind == "store":
            address = self._address(g, plan.dst, next_pc)
            value = value_of(plan.src)
            if address is None or value is None or not self._may_access(g, address, plan.size, store=True):
                return None
            writes.append((address, (value & ((1 << (8 * plan.size)) - 1)).to_bytes(plan.size, "little")))
        elif kind in ("push", "call"):
            sp = self.layout.value(g, sp_name)
            value = value_of(plan.src)
            if sp is None or value is None:
                return None
            sp = (sp - word) & mask
            if not self._may_access(g, sp, word, store=True):
                return None
            if kind == "push":
                writes.append((sp, value.to_bytes(word, "little")))
            else:
                writes.append((sp, next_pc.to_bytes(word, "little")))
                new_pc = (pc + value) & mask if isinstance(plan.src, int) else value
            g = self._put(g, sp_name, sp, touched)
        elif kind in ("pop", "ret", "leave"):
            sp = self.layout.value(g, self.arch.fp if kind == "leave" else sp_name)
            value = None if sp is None else await load(sp, word)
            if value is None:
                return None
            sp = (sp + word) & mask
            if kind == "pop":
                g = self._put(g, sp_name, sp, touched)
                g = self._put(g, plan.dst, value, touched)  # `pop rsp` ends with the loaded value, as the CPU does
            elif kind == "ret":
                g = self._put(g, sp_name, (sp + plan.src) & mask, touched)
                new_pc = value
            else:
                g = self._put(g, sp_name, sp, touched)
                g = self._put(g, self.arch.fp, value, touched)
        elif kind == "jmp":
            target = value_of(plan.src)
            if target is None:
                return None
            new_pc = (pc + target) & mask if isinstance(plan.src, int) else target
        elif kind == "alu":
            a = value_of(plan.dst) if isinstance(plan.dst, str) else None
            if isinstance(plan.dst, Mem):
                address = self._address(g, plan.dst, next_pc)
                a = None if address is None else await load(address, plan.size)
            if isinstance(plan.src, Mem):
                address = self._address(g, plan.src, next_pc)
                b = None if address is None else await load(address, plan.size)
            else:
                b = value_of(plan.src)
            eflags = self.layout.value(g, "eflags")
            if a is None or b is None or eflags is None:
                return None
            result, eflags = _alu(plan.cond, a, b, plan.size, eflags)
            if plan.cond not in ("cmp", "test"):
                g = self._put(g, plan.dst, result, touched)
            g = self._put_eflags(g, eflags, touched)
        elif kind == "jcc":
            eflags = self.layout.value(g, "eflags")
            if eflags is None:
                return None
            flags = {"cf": eflags & 1, "pf": eflags >> 2 & 1, "zf": eflags >> 6 & 1, "sf": eflags >> 7 & 1,
                     "of": eflags >> 11 & 1}
            if _JCC[plan.cond](flags):
                new_pc = (pc + plan.src) & mask
        else:
            return None
        g = self.layout.patch(g, self.arch.pc, new_pc)
        # Memory first: registers and the pc then say the instruction is done.
        packets = [write_memory(a, d) for a, d in writes]
        layout = self.layout
        for name in sorted(touched) + [self.arch.pc]:
            if name == self.arch.pc or layout.value(g, name) != layout.value(g0, name):
                packets.append(write_register(layout.regnum(name), layout.encode_p(name, layout.value(g, name))))
        return Outcome(g, writes, packets)


@lru_cache(maxsize=2)
def _disassembler(mode: int):
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = True
    return md


class NoEmulator:
    """Stands in before attaching, or after a simulation failed: always step."""

    supported = False

    def plan(self, code: bytes) -> None:
        return None
