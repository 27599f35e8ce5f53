"""The engine's side of an attached debugger (GDB, through the stub).

QEMU takes one debugger and the engine holds that connection, so GDB's wishes become state here: GDB's
breakpoints and watchpoints (merged with the probes' when the engine installs breakpoints), whether GDB
holds the guest stopped or waits for a stop, and the probe hits parked at a place where GDB stopped too.
The engine hands GDB only the stops GDB caused; everything else it handles and hides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rsp.stop import StopEvent, StopReply, ThreadId

from .slots import Slot

__all__ = ["DebuggerLink", "gdb_key"]

BREAK_KINDS = {0: "break", 1: "hbreak"}
WATCH_ACCESS = {2: "w", 3: "r", 4: "rw"}


def gdb_key(ztype: int, address: int, kind: int) -> tuple[str, int, int, str]:
    """The hook-point key for a GDB `Z` packet (the same key a probe at that place uses)."""
    if ztype in BREAK_KINDS:
        return (BREAK_KINDS[ztype], address, 0, "x")
    return ("watch", address, kind, WATCH_ACCESS[ztype])


class DebuggerLink:
    """One attached debugger, as the engine sees it.

    Args:
        send_stop: called with each stop event GDB must see; must not block.

    Attributes:
        holding: GDB holds the guest stopped (it has seen a stop and not resumed yet).
        running: GDB resumed the guest and waits for a stop reply.
        interrupt_requested: GDB sent Ctrl-C and has not seen the stop yet.
        current_thread: the thread of the last stop GDB saw.
    """

    def __init__(self, send_stop: Callable[[StopEvent], None]):
        self._send_stop = send_stop
        self.holding = True
        self.running = False
        self.interrupt_requested = False
        self.current_thread: ThreadId | None = None
        self.g_thread: ThreadId | None = None  # GDB's `Hg` choice
        self.points: dict[tuple[str, int, int, str], int] = {}
        self.slots: dict[tuple[str, int, int, str], Slot] = {}
        self.parked: dict[int, Any] = {}
        self._registers: dict[int, bytes] = {}
        # Memory GDB read at its last stop is read again with the registers at the next one (it asks for
        # the same things every time: the stack, the code at pc...), and served from here while valid.
        self.memory: dict[bytes, bytes] = {}
        self.prefetch: list[bytes] = []
        self._reads: list[bytes] = []
        self.code: dict[int, bytes] = {}  # instruction bytes at the stop's pc, when prefetched
        self.last_pc: int | None = None

    # -- what GDB wants ------------------------------------------------------------------------------

    def keys(self) -> set[tuple[str, int, int, str]]:
        return set(self.points)

    def has_breakpoints(self) -> bool:
        return any(k[0] != "watch" for k in self.points)

    def wants_break(self, pc: int) -> bool:
        return ("break", pc, 0, "x") in self.points or ("hbreak", pc, 0, "x") in self.points

    def wants_watch(self, event: StopReply) -> bool:
        if event.watch_address is None:
            return False
        a = event.watch_address
        return any(k[0] == "watch" and k[1] <= a < k[1] + k[2] for k in self.points)

    # -- stops ---------------------------------------------------------------------------------------

    async def deliver(self, event: StopEvent) -> None:
        """Give a stop to GDB; the guest stays stopped until GDB resumes it."""
        self.g_thread = None  # QEMU points `g` at the CPU that stopped
        self.running = False
        self.holding = True
        self.interrupt_requested = False
        if isinstance(event, StopReply) and event.thread is not None:
            self.current_thread = event.thread
        self._send_stop(event)

    def park(self, hit: Any) -> None:
        """Keep a hit whose step must wait until GDB resumes that CPU."""
        self.parked[hit.thread.tid if hit.thread else 1] = hit

    # -- register cache: GDB reads `g` right after every stop; the engine has usually just read it ----

    def remember_registers(self, thread: ThreadId | None, g: bytes) -> None:
        self._registers[thread.tid if thread else 1] = g

    def cached_registers(self, thread: ThreadId | None) -> bytes | None:
        return self._registers.get(thread.tid if thread else 1)

    def registers_for_gdb(self) -> bytes | None:
        """The cached block GDB's `g` would get now, if its `Hg` names the thread that stopped."""
        g = self.g_thread
        if g is not None and g.tid > 0 and self.current_thread is not None and g.tid != self.current_thread.tid:
            return None
        return self.cached_registers(self.current_thread)

    def forget_registers(self) -> None:
        self._registers.clear()
        self.memory.clear()

    def patch_memory(self, writes: list[tuple[int, bytes]]) -> None:
        """Keep cached reads true after the engine wrote memory itself."""
        for payload in list(self.memory):
            addr_text, _, len_text = payload[1:].partition(b",")
            start, length = int(addr_text, 16), int(len_text, 16)
            reply = self.memory[payload]
            if reply[:1] == b"E" or len(reply) != 2 * length:
                continue
            data = bytearray(bytes.fromhex(reply.decode("ascii")))
            for address, value in writes:
                for i, b in enumerate(value):
                    if start <= address + i < start + length:
                        data[address + i - start] = b
            self.memory[payload] = data.hex().encode()

    def note_read(self, payload: bytes) -> None:
        """GDB read memory with `payload` at this stop."""
        if payload not in self._reads:
            self._reads.append(payload)

    def rotate_reads(self) -> None:
        """GDB resumes: what it read at this stop is what to prefetch at the next."""
        if self._reads:
            self.prefetch = self._reads[-8:]
        self._reads = []
