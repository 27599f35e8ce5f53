"""Getting past a breakpoint without a single-step, for the few instructions that start most functions.

Why: under TCG, QEMU flushes every translated block when single-stepping is switched on and again when
it is switched off (`cpu_single_step`), so a hit that steps makes the guest retranslate its hot code.
kprobes itself simulates simple instructions instead of stepping them; probed does the same for probes
with no post-handler ("the fastest correct way"): it writes the instruction's effect (registers with `P`,
memory with `M`) and continues, in one write with the `c`.

Handled: the `nop` family (including `endbr32/64` and the 5-byte `nopl` of ftrace), `push REG`, and
`mov REG, REG` between full-width registers. Anything else is single-stepped as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["Emulator", "NoEmulator", "Plan"]

MAX_INSN = 16


@dataclass(frozen=True)
class Plan:
    """How to simulate one instruction: its kind, length and registers."""

    kind: str  # "nop", "push", "mov"
    length: int
    src: str | None = None
    dst: str | None = None


class Emulator:
    """Plans and packets for simulated instructions, for one target (arch + register layout)."""

    def __init__(self, arch: Any, layout: Any):
        self.arch = arch
        self.layout = layout
        self._names = set(layout.registers)
        self._full = {"i386": 4, "x86_64": 8}.get(arch.name)
        self._plan = lru_cache(maxsize=4096)(self._decode)

    @property
    def supported(self) -> bool:
        return self._full is not None

    def plan(self, code: bytes) -> Plan | None:
        """The simulation plan for the instruction at the start of `code`, or None (step it)."""
        if not self.supported or not code:
            return None
        return self._plan(bytes(code[:MAX_INSN]))

    def _decode(self, code: bytes) -> Plan | None:
        import capstone

        mode = capstone.CS_MODE_64 if self.arch.name == "x86_64" else capstone.CS_MODE_32
        md = _disassembler(mode)
        insns = list(md.disasm(code, 0, count=1))
        if not insns:
            return None
        insn = insns[0]
        mnem = insn.mnemonic
        if mnem in ("nop", "endbr64", "endbr32"):
            return Plan("nop", insn.size)
        ops = insn.operands
        if mnem == "push" and len(ops) == 1 and ops[0].type == capstone.x86.X86_OP_REG:
            reg = insn.reg_name(ops[0].reg)
            if reg in self._names and ops[0].size == self._full:
                return Plan("push", insn.size, src=reg)
        if (
            mnem == "mov"
            and len(ops) == 2
            and all(op.type == capstone.x86.X86_OP_REG and op.size == self._full for op in ops)
        ):
            dst, src = insn.reg_name(ops[0].reg), insn.reg_name(ops[1].reg)
            if dst in self._names and src in self._names:
                return Plan("mov", insn.size, src=src, dst=dst)
        return None

    def effects(self, plan: Plan, g_payload: bytes, pc: int) -> tuple[bytes, list[tuple[int, bytes]]] | None:
        """The register block after the instruction, and its memory writes (address, bytes)."""
        layout, arch = self.layout, self.arch
        word = arch.word_size
        writes: list[tuple[int, bytes]] = []
        g = g_payload
        if plan.kind == "push":
            sp = layout.value(g, arch.sp)
            value = layout.value(g, plan.src)
            if sp is None or value is None:
                return None
            sp = (sp - word) & ((1 << (8 * word)) - 1)
            writes.append((sp, value.to_bytes(word, "little")))
            g = layout.patch(g, arch.sp, sp)
        elif plan.kind == "mov":
            value = layout.value(g, plan.src)
            if value is None:
                return None
            g = layout.patch(g, plan.dst, value)
        return layout.patch(g, arch.pc, pc + plan.length), writes

    def packets(self, plan: Plan, g_payload: bytes, pc: int) -> list[bytes] | None:
        """The `M`/`P` packets that make the instruction at `pc` done, or None if a value is missing."""
        effects = self.effects(plan, g_payload, pc)
        if effects is None:
            return None
        new_g, writes = effects
        out = [b"M%x,%x:%s" % (address, len(data), data.hex().encode()) for address, data in writes]
        changed = {self.arch.sp, self.arch.pc} if plan.kind == "push" else {plan.dst or "", self.arch.pc}
        for name in sorted(changed - {""}, key=lambda n: n == self.arch.pc):  # the pc last
            out.append(self._set(name, self.layout.value(new_g, name)))
        return out

    def _set(self, name: str, value: int) -> bytes:
        return b"P%x=%s" % (self.layout.regnum(name), self.layout.encode_p(name, value))


@lru_cache(maxsize=2)
def _disassembler(mode: int):
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    md.detail = True
    return md


class NoEmulator:
    """Stands in before attaching, or after a simulation failed: always step."""

    def plan(self, code: bytes) -> None:
        return None

    def packets(self, *args: Any) -> None:
        return None
