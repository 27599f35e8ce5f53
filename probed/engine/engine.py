"""The engine: the one task that owns the QEMU connection and runs stop -> classify -> handle -> resume.

Rules it keeps (ARCHITECTURE.md):
- All-stop. While the guest is stopped for a hit nothing else runs it. Changes (adding, removing, enabling
  probes) are requests run by the engine task while the guest is stopped: a running guest is interrupted,
  every pending change is applied, and the guest resumes.
- The guest is always resumed after a hit, whatever a handler did; handler errors go into the hit record.
- A hit costs only the packets its handlers need. When every breakpoint's pre-handlers read registers only,
  the register read and the single-step go out in one write; a post-handler that reads registers only gets
  its `g` in the same write as the `c` that resumes the guest.

QEMU facts this leans on (shared/QEMU-GDBSTUB.md): `c` from a pc that sits on a breakpoint stops again at
once without executing, so a hit always single-steps the probed instruction before continuing; `vCont;s:T`
steps one vCPU and leaves the others stopped; an interrupt (0x03) sent during a step would pause the guest
before the step completes, so interrupts are only sent while the guest runs freely after `c`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import trio

from probed.engine.probes import FAULT_LIMIT, HookPoint, Probe, ProbeTable
from probed.engine.slots import SlotAllocator
from probed.engine.target import Target
from probed.engine.watch import WatchHelper
from probed.errors import BadSpec, ProbedError, TargetError, Unsupported
from probed.gdbside.debugger import DebuggerLink
from probed.gdbside.engine_debugger import SPURIOUS_RETRIES, DebuggerSide, _plain
from probed.guest.symbols import Location, SymbolStore, parse_file_arg
from probed.lang.context import HitContext
from probed.lang.handlers import Handler, make_handler
from probed.records.events import EventHub
from probed.sim.cpumode import CodeMode
from probed.sim.emulate import MAX_INSN, Emulator, NoEmulator
from rsp.connection import RSPClient, raise_for_reply
from rsp.errors import ConnectionClosed, RSPError, TargetTimeout
from rsp.stop import Exited, StopEvent, StopReply, Terminated, ThreadId

__all__ = ["Engine"]

log = logging.getLogger(__name__)

SIGTRAP = 5
Z_TYPES = {"break": 0, "hbreak": 1, "watch:w": 2, "watch:r": 3, "watch:rw": 4}


@dataclass
class _Hit:
    """A breakpoint hit between its pre phase and its step."""

    thread: ThreadId | None
    cpu: int
    pc: int
    stop: int
    probes: list[Probe]
    pre: list[tuple[Any, str | None]]
    g: bytes  # the registers at the hit, before the probed instruction


class _Request:
    """Work to run in the engine task while the guest is stopped."""

    def __init__(self, fn: Callable[[], Awaitable[Any]]):
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Engine(DebuggerSide):
    """Probes on a QEMU guest, driven over one RSP connection.

    Args:
        target: `tcp:HOST:PORT` or `unix:PATH` of QEMU's gdbstub.
        symbol_files: symbol files, each `PATH[@BIAS]`.
        stopped: leave the guest stopped after attaching until `resume()` (boot-time tracing).
        hw_slots: hardware debug-register slots (x86: 4).
        buffer: how many recent hit records the ring buffer keeps.
        fault_limit: consecutive handler faults after which a probe is disabled.
    """

    def __init__(
        self,
        target: str,
        *,
        symbol_files: Sequence[str] = (),
        stopped: bool = False,
        hw_slots: int = 4,
        buffer: int = 65536,
        fault_limit: int = FAULT_LIMIT,
        timeout: float = 10.0,
    ):
        self.target_address = target
        self.symbols = SymbolStore()
        for arg in symbol_files:
            path, bias = parse_file_arg(arg)
            self.symbols.add_file(path, bias=bias)
        self.table = ProbeTable()
        self.hub = EventHub(buffer, on_missed=self._count_missed)
        self.slots = SlotAllocator(hw_slots)
        self.fault_limit = fault_limit
        self.timeout = timeout
        self.target: Target | None = None
        self.watch = WatchHelper(self)
        self.emulator: Any = NoEmulator()
        self.code_mode: CodeMode | None = None
        self._last_point: HookPoint | None = None
        self.state = "detached"
        self.stops = 0
        self.hits = 0
        self.simulated = 0  # instructions simulated instead of single-stepped (probes' and GDB's)
        self.spurious_steps = 0  # QEMU's single-steps that ran nothing, done again (SPURIOUS_RETRIES)
        self._unfinished: _Hit | None = None  # a hit whose step ran nothing after its `c` went
        self.records = 0
        self._hold = stopped
        self._requests: deque[_Request] = deque()
        self._wake = trio.Event()
        self._free_running = False
        self._installed: dict[tuple[str, int, int, str], bytes] = {}
        self._slot_of: dict[tuple[str, int, int, str], Any] = {}
        self._dirty = False
        self._gdb_changes = False
        self._pipeline_step = True
        self._dead: BaseException | None = None
        self._started = time.monotonic()
        # Poll for the next stop this long after a hit, when a core is free for it (see RSPClient).
        self.poll_seconds = 0.001 if (os.cpu_count() or 1) > 1 else 0.0
        self.current_thread: ThreadId | None = None
        self.debugger: DebuggerLink | None = None  # the GDB stub's session (probed.gdbside.debugger.DebuggerLink), when one is attached

    # -- properties ---------------------------------------------------------------------------------

    @property
    def arch(self):
        return self.target.arch if self.target else None

    @property
    def client(self) -> RSPClient:
        return self.target.client

    # -- the service --------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Attach, report started, and run until cancelled; then clean up and detach.

        Raises:
            TargetError: the target cannot be reached, or went away.
        """
        try:
            client = await RSPClient.connect(self.target_address, timeout=self.timeout)
        except ConnectionClosed as exc:
            raise TargetError(str(exc)) from exc
        self.target = Target(client, self.symbols)
        try:
            try:
                await self.target.attach()
            except TargetTimeout as exc:
                raise TargetError(
                    f"cannot attach to {self.target_address}: it does not answer ({exc}); "
                    "QEMU serves one debugger at a time: is another one attached?"
                ) from exc
            except RSPError as exc:
                raise TargetError(f"cannot attach to {self.target_address}: {exc}") from exc
            self.emulator = Emulator(self.arch, self.target.layout, self.symbols.image_ranges)
            self.code_mode = CodeMode(self.target)
            self.state = "stopped"
            log.info("attached to %s (%s, %d cpu)", self.target_address, self.arch.name, len(self.target.threads))
            task_status.started()
            await self._loop()
        except ConnectionClosed as exc:
            self._dead = TargetError(f"the target went away: {exc}")
            raise self._dead from exc
        except BaseException as exc:
            self._dead = exc if isinstance(exc, ProbedError) else TargetError("the engine stopped")
            raise
        finally:
            self._fail_requests()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await self._shutdown()
            self.hub.close()
            self.state = "detached"

    async def _loop(self) -> None:
        client = self.client
        running = False
        while True:
            if not running:
                await self._serve_requests()
                if self.debugger is not None and self.debugger.interrupt_requested:
                    # The debugger asked for a stop while we were busy with a hit: this stop is its.
                    await self.debugger.deliver(StopReply(2, self.debugger.current_thread))
                if self._holding():
                    self.state = "stopped"
                    await self._wait_for_wake()
                    continue
                self.state = "running"
                self._free_running = True
                if self._gdb_changes:
                    # GDB's breakpoint changes and the `c` in one write.
                    self._gdb_changes = False
                    for key, exc in await self._reconcile(resume=b"c"):
                        log.error("GDB's %s at %#x could not be set on the target: %s", key[0], key[1], exc)
                    if self._must_stop():
                        await client.interrupt()
                else:
                    await client.resume(b"c")
            else:
                self._free_running = True
            try:
                event = await client.wait_stop()
            finally:
                self._free_running = False
            with client.bounded(self.timeout):
                running = await self._on_stop(event)
            if running and self.poll_seconds:
                # Hits come in bursts: the next stop is likely within a millisecond.
                client.poll_until = trio.current_time() + self.poll_seconds

    def _must_stop(self) -> bool:
        """Whether someone waits for the guest to stop (requests, a hold, GDB's Ctrl-C)."""
        return bool(self._requests) or self._holding() or (
            self.debugger is not None and self.debugger.interrupt_requested
        )

    async def _resume_fast(self, packets: list[bytes], *, defer: bool = False) -> list[bytes]:
        """Send `packets` and `c` in one write; the guest runs freely after it.

        With `defer`, their (`OK`) replies are checked when the next stop is read, not waited for now.
        """
        self._free_running = True
        replies = await self.client.pipeline(packets, resume=b"c", defer=defer)
        if self._must_stop() or self._dirty:
            # Asked for while we were writing: the asker could not interrupt yet.
            await self.client.interrupt()
        return replies

    def _holding(self) -> bool:
        return self._hold or (self.debugger is not None and self.debugger.holding)

    async def _wait_for_wake(self) -> None:
        while self._holding() and not self._requests:
            self._wake = trio.Event()
            await self._wake.wait()

    async def _serve_requests(self) -> None:
        if self._dirty:
            self._dirty = False
            await self._reconcile()
        while self._requests:
            req = self._requests.popleft()
            try:
                req.result = await req.fn()
            except Exception as exc:
                req.error = exc
            finally:
                req.done.set()
        if self._dirty:
            self._dirty = False
            await self._reconcile()

    def _fail_requests(self) -> None:
        while self._requests:
            req = self._requests.popleft()
            req.error = TargetError("the engine is not running")
            req.done.set()

    async def call_stopped(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` in the engine task while the guest is stopped; returns its result.

        Raises:
            TargetError: the engine is not attached or has stopped.
        """
        if self.target is None or self._dead is not None:
            raise TargetError("the engine is not attached to a target")
        req = _Request(fn)
        self._requests.append(req)
        await self._wakeup()
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    async def _wakeup(self) -> None:
        self._wake.set()
        if self._free_running:
            await self.client.interrupt()

    async def _shutdown(self) -> None:
        if self.target is None:
            return
        client = self.client
        try:
            if client.running:
                await client.halt(timeout=2)
            packets = [self._z_packet(key, insert=False) for key in self._installed]
            self._installed.clear()
            if packets:
                await client.pipeline(packets, timeout=2)
            # `D` also makes QEMU drop every breakpoint and resume the guest.
            await client.request(b"D", timeout=2)
        except (RSPError, trio.TooSlowError, RuntimeError) as exc:
            log.warning("could not detach cleanly: %s", exc)
        finally:
            with trio.move_on_after(1):
                await client.aclose()

    # -- stops --------------------------------------------------------------------------------------

    async def _on_stop(self, event: StopEvent) -> bool:
        """Handle one stop; returns True when the guest was already resumed."""
        if isinstance(event, Exited | Terminated):
            raise TargetError(f"the guest is gone ({event})")
        self._check_deferred()
        if not isinstance(event, StopReply):
            return False
        self.stops += 1
        if event.thread is not None:
            self.current_thread = event.thread
        debugger = self.debugger
        if debugger is not None:
            debugger.forget_registers()
        if event.signal != SIGTRAP:
            if debugger is not None and (debugger.interrupt_requested or debugger.running):
                await debugger.deliver(event)  # GDB's Ctrl-C, or a signal it should see
            return False  # our interrupt (T02): pending requests run next
        if event.is_watch:
            resumed = await self.watch.on_watch_stop(event)
            if debugger is not None and debugger.wants_watch(event):
                await debugger.deliver(event)
            return resumed
        return await self._on_break_stop(event)

    def _check_deferred(self) -> None:
        """Simulated instructions are written behind; if the target refused one, stop simulating."""
        if self.client.deferred_errors:
            bad, self.client.deferred_errors = self.client.deferred_errors, []
            log.error("simulating an instruction failed: %r; single-stepping from now on", bad)
            self.emulator = NoEmulator()

    async def _on_break_stop(self, event: StopReply) -> bool:
        target = self.target
        client = target.client
        thread = event.thread
        debugger = self.debugger
        guess = self._last_point
        code: bytes | None = None
        stepped = False
        unfinished, self._unfinished = self._unfinished, None
        if debugger is not None and debugger.has_breakpoints():
            # The stop may be GDB's: nothing may move before we know. Read what GDB will want too; if
            # it is GDB's and no probe's, GDB gets it as soon as the registers are in.
            g, delivered = await self._read_for_debugger(debugger, thread, event if debugger.running else None)
            if delivered:
                if unfinished is not None:
                    self._abandon(unfinished)
                return False
        elif guess is not None and self._pipeline_step and any(p.post for p in guess.active()):
            # Likely the same probe as last time, with a post-handler: read and step in one write.
            (g,) = await client.pipeline([b"g"], resume=target.step_packet(thread))
            raise_for_reply(b"g", g)
            stepped = True
        else:
            # Read the registers and (speculatively) the instruction of the likely probe.
            reqs = [b"g"] + ([b"m%x,%x" % (guess.address, MAX_INSN)] if guess is not None else [])
            replies = await client.pipeline(reqs)
            g = replies[0]
            raise_for_reply(b"g", g)
            if len(replies) > 1 and replies[1][:1] != b"E" and replies[1]:
                code = bytes.fromhex(replies[1].decode("ascii"))
        pc = target.pc_of(g)
        if debugger is not None:
            debugger.remember_registers(thread, g)
        if unfinished is not None:
            if unfinished.pc == pc and _tid(unfinished.thread) == _tid(thread):
                # The stop right after a step that did nothing and a `c`: the same hit, stepped again.
                return await self._complete_hit(unfinished, stepped=stepped)
            self._abandon(unfinished)
        point = self.table.breakpoint_at(pc)
        probes = self.table.active_at(pc)
        debugger_wants = debugger is not None and not stepped and debugger.wants_break(pc)
        if not probes:
            if stepped:
                await self._finish_step()
            elif debugger is not None and debugger.running:
                # Not a probe's stop: the debugger's, or one it should see anyway.
                await debugger.deliver(event)
            else:
                log.debug("stop at %#x that no probe wants", pc)
            return False
        self._last_point = point
        hit = await self._pre_phase(thread, pc, g, probes)
        if debugger_wants:
            # Both want this place: the probe hit is recorded, and the debugger gets the stop. The probed
            # instruction is stepped (and the post-handlers run) when the debugger resumes.
            debugger.park(hit)
            await debugger.deliver(event)
            return False
        if not stepped and not any(p.post for p in probes) and not self._must_stop():
            if guess is not point or code is None:
                (code,) = await target.read_many([(pc, MAX_INSN)])
            if await self._simulate(hit, g, code):
                return True
        return await self._complete_hit(hit, stepped=stepped)

    async def _simulate(self, hit: _Hit, g: bytes, code: bytes | Exception) -> bool:
        """Get past the breakpoint by simulating the instruction and continue, in one write."""
        if isinstance(code, Exception):
            return False
        plan = self.emulator.plan(code)
        if plan is None or (plan.touches_memory and self._watching()) or not await self.code_mode.is_native(g):
            return False
        outcome = await self.emulator.run(plan, g, hit.pc, self._read_plain)
        if outcome is None:
            return False
        await self._resume_fast(outcome.packets, defer=True)  # checked at the next stop (`_on_stop`)
        self.simulated += 1
        self._publish_hit(hit, [(None, None)] * len(hit.probes))
        return True

    async def _read_plain(self, address: int, length: int) -> bytes | None:
        """Guest memory for a simulated load; None when the target cannot read it."""
        (data,) = await self.target.read_many([(address, length)])
        return None if isinstance(data, Exception) else data

    async def _pre_phase(self, thread: ThreadId | None, pc: int, g: bytes, probes: list[Probe]) -> _Hit:
        self.hits += 1
        cpu = thread.tid - 1 if thread is not None and thread.tid > 0 else 0
        ctx = HitContext(self.target, cpu, "pre", g)
        pre = [await self._run(p, p.pre, ctx) for p in probes]
        return _Hit(thread, cpu, pc, self.stops, probes, pre, g)

    async def _complete_hit(self, hit: _Hit, *, stepped: bool = False, may_resume: bool = True) -> bool | StopEvent:
        """Step the probed instruction (unless already on its way), run post-handlers, publish.

        After the step the registers are read (with the `c`, when the guest may go on): a step that
        changed nothing is QEMU's spurious stop (see `SPURIOUS_RETRIES`) and is done again; if the `c`
        went already, the guest stops at once at the same breakpoint and that stop finishes this hit.

        Returns True when the guest was resumed here; with `may_resume=False`, the step's stop event.
        """
        target = self.target
        client = target.client
        if not stepped:
            await client.resume(target.step_packet(hit.thread))
        step_event = await client.wait_stop(timeout=None)
        probes = hit.probes
        post: list[tuple[Any, str | None]] = [(None, None)] * len(probes)
        resumed = False
        post_handlers = [p.post for p in probes if p.post is not None]
        g2: bytes | None = None
        for attempt in range(SPURIOUS_RETRIES + 1):
            if not _plain(step_event):
                break
            if may_resume and not self._must_stop() and not any(h.needs_memory for h in post_handlers):
                (g2,) = await self._resume_fast([b"g"])
                resumed = True
            else:
                g2 = await target.read_g()
            if g2 != hit.g or attempt == SPURIOUS_RETRIES:
                break
            self.spurious_steps += 1
            if resumed:
                self._unfinished = hit
                return True
            await client.resume(target.step_packet(hit.thread))
            step_event = await client.wait_stop(timeout=None)
        if post_handlers:
            if g2 is None:
                g2 = await target.read_g()
            pctx = HitContext(target, hit.cpu, "post", g2)
            post = [await self._run(p, p.post, pctx) if p.post is not None else (None, None) for p in probes]

        self._publish_hit(hit, post)
        if not may_resume:
            return step_event
        if not resumed and isinstance(step_event, StopReply) and step_event.is_watch:
            # The probed instruction itself touched a watched address.
            self.stops += 1
            return await self.watch.on_watch_stop(step_event)
        return resumed

    def _abandon(self, hit: _Hit) -> None:
        """Publish a hit whose instruction's step never ran (the guest went elsewhere): no post values."""
        note = "the probed instruction's step did not run; no post values"
        self._publish_hit(hit, [(None, note if p.post is not None else None) for p in hit.probes])

    def _publish_hit(self, hit: _Hit, post: list[tuple[Any, str | None]]) -> None:
        now = time.time_ns()
        where = self.target.symbolize(hit.pc)
        for probe, (pre_value, pre_err), (post_value, post_err) in zip(hit.probes, hit.pre, post, strict=True):
            record = {
                "probe": probe.id,
                "name": probe.name,
                "seq": probe.hits,
                "stop": hit.stop,
                "time_ns": now,
                "cpu": hit.cpu,
                "pc": f"{hit.pc:#x}",
                "where": where,
                "pre": pre_value,
                "post": post_value,
                "error": _join_errors(pre_err, post_err),
            }
            self._publish(probe, record, pre_value, post_value)

    async def _finish_step(self) -> None:
        step_event = await self.client.wait_stop(timeout=None)
        if isinstance(step_event, StopReply) and step_event.is_watch:
            await self.watch.on_watch_stop(step_event)

    async def _run(self, probe: Probe, handler: Handler | None, ctx: HitContext) -> tuple[Any, str | None]:
        """Run one handler; count the hit (pre phase) and any fault."""
        if ctx.phase == "pre":
            probe.hits += 1
        if handler is None:
            return None, None
        ctx.probe = probe
        try:
            value = await handler.run(ctx)
        except Exception as exc:  # a handler's bug is recorded, never fatal
            probe.faults += 1
            probe.fault_run += 1
            if probe.fault_run >= self.fault_limit and probe.enabled:
                probe.enabled = False
                probe.disabled_reason = f"{probe.fault_run} handler faults in a row (last: {type(exc).__name__}: {exc})"
                log.warning("probe %s disabled: %s", probe.name, probe.disabled_reason)
                self._dirty = True
            return None, f"{ctx.phase}: {type(exc).__name__}: {exc}"
        probe.fault_run = 0
        return value, None

    def _publish(self, probe: Probe, record: dict[str, Any], pre: Any, post: Any) -> None:
        if probe.condition is not None:
            values: dict[str, Any] = {}
            if isinstance(pre, dict):
                values.update(pre)
            if isinstance(post, dict):
                values.update(post)
            if not probe.condition.matches(values):
                probe.filtered += 1
                return
        self.records += 1
        self.hub.publish(record)

    def _count_missed(self, probe_id: int) -> None:
        try:
            self.table.find(probe_id).missed += 1
        except ProbedError:
            pass

    # -- breakpoints on the target ------------------------------------------------------------------

    def _z_packet(self, key: tuple[str, int, int, str], insert: bool) -> bytes:
        kind, address, length, access = key
        ztype = Z_TYPES["watch:" + access] if kind == "watch" else Z_TYPES[kind]
        size = length if kind == "watch" else self.arch.breakpoint_kind
        return b"%s%d,%x,%x" % (b"Z" if insert else b"z", ztype, address, size)

    def _wanted(self) -> set[tuple[str, int, int, str]]:
        want = {key for key, point in self.table.points.items() if point.active()}
        if self.debugger is not None:
            want |= self.debugger.keys()
        return want

    def _watching(self) -> bool:
        """Whether a watchpoint is set or about to be (probes' or the debugger's)."""
        return any(k[0] == "watch" for k in self._installed) or any(k[0] == "watch" for k in self._wanted())

    def _pending_changes(self) -> set[tuple[str, int, int, str]]:
        """Breakpoints and watchpoints to insert or remove to match what is wanted."""
        return self._wanted() ^ set(self._installed)

    async def _reconcile(self, resume: bytes | None = None) -> list[tuple[tuple[str, int, int, str], Exception]]:
        """Make the target's breakpoints match the enabled hook points, in one write.

        With `resume`, that command follows the changes in the same write (the guest runs after it).

        Returns:
            The insertions the target refused, with their errors (those points stay uninstalled).
        """
        want = self._wanted()
        if self._last_point is not None and self.table.points.get(self._last_point.key) is not self._last_point:
            self._last_point = None
        removals = [key for key in self._installed if key not in want]
        inserts = [key for key in want if key not in self._installed]
        for key in removals:
            self.slots.free(self._slot_of.pop(key, None))
        packets = [self._z_packet(k, insert=False) for k in removals] + [self._z_packet(k, insert=True) for k in inserts]
        failures: list[tuple[tuple[str, int, int, str], Exception]] = []
        if resume is not None and not packets:
            await self.client.resume(resume)
        if packets:
            replies = await self.client.pipeline(packets, resume=resume)
            for key in removals:
                del self._installed[key]
            for key, packet, reply in zip(inserts, packets[len(removals) :], replies[len(removals) :], strict=True):
                try:
                    raise_for_reply(packet, reply)
                    if reply != b"OK":
                        raise TargetError(f"unexpected reply {reply[:20]!r} to {packet!r}")
                except RSPError as exc:
                    failures.append((key, _refused(key, exc)))
                except TargetError as exc:
                    failures.append((key, exc))
                else:
                    self._installed[key] = packet
        self._pipeline_step = all(
            not (p.pre is not None and p.pre.needs_memory)
            for point in self.table.points.values()
            if point.kind != "watch"
            for p in point.active()
        )
        return failures

    async def _install_probe(self, probe: Probe) -> None:
        """File a probe and install its hook point; undo everything if the target refuses."""
        slot = None
        key = probe.point_key
        if (probe.kind == "watch" or probe.hw) and key not in self._installed and key not in self._slot_of:
            slot = self._slot_of[key] = self.slots.allocate("probe", probe.name, _slot_use(probe))
        point = self.table.add(probe)
        failures = await self._reconcile()
        for fkey, exc in failures:
            if fkey == point.key:
                self.table.remove(probe)
                if slot is not None:
                    self.slots.free(self._slot_of.pop(point.key, None))
                await self._reconcile()
                raise exc

    async def _check_readable(self, address: int) -> None:
        (result,) = await self.target.read_many([(address, 1)])
        if isinstance(result, Exception):
            raise TargetError(f"address {address:#x} is not mapped in the guest (the target refused to read it: {result})")

    # -- public API ---------------------------------------------------------------------------------

    def _new_name(self, name: str | None, fallback: str) -> str:
        if name:
            if self.table.name_taken(name):
                raise BadSpec(name, "a probe with that name exists already")
            return name
        base = fallback.replace(":", "_").replace("+", "_")
        candidate, n = base, 1
        while self.table.name_taken(candidate):
            n += 1
            candidate = f"{base}_{n}"
        return candidate

    def _condition(self, condition: str | None, pre: Handler | None, post: Handler | None):
        if not condition:
            return None
        from probed.lang.filter import parse_filter

        fields: list[str] = []
        for h in (pre, post):
            fields += list(getattr(h, "fields", ()) or ())
        return parse_filter(condition, fields)

    async def add_probe(
        self,
        spec: str,
        *,
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        hw: bool = False,
    ) -> Probe:
        """Add a breakpoint probe at `sym`, `sym+off`, `file:sym+off` or `0xADDR`.

        Args:
            pre: fetch args (list of `NAME=FETCHARG[:TYPE]`) or a callable `fn(ctx)`, run before the
                probed instruction.
            post: the same, run after it is single-stepped; `[]` steps without fetching, None skips the
                post phase.
            condition: a filter over the fetched names; a hit is reported only when it holds.
            hw: use a hardware breakpoint (takes a debug-register slot).

        Raises:
            UnknownSymbol, BadSpec, FetchSyntaxError, FilterSyntaxError, SlotsExhausted, TargetError.
        """
        self._require_attached()
        location = self.symbols.resolve(spec)
        pre_h = make_handler(pre, self.arch, self.symbols)
        post_h = make_handler(post, self.arch, self.symbols)
        cond = self._condition(condition, pre_h, post_h)

        return await self._add(location, spec, name, pre=pre_h, post=post_h, condition=cond, priority=priority, hw=hw)

    async def add_watch(
        self,
        spec: str,
        *,
        length: int | None = None,
        access: str = "w",
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
    ) -> Probe:
        """Add a data watchpoint probe on a data symbol or `0xADDR` (see `probed.engine.watch`)."""
        self._require_attached()
        location, length, access = self.watch.check(spec, length, access)
        pre_h = make_handler(pre, self.arch, self.symbols)
        post_h = make_handler(post, self.arch, self.symbols)
        cond = self._condition(condition, pre_h, post_h)

        return await self._add(
            location, spec, name, kind="watch", pre=pre_h, post=post_h, condition=cond, priority=priority,
            length=length, access=access,
        )

    async def _add(self, location: Location, spec: str, name: str | None, **fields: Any) -> Probe:
        """Create and install a probe while the guest is stopped."""

        async def apply() -> Probe:
            await self._check_readable(location.address)
            probe = Probe(
                id=self.table.new_id(),
                name=self._new_name(name, location.symbol and _short(location) or f"{location.address:#x}"),
                spec=spec,
                location=location,
                **fields,
            )
            if probe.kind == "watch":
                probe.last_value = await self.watch.current_value(probe)
            await self._install_probe(probe)
            return probe

        return await self.call_stopped(apply)

    async def remove_probe(self, ref: int | str) -> None:
        """Remove a probe; its hook point stays while other probes hang on it.

        Raises:
            NotFound: no such probe.
        """
        self.table.find(ref)

        async def apply() -> None:
            self.table.remove(self.table.find(ref))
            await self._reconcile()

        await self.call_stopped(apply)

    async def remove_all(self) -> int:
        """Remove every probe; returns how many there were."""

        async def apply() -> int:
            probes = list(self.table)
            for p in probes:
                self.table.remove(p)
            await self._reconcile()
            return len(probes)

        return await self.call_stopped(apply)

    async def enable_probe(self, ref: int | str) -> None:
        """Enable a probe (its breakpoint is installed again, and it takes a slot if it needs one)."""
        self.table.find(ref)

        async def apply() -> None:
            probe = self.table.find(ref)
            if probe.enabled:
                return
            point = self.table.points[probe.point_key]
            if (probe.kind == "watch" or probe.hw) and point.key not in self._installed:
                self._slot_of[point.key] = self.slots.allocate("probe", probe.name, _slot_use(probe))
            probe.enabled, probe.disabled_reason, probe.fault_run = True, None, 0
            if probe.kind == "watch":
                probe.last_value = await self.watch.current_value(probe)
            for key, exc in await self._reconcile():
                if key == point.key:
                    probe.enabled = False
                    self.slots.free(self._slot_of.pop(key, None))
                    raise exc

        await self.call_stopped(apply)

    async def disable_probe(self, ref: int | str) -> None:
        """Disable a probe: its breakpoint goes when no enabled probe shares it (and frees its slot)."""
        self.table.find(ref)

        async def apply() -> None:
            probe = self.table.find(ref)
            probe.enabled = False
            probe.disabled_reason = None
            await self._reconcile()

        await self.call_stopped(apply)

    async def resume(self) -> None:
        """Let a guest held by `stopped=True` run."""

        async def apply() -> None:
            self._hold = False

        await self.call_stopped(apply)

    async def hold(self) -> None:
        """Keep the guest stopped until `resume()`."""

        async def apply() -> None:
            self._hold = True

        await self.call_stopped(apply)

    async def set_bias(self, file: str, bias: int) -> list[Probe]:
        """Relocate a symbol file; its probes move with it. Returns the probes that moved."""

        async def apply() -> list[Probe]:
            self.symbols.set_bias(file, bias)
            moved = [p for p in self.table if p.location.file == file]
            for p in moved:
                self.table.remove(p)
                p.location = self.symbols.relocate(p.location)
                self.table.add(p)
            await self._reconcile()
            return moved

        return await self.call_stopped(apply)

    def probes(self) -> list[Probe]:
        return list(self.table)

    def find_probe(self, ref: int | str) -> Probe:
        return self.table.find(ref)

    def stats(self) -> dict[str, Any]:
        return {
            "stops": self.stops,
            "hits": self.hits,
            "simulated": self.simulated,
            "spurious_steps": self.spurious_steps,
            "records": self.records,
            "missed": sum(p.missed for p in self.table),
            "faults": sum(p.faults for p in self.table),
            "filtered": sum(p.filtered for p in self.table),
            "breakpoints": len(self._installed),
            "slots": self.slots.table(),
            "retransmits": self.client.retransmits if self.target else 0,
        }

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target_address,
            "arch": self.arch.name if self.arch else None,
            "state": self.state,
            "cpus": len(self.target.threads) if self.target else 0,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "probes": len(self.table),
            "hook_points": len(self.table.points),
            "symbol_files": [f.name for f in self.symbols.files()],
        }

    def hooks(self, glob: str = "*") -> list[dict[str, Any]]:
        """Probeable functions from the loaded symbols, with the handlers on each active point."""
        rows = []
        for sym in self.symbols.functions(glob):
            point = self.table.breakpoint_at(sym.address)
            rows.append(
                {"name": sym.name, "address": f"{sym.address:#x}", "size": sym.size,
                 "handlers": len(point.probes) if point else 0}
            )
        return rows

    def points(self, glob: str = "*") -> list[HookPoint]:
        return [p for p in self.table.points.values() if fnmatchcase(self.symbols.symbolize(p.address) or "", glob)]

    def _require_attached(self) -> None:
        if self.target is None or self.arch is None:
            raise TargetError("the engine is not attached to a target yet")
        if self._dead is not None:
            raise TargetError("the engine has stopped")


def _tid(thread: ThreadId | None) -> int:
    return thread.tid if thread is not None else 1


def _slot_use(probe: Probe) -> str:
    return f"{'watch' if probe.kind == 'watch' else 'hbreak'} {probe.spec}"


def _short(location: Location) -> str:
    return location.symbol if not location.offset else f"{location.symbol}+{location.offset:#x}"


def _join_errors(*errors: str | None) -> str | None:
    present = [e for e in errors if e]
    return "; ".join(present) if present else None


def _refused(key: tuple[str, int, int, str], exc: RSPError) -> ProbedError:
    kind, address, length, access = key
    if "not support" in str(exc):
        return Unsupported(f"the target does not support {kind} ({access}) points: {exc}")
    return TargetError(f"the target refused the {kind} at {address:#x}: {exc}")

