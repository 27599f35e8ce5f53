"""The engine's side of an attached debugger (GDB, through the stub).

QEMU takes one debugger and the engine holds that connection, so GDB's wishes become state here: GDB's
breakpoints and watchpoints (merged with the probes' when the engine installs breakpoints), whether GDB
holds the guest stopped or waits for a stop, and the probe hits parked at a place where GDB stopped too.
The engine hands GDB only the stops GDB caused; everything else it handles and hides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from probed.engine.breakpoints import key_for_z
from probed.engine.slots import Slot
from rsp.stop import StopEvent, StopReply, ThreadId

__all__ = ["DebuggerLink", "MemorySnapshot", "gdb_key"]

gdb_key = key_for_z
"""The hook-point key for a GDB `Z` packet (the same key a probe at that place uses)."""


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
        self.memory = MemorySnapshot()
        self.prefetch: list[tuple[int, int]] = []
        self._reads: list[tuple[int, int]] = []
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
        self.memory.patch(writes)

    def note_read(self, address: int, length: int) -> None:
        """GDB read `length` bytes at `address` at this stop."""
        if (address, length) not in self._reads:
            self._reads.append((address, length))

    def rotate_reads(self) -> None:
        """GDB resumes: what it read at this stop is what to prefetch at the next."""
        if self._reads:
            self.prefetch = self._reads[-8:]
        self._reads = []


class MemorySnapshot:
    """Guest memory read while the guest stays stopped, to answer reads again without the target.

    Valid until the guest runs: the engine clears it whenever the guest executes for real (a simulated
    instruction patches it instead). Holds whole ranges that were read, and the error replies of reads
    that failed (QEMU's `E14` for unmapped memory), as GDB should get them again.
    """

    def __init__(self) -> None:
        self._ranges: list[tuple[int, bytearray]] = []
        self._errors: dict[tuple[int, int], bytes] = {}

    def clear(self) -> None:
        self._ranges.clear()
        self._errors.clear()

    def __bool__(self) -> bool:
        return bool(self._ranges or self._errors)

    def put(self, address: int, length: int, reply: bytes) -> None:
        """Remember the reply to `m address,length`."""
        if len(reply) == 2 * length and reply[:1] != b"E":
            try:
                self._ranges.append((address, bytearray(bytes.fromhex(reply.decode("ascii")))))
            except ValueError:
                pass
        elif reply[:1] == b"E":
            self._errors[(address, length)] = reply

    def get(self, address: int, length: int) -> bytes | None:
        """The reply `m address,length` would get now, if this snapshot holds it."""
        end = address + length
        for start, data in reversed(self._ranges):
            if start <= address and end <= start + len(data):
                return data[address - start : end - start].hex().encode()
        return self._errors.get((address, length))

    def code_at(self, address: int, most: int) -> bytes | None:
        """Up to `most` bytes from `address`, as many as one held range has (None if none starts there)."""
        for start, data in reversed(self._ranges):
            if start <= address < start + len(data):
                return bytes(data[address - start : address - start + most])
        return None

    def patch(self, writes: list[tuple[int, bytes]]) -> None:
        """Apply writes the engine made to the guest itself."""
        for address, value in writes:
            for start, data in self._ranges:
                lo, hi = max(start, address), min(start + len(data), address + len(value))
                if lo < hi:
                    data[lo - start : hi - start] = value[lo - address : hi - address]
