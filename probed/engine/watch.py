"""Watchpoint probes (kwatch): checking a watch request, and what a watch hit does.

What QEMU reports (seen here, x86 under TCG): a watchpoint stops the guest *after* the access, with the pc
past the accessing instruction, as `T05...;watch:ADDR;` (`rwatch`, `awatch` for reads and any access), ADDR
being the watchpoint's start. On ARM and RISC-V QEMU stops *before* the access. So:
- `new` is read at the stop on x86, and after single-stepping the accessing instruction elsewhere;
  `old` is the value the engine saw last (read when the watch was set, then at every hit).
- The record's `pc` is the accessing instruction: on x86 the instruction that ends at the reported pc,
  found by decoding the containing function forward with capstone (cached), else by decoding backwards.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from probed.engine.state import Event
from probed.errors import BadSpec
from probed.guest.symbols import Location
from rsp.errors import RSPError
from rsp.packets import parse_hex_data, raise_for_error, read_memory, read_registers
from rsp.stop import WATCH_KINDS, StopReply

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["WatchHelper", "ACCESS_NAMES"]

log = logging.getLogger(__name__)

ACCESS_NAMES = {"w": "write", "r": "read", "rw": "access"}
STOPS_AFTER_ACCESS = {"i386", "x86_64"}
MAX_INSN = 15
DECODE_WINDOW = 4096


class WatchHelper:
    """The watch side of the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._prev_insn: dict[int, int | None] = {}

    # -- requests -----------------------------------------------------------------------------------

    def check(self, spec: str, length: int | None, access: str) -> tuple[Location, int, str]:
        """Resolve and check a watch request against the arch's rules.

        Raises:
            UnknownSymbol, BadSpec: the spec, length, alignment or access is not acceptable.
        """
        arch = self.engine.arch
        access = {"write": "w", "read": "r", "access": "rw", "wr": "rw"}.get(access, access)
        if access not in ACCESS_NAMES:
            raise BadSpec(spec, f"access must be w, r or rw, not {access!r}")
        location, size = self.engine.symbols.resolve_data(spec)
        if length is None:
            length = size if size in (1, 2, 4, 8) else arch.word_size
        if length not in (1, 2, 4, 8) or (arch.word_size == 4 and length == 8 and arch.name == "i386"):
            allowed = "1, 2 or 4" if arch.name == "i386" else "1, 2, 4 or 8"
            raise BadSpec(spec, f"a watch length must be {allowed} bytes on {arch.name}, not {length}")
        if location.address % length:
            raise BadSpec(
                spec, f"address {location.address:#x} is not aligned to the watch length {length} (x86 debug registers)"
            )
        return location, length, access

    async def current_value(self, probe: Any) -> int | None:
        """The value at a watch's address now (None when unreadable)."""
        (data,) = await self.engine.target.read_many([(probe.address, probe.length)])
        return None if isinstance(data, Exception) else int.from_bytes(data, "little")

    # -- hits ---------------------------------------------------------------------------------------

    async def on_watch_stop(self, event: StopReply) -> bool:
        """Handle a watchpoint stop through the hit pipeline; returns True when the guest was already
        resumed (never, here: the guest stays stopped for the engine)."""
        engine = self.engine
        target = engine.target
        address = event.watch_address
        points = [
            pt for pt in engine.table.watch_points()
            if pt.active() and pt.address <= address < pt.address + pt.key[2]
        ]
        if not points:
            log.debug("watch stop at %#x that no probe wants", address)
            return False
        engine.guest.move(Event.HIT)
        thread = event.thread
        after = engine.arch.name in STOPS_AFTER_ACCESS
        packets = [read_registers()] + [read_memory(pt.address, pt.key[2]) for pt in points]
        replies = await target.client.pipeline(packets)
        raise_for_error(replies[0], packets[0])
        g = replies[0]
        stop_pc = target.pc_of(g)
        values = {id(pt): _hex_value(r) for pt, r in zip(points, replies[1:], strict=True)}
        insn_pc = await self.accessing_instruction(stop_pc) if after else stop_pc
        pairs = [(p, pt) for pt in points for p in pt.active()]
        probes = [p for p, _ in pairs]
        access = WATCH_KINDS.get(event.reason or "", "access")
        extra = [{"access": access, "addr": f"{address:#x}"} for _ in pairs]
        hit = await engine.pipeline.begin("watch", thread, stop_pc, g, probes, where_pc=insn_pc, extra=extra)
        if any(p.post is not None for p in probes) or not after:
            await target.client.resume(target.step_packet(thread))
            await target.client.wait_stop(timeout=None)
            g2 = await target.read_g()
            if not after:
                new = await target.read_many([(pt.address, pt.key[2]) for pt in points])
                values = {id(pt): _int(n) for pt, n in zip(points, new, strict=True)}
            await engine.pipeline.run_post(hit, g2)
        for (probe, pt), record in zip(pairs, hit.records, strict=True):
            value = values[id(pt)]
            record.extra.update(
                old=probe.last_value if access != "read" else None,
                new=value if access != "read" else None,
                value=value,
            )
            probe.last_value = value
        engine.pipeline.finish(hit)
        engine.guest.move(Event.HIT_DONE)
        return False

    async def accessing_instruction(self, pc: int) -> int | None:
        """The address of the instruction that ends at `pc` (x86: QEMU stops after the access)."""
        if pc in self._prev_insn:
            return self._prev_insn[pc]
        found = await self._decode_forward(pc)
        if found is None:
            found = await self._decode_backward(pc)
        self._prev_insn[pc] = found
        return found

    def _disassembler(self):
        import capstone

        mode = capstone.CS_MODE_64 if self.engine.arch.name == "x86_64" else capstone.CS_MODE_32
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        md.detail = False
        return md

    async def _decode_forward(self, pc: int) -> int | None:
        where = self.engine.symbols.symbolize(pc)
        if not where:
            return None
        name, _, off = where.partition("+")
        start = pc - (int(off, 16) if off else 0)
        if not 0 < pc - start <= DECODE_WINDOW:
            return None
        (code,) = await self.engine.target.read_many([(start, pc - start)])
        if isinstance(code, Exception):
            return None
        for insn in self._disassembler().disasm(code, start):
            if insn.address + insn.size == pc:
                return insn.address
            if insn.address + insn.size > pc:
                break
        return None

    async def _decode_backward(self, pc: int) -> int | None:
        (code,) = await self.engine.target.read_many([(pc - MAX_INSN, MAX_INSN)])
        if isinstance(code, Exception):
            return None
        md = self._disassembler()
        candidates = []
        for k in range(1, MAX_INSN + 1):
            insns = list(md.disasm(code[MAX_INSN - k :], pc - k, count=1))
            if insns and insns[0].size == k:
                candidates.append((("[" in insns[0].op_str or "ptr" in insns[0].op_str), k, pc - k))
        if not candidates:
            return None
        return max(candidates)[2]


def _hex_value(reply: bytes) -> int | None:
    """The value in an `m` reply (None for an error reply)."""
    try:
        return int.from_bytes(parse_hex_data(reply), "little")
    except RSPError:
        return None


def _int(data: bytes | Exception) -> int | None:
    return None if isinstance(data, Exception) else int.from_bytes(data, "little")
