"""Linux's kernel page-table isolation (KPTI, x86_64): reading the kernel at a stop on a user PGD.

With KPTI each process has two top-level page tables in one 8 KiB-aligned pair: the kernel PGD (what
`mm->pgd` points to, the one the kernel runs on) and, 4 KiB above it, the user PGD that user mode runs on.
The user PGD maps the process's user half as the kernel PGD does, but of the kernel only what entering and
leaving it needs (the entry code, the CPU entry area, maybe the kernel text): per-CPU data (`current_task`),
the direct map and the task structs are not there. At a stop on the user PGD (a user-mode stop, or the entry
code before it switches CR3) QEMU's `m`, which walks the current CR3, answers E14 for them.

CR3 there holds the user PGD (bit 12 set, PTI_USER_PGTABLE_BIT), the PCID in bits 0-11 when the CPU has
PCIDs, and bit 63 may be written as NOFLUSH. So the kernel's root is CR3 with bits 0-12 and 52-63 cleared,
read with our own page walk over guest-physical memory: QEMU's RAM directly, or through the stub's
`Qqemu.PhyMemMode:1` (global state in QEMU: every such read is one write `[PhyMemMode:1, m..., PhyMemMode:0]`,
so nothing else ever sees the physical mode).

Whether CR3 is a user PGD of such a pair is read from the pair itself, once per boot: the kernel keeps the
two user halves equal (`__pti_set_user_pgtbl` writes each user-half PGD entry to both, the kernel's copy
with NX added), which two unrelated top-level tables never are. Without KPTI, a CR3 with bit 12 set is just a
page-table root, and nothing here changes a read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from probed.guest.memory.pagewalk import ADDRESS_MASK, PAGE, EntryMissing, PageWalker, Paging
from rsp.connection import MAX_MEMORY_READ
from rsp.errors import RemoteError, RSPError
from rsp.packets import parse_error, parse_hex_data, qemu_phys_mem_mode, read_memory

__all__ = ["USER_PGD_BIT", "KERNEL_HALF", "kernel_half", "mirrors", "pair_roots", "PhysicalThroughStub",
           "not_mapped"]

USER_PGD_BIT = 1 << 12  # PTI_USER_PGTABLE_BIT: the user PGD is the kernel PGD + 4 KiB
KERNEL_HALF = 1 << 63  # canonical kernel addresses (4- and 5-level paging) have bit 63 set
HALF_BYTES = 256 * 8  # a PGD's user half: entries 0..255
_SAME = ADDRESS_MASK | 0b111  # what both copies of a user-half entry share: the table, present, RW, user
_PRESENT = 1
MAX_ROUNDS = 64  # a walk feeds at most 5 levels per page; this bounds a confused walk


def kernel_half(address: int) -> bool:
    """Whether `address` is in the kernel's half of the address space (x86_64)."""
    return bool(address & KERNEL_HALF)


def pair_roots(cr3: int) -> tuple[int, int]:
    """(kernel PGD, user PGD) physical addresses, if `cr3` is one of a KPTI pair."""
    kernel = cr3 & ADDRESS_MASK & ~USER_PGD_BIT
    return kernel, kernel | USER_PGD_BIT


def mirrors(kernel_user_half: bytes, user_user_half: bytes) -> bool:
    """Whether two PGDs' user halves are a KPTI pair's: every entry present in both points to the same table
    with the same rights (the kernel's copy may add NX; accessed bits differ by which side walked it), and
    at least one is."""
    if len(kernel_user_half) < HALF_BYTES or len(user_user_half) < HALF_BYTES:
        return False
    same = 0
    for k, u in zip(struct.unpack("<256Q", kernel_user_half[:HALF_BYTES]),
                    struct.unpack("<256Q", user_user_half[:HALF_BYTES]), strict=True):
        if k & _PRESENT and u & _PRESENT:
            if k & _SAME != u & _SAME:
                return False
            same += 1
    return same > 0


def not_mapped(address: int, length: int) -> RemoteError:
    """The error `m` gives for memory that is not mapped (QEMU's E14), for a read we walked ourselves."""
    error = parse_error(b"E14")
    return RemoteError(error.code, error.text, read_memory(address, length))


class PhysicalThroughStub:
    """Guest-physical reads through QEMU's gdbstub, each call bracketed by `Qqemu.PhyMemMode:1` / `:0` in
    one write; and virtual reads through a page-table root of our choosing, walked with those reads.

    Args:
        client: the RSP client (`pipeline`).
    """

    def __init__(self, client: Any):
        self.client = client
        self.unsupported: str | None = None  # why physical reads are not available, once seen
        self.round_trips = 0

    async def read(self, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """The bytes at each guest-physical `(address, length)`, or None where QEMU refused."""
        if self.unsupported is not None:
            return [None] * len(spans)
        packets = [qemu_phys_mem_mode(True)]
        pieces: list[tuple[int, int]] = []
        for address, length in spans:
            first = len(packets)
            for a in range(address, address + length, MAX_MEMORY_READ):
                packets.append(read_memory(a, min(MAX_MEMORY_READ, address + length - a)))
            pieces.append((first, len(packets)))
        packets.append(qemu_phys_mem_mode(False))
        self.round_trips += 1
        replies = await self.client.pipeline(packets)
        if replies[0] != b"OK":
            self.unsupported = f"the stub answered {replies[0][:20]!r} to {packets[0]!r}"
            return [None] * len(spans)
        out: list[bytes | None] = []
        for first, end in pieces:
            try:
                out.append(b"".join(parse_hex_data(replies[i], packets[i]) for i in range(first, end)))
            except RSPError:
                out.append(None)
        return out

    async def read_virtual(
        self, walker: PageWalker, paging: Paging, requests: Sequence[tuple[int, int]]
    ) -> list[bytes | Exception]:
        """Each `(address, length)` read through `paging` (its root need not be the CPU's CR3), walking the
        page tables with `walker` (one without a physical reader: fed entry by entry, kept for the stop)."""
        chunks: dict[int, list[tuple[int, int]] | None] = {}
        for _ in range(MAX_ROUNDS):
            missing: dict[int, int] = {}
            for i, (address, length) in enumerate(requests):
                if i in chunks:
                    continue
                try:
                    chunks[i] = _translate(walker, paging, address, length)
                except EntryMissing as need:
                    missing[need.address] = need.width
            if not missing:
                break
            wanted = sorted(missing.items())
            for (address, _), data in zip(wanted, await self.read(wanted), strict=True):
                walker.give(address, data)
        spans = [span for i in sorted(chunks) if chunks[i] for span in chunks[i]]
        data = dict(zip(spans, await self.read(spans), strict=True)) if spans else {}
        out: list[bytes | Exception] = []
        for i, (address, length) in enumerate(requests):
            parts = [data.get(span) for span in chunks.get(i) or []]
            if chunks.get(i) is None or any(p is None for p in parts):
                out.append(not_mapped(address, length))
            else:
                out.append(b"".join(parts))  # type: ignore[arg-type]
        return out


def _translate(walker: PageWalker, paging: Paging, address: int, length: int) -> list[tuple[int, int]] | None:
    """The guest-physical spans of a virtual read (joined where contiguous), or None if a page is missing."""
    spans: list[tuple[int, int]] = []
    at, left = address, length
    while left > 0:
        hit = walker.translate(paging, at)
        if hit is None:
            return None
        phys, room = hit
        n = min(room, left, PAGE)
        if spans and spans[-1][0] + spans[-1][1] == phys:
            spans[-1] = (spans[-1][0], spans[-1][1] + n)
        else:
            spans.append((phys, n))
        at, left = at + n, left - n
    return spans
