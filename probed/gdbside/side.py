"""GDB's side of the engine, as a component: attach, forward, breakpoints, resume, step, interrupt.

One job: making GDB see only the stops it caused. It works through the engine's components
(`service` for requests, `breakpoints`, `break_hits` and `pipeline` for probe hits at GDB's places,
`guest` for who holds the guest) and GDB's state in `probed.gdbside.debugger.DebuggerLink`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from probed.engine.breakhits import SPURIOUS_RETRIES, is_plain_trap
from probed.engine.state import Event, Guest
from probed.errors import TargetError, Unsupported
from probed.gdbside.debugger import DebuggerLink, gdb_key
from probed.sim.emulate import MAX_INSN
from rsp.packets import raise_for_error, read_memory, read_registers, set_thread
from rsp.stop import StopEvent, StopReply, ThreadId

if TYPE_CHECKING:
    from probed.engine.engine import Engine
    from probed.engine.hits import Hit

__all__ = ["GdbSide"]

PAGE = 4096  # reads of code stay in one page: the next may not be mapped
CODE_WINDOW = 64  # code read after a pc, for simulated steps and GDB's own reads of it
CODE_BEHIND = 16

log = logging.getLogger("probed.engine.engine")


class GdbSide:
    """GDB's requests, as the engine serves them (see `probed.gdbside.debugger` for GDB's state)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def deliver(self, event: StopEvent) -> None:
        """Give a stop to GDB: from now on GDB holds the guest."""
        engine = self.engine
        engine.guest.move(Event.TO_GDB)
        if engine.debugger.parked and engine.guest.state is Guest.GDB:
            engine.guest.move(Event.PARK)  # hits parked at an earlier stop still wait for GDB's resume
        await engine.debugger.deliver(event)

    def park(self, hit: Hit) -> None:
        """Keep a probe hit at GDB's stop until GDB resumes that CPU."""
        self.engine.guest.move(Event.PARK)
        self.engine.debugger.park(hit)

    async def _complete_parked(self, hit: Hit) -> StopEvent:
        self.engine.guest.move(Event.HIT)
        event = await self.engine.break_hits.complete(hit, may_resume=False)
        self.engine.guest.move(Event.HIT_DONE)
        return event

    async def attach(self, link: DebuggerLink) -> StopReply:
        """Attach a debugger: the guest stops and stays stopped for it. Returns the stop to report.

        Raises:
            Unsupported: a debugger is attached already.
        """

        engine = self.engine

        async def apply() -> StopReply:
            if engine.debugger is not None:
                raise Unsupported("a debugger is attached already; probed serves one GDB at a time")
            engine.debugger = link
            link.holding, link.running = True, False
            threads = engine.target.threads
            link.current_thread = engine.current_thread or (threads[0] if threads else None)
            engine.guest.move(Event.TO_GDB)
            return StopReply(5, link.current_thread)

        return await engine.call_stopped(apply)

    async def detach(self, link: DebuggerLink) -> None:
        """Forget the debugger: its breakpoints and slots go, parked hits complete, the guest runs on."""

        engine = self.engine

        async def apply() -> None:
            if engine.debugger is not link:
                return
            for hit in list(link.parked.values()):
                await self._complete_parked(hit)
            link.parked.clear()
            for slot in link.slots.values():
                engine.slots.free(slot)
            link.slots.clear()
            link.points.clear()
            engine.debugger = None
            engine.guest.move(Event.GDB_RESUMED)
            await engine.breakpoints.reconcile()

        def forget() -> None:
            # No target to talk to: forget GDB now; reconnecting re-arms only what is still wanted.
            if engine.debugger is link:
                for slot in link.slots.values():
                    engine.slots.free(slot)
                link.slots.clear()
                link.points.clear()
                link.parked.clear()
                engine.debugger = None

        if engine.guest.state is Guest.WAITING:
            forget()
            return
        try:
            await engine.call_stopped(apply)
        except TargetError:
            if engine.guest.state is not Guest.WAITING:
                raise
            forget()

    async def request(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Forward packets to the target while the debugger holds it (in one write); the replies."""

        async def apply() -> list[bytes]:
            link = self.engine.debugger
            if link is not None and payloads == [b"g"]:
                cached = link.registers_for_gdb()
                if cached is not None:
                    return [cached]
            if any(p[:1] in (b"G", b"P", b"M", b"X", b"H") for p in payloads) and link is not None:
                link.forget_registers()  # (and the memory snapshot)
            return await self.engine.client.pipeline(list(payloads))

        return await self.engine.call_stopped(apply)

    async def read_memory(self, address: int, length: int) -> bytes:
        """GDB's `m`: from what was read at this stop when it is there, else from the target."""

        async def apply() -> bytes:
            link = self.engine.debugger
            if link is None:
                return await self.engine.client.request(read_memory(address, length))
            return await self._read_at_stop(link, address, length)

        return await self.engine.call_stopped(apply)

    async def _read_at_stop(self, link: DebuggerLink, address: int, length: int) -> bytes:
        """The `m` reply for a read while the guest is stopped: from the snapshot, from guest RAM directly,
        or from the target (and then remembered while GDB holds the guest, which stays as it is until GDB
        resumes it)."""
        reply = link.memory.get(address, length)
        if reply is None:
            data = await self._read_direct(link, address, length)
            if data is not None:
                reply = data.hex().encode()
            else:
                reply = await self.engine.client.request(read_memory(address, length))
            if link.holding:
                link.memory.put(address, length, reply)
        return reply

    def _reads_directly(self) -> bool:
        memory = self.engine.target.memory
        return memory is not None and memory.direct

    async def _read_direct(self, link: DebuggerLink, address: int, length: int) -> bytes | None:
        """GDB's read from guest RAM (no exchange with QEMU), when RAM can be read and the page tables of
        the CPU GDB reads through (its `Hg`, else the one that stopped) are at hand; else None."""
        if not self._reads_directly() or self.engine.client.holds_memory_writes:
            return None  # (simulated stores not sent yet: RAM does not have them)
        thread = link.g_thread if link.g_thread is not None and link.g_thread.tid > 0 else link.current_thread
        g = link.cached_registers(thread)
        if g is None:
            return None
        return await self.engine.target.memory.read_direct(address, length, g)

    def insert(self, ztype: int, address: int, kind: int) -> None:
        """GDB's `Z`. Hardware kinds take a slot owned by "gdb" at once.

        GDB removes its breakpoints at every stop and inserts them again before resuming, so the target
        sees GDB's set only when the guest next runs (`resume`): a remove and insert of the same
        breakpoint cost nothing, and QEMU does not flush its translated code for them.

        Raises:
            SlotsExhausted: no debug-register slot free.
        """
        link = self.engine.debugger
        key = gdb_key(ztype, address, kind)
        if key in link.points:
            link.points[key] += 1
            return
        if ztype != 0 and key not in self.engine.breakpoints.slot_of and key not in link.slots:
            link.slots[key] = self.engine.slots.allocate("gdb", f"Z{ztype}", f"{key[0]} {address:#x}")
        link.points[key] = 1

    def remove(self, ztype: int, address: int, kind: int) -> None:
        """GDB's `z` (removing what is not there is not an error, as with QEMU)."""
        link = self.engine.debugger
        key = gdb_key(ztype, address, kind)
        if link.points.pop(key, None) is not None:
            self.engine.slots.free(link.slots.pop(key, None))

    async def resume(self, action: str, thread: ThreadId | None = None) -> None:
        """GDB resumes the guest: `c` (continue) or `s` (step one instruction of `thread`).

        A probe hit parked where GDB stopped completes first (its instruction is stepped, post-handlers
        run); a step from a probe's address fires that probe once. GDB gets the stop it asked for.
        """

        engine = self.engine

        async def apply() -> None:
            link = engine.debugger
            if link is None:
                return
            link.rotate_reads()
            if action == "s":
                # (A simulated step keeps GDB's cached reads, patched; a real one drops them.)
                event = await self._step(link, thread or link.current_thread)
                if event is not None:  # (else delivered already)
                    await self.deliver(event)
                return
            link.memory.clear()
            for hit in list(link.parked.values()):
                event = await self._complete_parked(hit)
                del link.parked[hit.tid]
                if isinstance(event, StopReply) and event.is_watch:
                    await engine.watch.on_watch_stop(event)
                    if link.wants_watch(event):
                        await self.deliver(event)
                        return
            link.holding, link.running = False, True
            engine.guest.move(Event.GDB_RESUMED)
            engine.service.gdb_changes = True  # installed with the `c`, in one write
            engine.service.hold = False  # GDB's continue also lets a guest held by --stopped run

        await engine.call_stopped(apply)

    async def _step(self, link: DebuggerLink, thread: ThreadId | None) -> StopEvent | None:
        """GDB's step; the stop to give GDB, or None when it was given already."""
        engine = self.engine
        tid = thread.tid if thread else 1
        engine.service.check_deferred()
        hit = link.parked.pop(tid, None)
        before: bytes | None = None
        if hit is not None:
            event = await self._complete_parked(hit)
        else:
            g = link.cached_registers(thread)
            if g is None:
                if thread is not None and len(engine.target.threads) > 1:
                    await engine.client.request(set_thread("g", thread))
                g = await engine.target.read_g()
            pc = engine.target.pc_of(g)
            probes = engine.table.active_at(pc)
            if probes or engine.returns.armed(pc):
                await engine.breakpoints.reconcile()
                engine.stops += 1
                engine.guest.move(Event.HIT)
                hit = await engine.break_hits.begin(thread, pc, g, probes, engine.returns.armed(pc))
                event = await engine.break_hits.complete(hit, may_resume=False)
                engine.guest.move(Event.HIT_DONE)
            elif (simulated := await self._simulate_step(link, g, pc)) is not None:
                # Done without running the guest: no stop, no flush of QEMU's translated code.
                engine.stops += 1
                link.remember_registers(thread or link.current_thread, simulated)
                return StopReply(5, thread or link.current_thread)
            else:
                event = await self._single_step(thread)
                before = g
        for attempt in range(SPURIOUS_RETRIES + 1):
            link.forget_registers()
            engine.stops += 1
            if isinstance(event, StopReply) and event.is_watch:
                await engine.watch.on_watch_stop(event)
            if isinstance(event, StopReply) and event.thread is None:
                event = StopReply(event.signal, thread, event.core, event.reason, event.watch_address, event.registers)
            if not isinstance(event, StopReply):
                return event
            # GDB reads the registers after every stop; read them now, for GDB and for its next step.
            # (A step's stop is GDB's: it goes to GDB as soon as the registers are in.)
            spurious = before is not None and is_plain_trap(event) and attempt < SPURIOUS_RETRIES
            after, delivered = await self.read_for_debugger(link, event.thread, event, unless=before if spurious else None)
            if delivered:
                return None
            if not (spurious and after == before):
                return event
            # QEMU ended the step without running the instruction (see SPURIOUS_RETRIES): again.
            engine.spurious_steps += 1
            event = await self._single_step(thread)
        return event

    async def _single_step(self, thread: ThreadId | None) -> StopEvent:
        """One real single-step of `thread` by QEMU; its stop.

        One instruction runs whatever breakpoints are set, so GDB's breakpoint changes wait for its next
        continue (a step-over's remove and re-insert then cancel out, and QEMU keeps its translated code).
        Watchpoint changes matter to a step: they go with it.
        """
        engine = self.engine
        step = engine.target.step_packet(thread)
        if any(k[0] == "watch" for k in engine.breakpoints.pending_changes()):
            for key, exc in await engine.breakpoints.reconcile(resume=step):
                log.error("GDB's %s at %#x could not be set on the target: %s", key[0], key[1], exc)
        else:
            await engine.client.resume(step)
        return await engine.client.wait_stop(timeout=None)

    async def _simulate_step(self, link: DebuggerLink, g: bytes, pc: int) -> bytes | None:
        """GDB's step of a simple instruction (see `probed.sim.emulate`), done with `M`/`P`; the new registers.

        Not an instruction that touches memory while any watchpoint is set: it would not trigger.
        """
        async def read(address: int, length: int) -> bytes | None:
            reply = await self._read_at_stop(link, address, length)
            if reply[:1] == b"E" or len(reply) != 2 * length:
                return None
            return bytes.fromhex(reply.decode("ascii"))

        code = link.memory.code_at(pc, MAX_INSN)
        if code is None:
            # A little more than one instruction: GDB's next step is likely to start in it.
            code = await read(pc, max(MAX_INSN, min(CODE_WINDOW, PAGE - pc % PAGE)))
            if code is None:
                return None
        engine = self.engine
        plan = engine.emulator.plan(code)
        if plan is None or (plan.touches_memory and engine.breakpoints.watching()) or not await engine.code_mode.is_native(g):
            return None

        outcome = await engine.emulator.run(plan, g, pc, read)
        if outcome is None:
            return None
        # Write-behind: QEMU applies these before anything we send later; a refusal shows up in
        # `deferred_errors` at the next reply, and the emulator is then switched off (`check_deferred`).
        await engine.client.post(outcome.packets)
        engine.simulated += 1
        link.patch_memory(outcome.writes)
        return outcome.registers

    async def read_for_debugger(
        self,
        link: DebuggerLink,
        thread: ThreadId | None,
        gdbs: StopEvent | None = None,
        unless: bytes | None = None,
    ) -> tuple[bytes, bool]:
        """At a stop GDB will see, in one write: the registers, what GDB read at its last stop, and the
        code around the last stop's pc (GDB often stops at the same place again, or steps on nearby).

        With `gdbs`, the stop is delivered to GDB as soon as the registers say it is GDB's (no probe at
        the pc), while the other reads are still on their way; but not if the registers equal `unless`
        (a step that did nothing). Returns the registers and whether the stop was delivered.
        """
        # With guest RAM at hand, only `g` goes to QEMU: GDB's reads come from RAM (below, once GDB has its stop).
        direct = self._reads_directly()
        reads = [] if direct else list(link.prefetch)
        if link.last_pc is not None and not direct:
            reads.append(_code_around(link.last_pc))
        engine = self.engine
        client = engine.client
        await client.begin([read_registers(), *(read_memory(*r) for r in reads)])
        g = await client.next_reply()
        if g[:1] == b"E" or not g:
            for _ in reads:
                await client.next_reply()
            raise_for_error(g, b"g")
        link.remember_registers(thread, g)
        link.memory.clear()
        pc = engine.target.pc_of(g)
        delivered = gdbs is not None and g != unless and not engine.breakpoints.engine_owns(pc)
        if delivered:
            await self.deliver(gdbs)
        for address, length in reads:
            link.memory.put(address, length, await client.next_reply())
        if delivered and direct:
            # From RAM, after GDB has its stop (it is busy with it meanwhile): what GDB read at its last
            # stop, and the code at the pc for a step, so that GDB's reads find them in the snapshot.
            for address, length in (*link.prefetch, _code_around(pc)):
                data = await self._read_direct(link, address, length)
                if data is not None:
                    link.memory.put(address, length, data.hex().encode())
        link.last_pc = pc
        return g, delivered

    async def interrupt(self, link: DebuggerLink) -> None:
        """GDB's Ctrl-C: stop the guest and give GDB the stop (even if its resume is still on its way)."""
        if self.engine.debugger is not link:
            return
        link.interrupt_requested = True
        await self.engine.service.wakeup()


def _code_around(pc: int) -> tuple[int, int]:
    """(address, length) of the code read around a stop's pc: a little before it, `CODE_WINDOW` after, in
    its page."""
    page = pc - pc % PAGE
    start = max(pc - CODE_BEHIND, page)
    return start, min(pc + CODE_WINDOW, page + PAGE) - start
