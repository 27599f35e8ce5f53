"""Breakpoint hits: classify a `T05` stop, run the hit through the pipeline, get past the breakpoint.

QEMU facts this leans on (see docs/architecture.md): `c` from a pc that sits on a breakpoint stops again
at once without executing, so a hit always single-steps (or simulates) the probed instruction before
continuing; `vCont;s:T` steps one vCPU and leaves the others stopped.

A hit costs only the packets its handlers need. When every breakpoint's pre-handlers read registers only,
the register read and the single-step go out in one write; a post-handler that reads registers only gets
its `g` in the same write as the `c` that resumes the guest; an instruction the simulator knows is done
with `P`/`M` packets written with the `c`, and the guest never single-steps.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from probed.engine.hits import Hit
from probed.engine.probes import HookPoint, Probe
from probed.engine.state import Event
from probed.sim.emulate import MAX_INSN
from rsp.packets import raise_for_error, read_memory, read_registers
from rsp.stop import StopEvent, StopReply, ThreadId

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = ["BreakHits", "SPURIOUS_RETRIES", "is_plain_trap"]

log = logging.getLogger("probed.engine.engine")

SIGTRAP = 5

SPURIOUS_RETRIES = 3
"""QEMU 7.2 now and then ends a single-step (`T05`) without running the instruction: every register as
before (seen here about once in 20,000 steps, stepping the bundled guests with nothing else attached).
Only a jump to itself leaves every register as it was, so a step that changed nothing is done again, up to
this many times."""


def is_plain_trap(event: StopEvent) -> bool:
    """A `T05` that is not a watchpoint's: a breakpoint or a step's end."""
    return isinstance(event, StopReply) and event.signal == SIGTRAP and not event.is_watch


class BreakHits:
    """The breakpoint side of the hit pipeline."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.last_point: HookPoint | None = None  # the point hit last: likely the next one too
        self.unfinished: Hit | None = None  # a hit whose step ran nothing after its `c` went
        # Which stop followed which: with return probes, stops alternate between a function and its
        # return address (or go down a recursion and back up), so "the same place again" guesses wrong.
        self.last_pc: int | None = None
        self.next_pc: dict[int, int] = {}

    def _code_guess(self, guess: HookPoint | None) -> int | None:
        """The address whose instruction to read with the registers: where the stop after the last one
        went last time (if a probe or a return probe is still there), else the last point's."""
        if self.last_pc is not None:
            pc = self.next_pc.get(self.last_pc)
            if pc is not None and (self.engine.table.breakpoint_at(pc) or self.engine.returns.armed(pc)):
                return pc
        return guess.address if guess is not None else None

    def forget_places(self) -> None:
        """Forget the addresses learnt (the guest rebooted: they are another kernel's)."""
        self.last_point, self.last_pc, self.unfinished = None, None, None
        self.next_pc.clear()

    def _learn(self, pc: int) -> None:
        if self.last_pc is not None:
            if len(self.next_pc) > 4096:
                self.next_pc.clear()
            self.next_pc[self.last_pc] = pc
        self.last_pc = pc

    def _guess(self) -> HookPoint | None:
        point = self.last_point
        if point is not None and self.engine.table.points.get(point.key) is not point:
            self.last_point = point = None
        return point

    async def on_stop(self, event: StopReply) -> bool:
        """Handle a breakpoint stop; returns True when the guest was already resumed."""
        engine = self.engine
        target = engine.target
        client = target.client
        thread = event.thread
        debugger = engine.debugger
        guess = self._guess()
        code: bytes | None = None
        code_at: int | None = None
        prefetched: dict[tuple[int, int], bytes | Exception] = {}
        stepped = False
        unfinished, self.unfinished = self.unfinished, None
        if debugger is not None and debugger.has_breakpoints():
            # The stop may be GDB's: nothing may move before we know. Read what GDB will want too; if
            # it is GDB's and no probe's, GDB gets it as soon as the registers are in.
            g, delivered = await engine.gdb.read_for_debugger(debugger, thread, event if debugger.running else None)
            if delivered:
                if unfinished is not None:
                    engine.pipeline.abandon(unfinished)
                return False
        elif guess is not None and engine.breakpoints.pipeline_step and any(p.post for p in guess.active()):
            # Likely the same probe as last time, with a post-handler: read and step in one write.
            (g,) = await client.pipeline([read_registers()], resume=target.step_packet(thread))
            raise_for_error(g, b"g")
            stepped = True
        else:
            # Read the registers and (speculatively) the instruction of the likely probe, unless guest RAM
            # gives the instruction after them.
            code_at = self._code_guess(guess) if target.memory is None or not target.memory.direct else None
            reqs = [read_registers()] + ([read_memory(code_at, MAX_INSN)] if code_at is not None else [])
            # (And, at a return probe's function, the return address where it was last time.)
            ahead = engine.returns.prefetch(code_at) if code_at is not None else None
            if ahead is not None:
                reqs.append(read_memory(*ahead))
            replies = await client.pipeline(reqs)
            g = replies[0]
            raise_for_error(g, b"g")
            if len(replies) > 1 and replies[1][:1] != b"E" and replies[1]:
                code = bytes.fromhex(replies[1].decode("ascii"))
            if ahead is not None and replies[2][:1] != b"E" and len(replies[2]) == 2 * ahead[1]:
                prefetched[ahead] = bytes.fromhex(replies[2].decode("ascii"))
        pc = target.pc_of(g)
        if debugger is not None:
            debugger.remember_registers(thread, g)
        if unfinished is not None:
            if unfinished.pc == pc and unfinished.tid == (thread.tid if thread is not None else 1):
                # The stop right after a step that did nothing and a `c`: the same hit, stepped again.
                engine.guest.move(Event.HIT)
                return await self.complete(unfinished, stepped=stepped)
            engine.pipeline.abandon(unfinished)
        reboot = engine.reboot
        if reboot is not None and reboot.owns(pc) and await reboot.on_reset(g, pc):
            # The guest reset: the probes come out at the next reconcile; the firmware runs on.
            return await self.step_over(thread, g, pc, stepped)
        point = engine.table.breakpoint_at(pc)
        probes = engine.table.active_at(pc)
        returning = engine.returns.armed(pc)
        debugger_wants = debugger is not None and not stepped and debugger.wants_break(pc)
        kind = "break"
        ended = None
        if returning and engine.returns.is_user(pc):
            # A user function's return address: every process running there stops; only the calls of
            # the address space and task that made them end here.
            ended = await engine.returns.ended_at(thread, pc, g)
            if not ended:
                engine.returns.silent += 1
                returning = False
        if engine.uprobes.owns(pc):
            # A user probe's address (a hit only in a process that maps the file there) or a kernel hook
            # that tracks mappings: with no probe to run, the instruction is stepped past silently.
            users = await engine.uprobes.on_stop(pc, g)
            if not probes and not users and not debugger_wants and not returning:
                return await self.step_over(thread, g, pc, stepped)
            if users:
                probes, kind = probes + users, "user" if not probes else "break"
            if point is None:
                code = engine.uprobes.code  # read by on_stop (a user hit's instruction), else None
        elif ended is not None and not returning and not probes and not debugger_wants:
            return await self.step_over(thread, g, pc, stepped)
        if not probes and not returning:
            if stepped:
                await self.finish_step()
            elif debugger is not None and debugger.running:
                # Not a probe's stop: the debugger's, or one it should see anyway.
                await engine.gdb.deliver(event)
            else:
                log.debug("stop at %#x that no probe wants", pc)
            return False
        self.last_point = point
        self._learn(pc)
        engine.guest.move(Event.HIT)
        hit = await self.begin(thread, pc, g, probes, returning, prefetched, kind=kind, ended=ended)
        if debugger_wants:
            # Both want this place: the probe hit is recorded, and the debugger gets the stop. The probed
            # instruction is stepped (and the post-handlers run) when the debugger resumes.
            engine.gdb.park(hit)
            await engine.gdb.deliver(event)
            return False
        if not stepped and not any(p.post for p in probes) and not engine.service.must_stop():
            if code_at != pc or code is None:
                code = target.read_now(pc, MAX_INSN, g)
                if code is None:
                    (code,) = await target.read_many([(pc, MAX_INSN)])
            if await self.simulate(hit, g, code):
                return True
        return await self.complete(hit, stepped=stepped)

    async def step_over(self, thread, g: bytes, pc: int, stepped: bool) -> bool:
        """Get past a breakpoint no probe wants this time (simulated when possible); True when resumed."""
        engine = self.engine
        if stepped:
            await self.finish_step()
            return False
        if not engine.service.must_stop():
            code = engine.uprobes.kernel_code.get(pc)  # the hooks' kernel text does not change
            if code is None:
                (code,) = await engine.target.read_many([(pc, MAX_INSN)])
                if pc in engine.uprobes.hooks and not isinstance(code, Exception):
                    engine.uprobes.kernel_code[pc] = code
            if not isinstance(code, Exception):
                plan = engine.emulator.plan(code)
                if plan is not None and not (plan.touches_memory and engine.breakpoints.watching()) and \
                        await engine.code_mode.is_native(g):
                    outcome = await engine.emulator.run(plan, g, pc, self.read_plain)
                    if outcome is not None:
                        await engine.service.resume_fast(outcome.packets, defer=True)
                        engine.simulated += 1
                        return True
        await engine.client.resume(engine.target.step_packet(thread))
        await self.finish_step()
        return False

    async def begin(
        self,
        thread: ThreadId | None,
        pc: int,
        g: bytes,
        probes: list[Probe],
        returning: bool,
        prefetched: dict[tuple[int, int], bytes | Exception] | None = None,
        kind: str = "break",
        ended: list | None = None,
    ) -> Hit:
        """The hit of a breakpoint stop at `pc`: the returns it ends (their records come first), the
        breakpoint probes there, and the entries of return probes there (`probed.engine.returns`).
        `ended`: the return instances this stop ends, when found already (`ReturnProbes.ended_at`)."""
        engine = self.engine
        entries = [p for p in probes if p.retprobe]
        if entries:
            probes = [p for p in probes if not p.retprobe]
        hit = await engine.returns.on_return(thread, pc, g, ended) if returning else None
        if probes or hit is None:
            plain = await engine.pipeline.begin(kind, thread, pc, g, probes)
            hit = plain if hit is None else engine.pipeline.merge(hit, plain)
        if entries:
            seq = next((r.seq for r in hit.records if r.kind in ("break", "user")), None)
            if await engine.returns.on_entry(thread, pc, g, entries, seq, prefetched):
                await engine.breakpoints.reconcile()  # the return breakpoint, before the guest goes on
        return hit

    async def simulate(self, hit: Hit, g: bytes, code: bytes | Exception) -> bool:
        """Get past the breakpoint by simulating the instruction and continue, in one write."""
        engine = self.engine
        if isinstance(code, Exception):
            return False
        plan = engine.emulator.plan(code)
        if plan is None or (plan.touches_memory and engine.breakpoints.watching()) or not await engine.code_mode.is_native(g):
            return False
        outcome = await engine.emulator.run(plan, g, hit.pc, self.read_plain)
        if outcome is None:
            return False
        await engine.service.resume_fast(outcome.packets, defer=True)  # checked at the next stop
        engine.simulated += 1
        engine.pipeline.finish(hit)
        return True

    async def read_plain(self, address: int, length: int) -> bytes | None:
        """Guest memory for a simulated load; None when the target cannot read it."""
        (data,) = await self.engine.target.read_many([(address, length)])
        return None if isinstance(data, Exception) else data

    async def complete(self, hit: Hit, *, stepped: bool = False, may_resume: bool = True) -> bool | StopEvent:
        """Step the probed instruction (unless already on its way), run post-handlers, publish.

        After the step the registers are read (with the `c`, when the guest may go on): a step that
        changed nothing is QEMU's spurious stop (see `SPURIOUS_RETRIES`) and is done again; if the `c`
        went already, the guest stops at once at the same breakpoint and that stop finishes this hit.

        Returns True when the guest was resumed here; with `may_resume=False`, the step's stop event.
        """
        engine = self.engine
        target = engine.target
        client = target.client
        if not stepped:
            await client.resume(target.step_packet(hit.thread))
        step_event = await client.wait_stop(timeout=None)
        probes = hit.probes
        resumed = False
        post_handlers = [p.post for p in probes if p.post is not None]
        g2: bytes | None = None
        for attempt in range(SPURIOUS_RETRIES + 1):
            if not is_plain_trap(step_event):
                break
            if may_resume and not engine.service.must_stop() and not any(h.needs_memory for h in post_handlers):
                (g2,) = await engine.service.resume_fast([read_registers()])
                resumed = True
            else:
                g2 = await target.read_g()
            if g2 != hit.g or attempt == SPURIOUS_RETRIES:
                break
            engine.spurious_steps += 1
            if resumed:
                self.unfinished = hit
                return True
            await client.resume(target.step_packet(hit.thread))
            step_event = await client.wait_stop(timeout=None)
        if post_handlers:
            if g2 is None:
                g2 = await target.read_g()
            await engine.pipeline.run_post(hit, g2)
        engine.pipeline.finish(hit)
        if not may_resume:
            return step_event
        if not resumed and isinstance(step_event, StopReply) and step_event.is_watch:
            # The probed instruction itself touched a watched address.
            engine.stops += 1
            return await engine.watch.on_watch_stop(step_event)
        if not resumed:
            engine.guest.move(Event.HIT_DONE)
        return resumed

    async def finish_step(self) -> None:
        """Wait for the end of a step that went out with the registers' read, for a probe not there now."""
        step_event = await self.engine.client.wait_stop(timeout=None)
        if isinstance(step_event, StopReply) and step_event.is_watch:
            await self.engine.watch.on_watch_stop(step_event)
