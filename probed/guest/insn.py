"""Instruction boundaries: a probe at `sym+off` must land on the first byte of an instruction, as kprobes insists.

A breakpoint inside an instruction never fires (the CPU never fetches an instruction there) or, worse, hits
when a jump lands mid-instruction. Debian's kernel functions start with a 5-byte `nopl` (the ftrace site), so
`vfs_read+4` is inside it. The function is decoded from its start with capstone up to the offset; an offset
that falls inside an instruction is refused, naming the instruction and the nearest boundaries on each side.
Fixed-width ISAs need no decoding: aarch64 instructions are 4-byte aligned, RISC-V's (with the compressed
extension) 2-byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from probed.errors import BadSpec

__all__ = ["NotAnInstructionBoundary", "check_boundary", "decode_span", "verify_boundary"]

MAX_INSN = 15  # the longest x86 instruction
MAX_DECODE = 1 << 20  # read no more than this much of a function to check an offset

ReadMany = Callable[[Sequence[tuple[int, int]]], Awaitable[list["bytes | Exception"]]]


class NotAnInstructionBoundary(BadSpec):
    """`sym+off` is inside an instruction; `before`/`after` are the nearest boundaries (offsets from sym)."""

    def __init__(self, spec: str, reason: str, before: int | None, after: int | None):
        self.before, self.after = before, after
        super().__init__(spec, reason)

    def data(self) -> dict[str, Any]:
        return {**super().data(), "before": self.before, "after": self.after}


def _x86_mode(arch_name: str) -> int:
    import capstone

    return capstone.CS_MODE_64 if arch_name == "x86_64" else capstone.CS_MODE_32


def decode_span(code: bytes, start: int, arch_name: str, upto: int) -> list[tuple[int, int, str]]:
    """(offset from start, size, text) of each instruction decoded from `start` until one reaches `upto`.

    Decoding stops early at bytes capstone cannot decode (data in the text, a bad guess of the start).
    """
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, _x86_mode(arch_name))
    md.detail = False
    out = []
    for address, size, mnemonic, op_str in md.disasm_lite(code, start):
        out.append((address - start, size, f"{mnemonic} {op_str}".strip()))
        if address - start + size > upto:
            break
    return out


def check_boundary(spec: str, symbol: str, offset: int, code: bytes, arch_name: str) -> None:
    """Refuse `symbol+offset` when it is not the start of an instruction of the code at `symbol`.

    Args:
        code: the function's bytes from its start, at least `offset + 1` of them.

    Raises:
        NotAnInstructionBoundary: naming the instruction the offset falls in and the boundaries around it.
    """
    if offset <= 0:
        return
    if arch_name in ("aarch64", "riscv64"):
        align = 4 if arch_name == "aarch64" else 2
        if offset % align:
            before, after = offset - offset % align, offset - offset % align + align
            raise NotAnInstructionBoundary(
                spec, f"offset {offset:#x} is not an instruction boundary ({arch_name} instructions are "
                f"{align}-byte aligned): nearest are {symbol}+{before:#x} and {symbol}+{after:#x}", before, after)
        return
    decoded = decode_span(code, 0, arch_name, offset)
    for at, size, text in decoded:
        if at == offset:
            return
        if at < offset < at + size:
            raise NotAnInstructionBoundary(
                spec, f"offset {offset:#x} is inside the instruction at {symbol}+{at:#x} ({text}, {size} bytes): "
                f"the nearest instruction boundaries are {symbol}+{at:#x} and {symbol}+{at + size:#x}",
                at, at + size)
    # Decoding stopped before the offset (undecodable bytes): nothing proves it wrong, so it stands.


async def verify_boundary(read_many: ReadMany, arch_name: str, spec: str, symbol: str | None, offset: int,
                          address: int) -> None:
    """Read the function at `address - offset` and `check_boundary` (a probe at offset 0 or by bare address
    is not checked: it has no function start to decode from).

    Raises:
        NotAnInstructionBoundary.
    """
    if not symbol or offset <= 0 or offset > MAX_DECODE or arch_name in ("aarch64", "riscv64"):
        if symbol and offset > 0:
            check_boundary(spec, symbol, offset, b"", arch_name)
        return
    (code,) = await read_many([(address - offset, offset + MAX_INSN)])
    if isinstance(code, Exception):
        return  # the readability check of the probe address reports what is wrong with the memory
    check_boundary(spec, symbol, offset, code, arch_name)
