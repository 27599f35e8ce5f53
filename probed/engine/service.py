"""The service loop: the one task that owns the QEMU connection and runs stop -> classify -> handle -> resume.

Rules it keeps:
- All-stop. While the guest is stopped for a hit nothing else runs it. Changes (adding, removing, enabling
  probes, GDB's requests) are requests run by this task while the guest is stopped: a running guest is
  interrupted, every pending request is applied, and the guest resumes.
- The guest is always resumed after a hit, whatever a handler did; handler errors go into the hit record.
- An interrupt (0x03) sent during a single-step would pause the guest before the step completes (QEMU), so
  interrupts are sent only while the guest runs freely after `c`.

Who holds the guest at each point is `probed.engine.state`; this loop moves it through RESUMED/STOPPED/HOLD.

Reconnecting (`reconnect`): when the connection drops (EOF, reset) or the target does not answer a request
within the engine's `timeout`, the loop ends with `ConnectionClosed` or `TargetTimeout`; the engine then
calls `reconnect`: the guest state goes to WAITING, hits still open are published with an error, queued
requests fail, and connecting is tried again with a capped backoff (`RECONNECT_DELAYS`). A new connection
is attached like the first (`?` makes QEMU drop every breakpoint it held), nothing is taken as installed,
and the loop starts again: its first `reconcile` re-arms every enabled probe (and GDB's points), then it
resumes the guest. Probes, their counters (so `seq`) and GDB's session are kept.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from probed.engine.breakhits import SIGTRAP
from probed.engine.state import Event, Guest
from probed.errors import TargetError
from probed.sim.emulate import NoEmulator
from rsp.errors import ConnectionClosed, RSPError, TargetTimeout
from rsp.packets import cont, detach
from rsp.stop import Exited, StopEvent, StopReply, Terminated

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = ["RECONNECT_DELAYS", "Service"]

RECONNECT_DELAYS = (0.1, 1.0)
"""The first wait between connection attempts, and the most it doubles up to (seconds)."""

log = logging.getLogger("probed.engine.engine")


class _Request:
    """Work to run in the engine task while the guest is stopped."""

    def __init__(self, fn: Callable[[], Awaitable[Any]]):
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Service:
    """The loop, its queue of requests, and the hold (`--stopped`, `hold()`)."""

    def __init__(self, engine: Engine, *, hold: bool = False):
        self.engine = engine
        self.hold = hold
        self.requests: deque[_Request] = deque()
        self._parked: trio.CancelScope | None = None  # the loop waits, the guest held (see `_wait_for_wake`)
        self._inline = False  # work runs in a caller's task (`_run_inline`)
        self._inline_done: trio.Event | None = None  # set when it ends, for a loop that waits for that
        self._resumed_inline = False  # that work let the guest run: the loop waits for its stop
        self.free_running = False  # a `c` went and no stop came back yet: an interrupt may be sent
        self.gdb_changes = False  # GDB's breakpoint changes wait for the next `c`, in one write with it
        self.dead: BaseException | None = None
        self.reconnects = 0  # connections made again after one was lost
        self.lost_reason: str | None = None  # why the connection was lost, while WAITING
        # After a hit, the next stop may be polled for this long, when that pays on this host (see
        # RSPClient.poll_next); never on one core, where the poll always takes the guest's core.
        self.poll_seconds = 0.001 if len(os.sched_getaffinity(0)) > 1 else 0.0

    # -- the loop -------------------------------------------------------------------------------------

    async def loop(self) -> None:
        engine = self.engine
        client = engine.client
        # One scope bounds every stop's exchanges (its deadline set per stop, cheaper than a scope each).
        with trio.CancelScope() as bound:
            await self._loop(bound)
        client.timed_out(engine.timeout)  # (only a stop's deadline ends the loop here)

    async def _loop(self, bound: trio.CancelScope) -> None:
        engine = self.engine
        client = engine.client
        client.poller.window = self.poll_seconds
        guest = engine.guest
        running = False
        while True:
            if not running:
                await self.serve_requests()
                debugger = engine.debugger
                if debugger is not None and debugger.interrupt_requested:
                    # The debugger asked for a stop while we were busy with a hit: this stop is its.
                    await engine.gdb.deliver(StopReply(2, debugger.current_thread))
                if self.holding():
                    if self.hold:
                        guest.move(Event.HOLD)
                    running = await self._wait_for_wake()
                    continue
                await self._resume()
            else:
                self.free_running = True
            try:
                event = await self._wait_stop()
            finally:
                self.free_running = False
            guest.move(Event.STOPPED)
            client.begin_bound(bound, engine.timeout)
            try:
                running = await self.on_stop(event)
            finally:
                client.end_bound(bound)
            if running:
                # Hits come in bursts: the next stop is likely within a millisecond.
                client.poll_next()

    async def _resume(self) -> None:
        """Let the guest run (GDB's breakpoint changes go in the same write as the `c`)."""
        engine = self.engine
        engine.guest.move(Event.RESUMED)
        self.free_running = True
        if self.gdb_changes:
            self.gdb_changes = False
            for key, exc in await engine.breakpoints.reconcile(resume=cont()):
                log.error("GDB's %s at %#x could not be set on the target: %s", key[0], key[1], exc)
            if self.must_stop():
                await engine.client.interrupt()
        else:
            await engine.client.resume(cont())

    async def _wait_stop(self) -> StopEvent:
        """The next stop; while a rebooted guest's new kernel is awaited, the guest is stopped every
        `poll_seconds` to look for it (`serve_requests` does, at that stop)."""
        client = self.engine.client
        reboot = self.engine.reboot
        if reboot is None or not reboot.waiting:
            return await client.wait_stop()
        try:
            return await client.wait_stop(timeout=reboot.poll_seconds)
        except TargetTimeout:
            await client.interrupt()
            return await client.wait_stop()

    async def on_stop(self, event: StopEvent) -> bool:
        """Handle one stop; returns True when the guest was already resumed."""
        engine = self.engine
        if isinstance(event, Exited | Terminated):
            raise ConnectionClosed(f"the guest is gone ({event})")
        self.check_deferred()
        if not isinstance(event, StopReply):
            return False
        engine.stops += 1
        engine.stop_seen_ns = time.perf_counter_ns()  # for the metrics' hit latency
        if event.thread is not None:
            engine.current_thread = event.thread
        debugger = engine.debugger
        if debugger is not None:
            debugger.forget_registers()
        if event.signal != SIGTRAP:
            if debugger is not None and (debugger.interrupt_requested or debugger.running):
                await engine.gdb.deliver(event)  # GDB's Ctrl-C, or a signal it should see
            return False  # our interrupt (T02): pending requests run next
        if event.is_watch:
            resumed = await engine.watch.on_watch_stop(event)
            if debugger is not None and debugger.wants_watch(event):
                await engine.gdb.deliver(event)
            return resumed
        return await engine.break_hits.on_stop(event)

    def check_deferred(self) -> None:
        """Simulated instructions are written behind; if the target refused one, stop simulating."""
        client = self.engine.client
        if client.deferred_errors:
            bad, client.deferred_errors = client.deferred_errors, []
            log.error("simulating an instruction failed: %r; single-stepping from now on", bad)
            self.engine.emulator = NoEmulator()

    def must_stop(self) -> bool:
        """Whether someone waits for the guest to stop (requests, a hold, GDB's Ctrl-C)."""
        debugger = self.engine.debugger
        return bool(self.requests) or self.holding() or (debugger is not None and debugger.interrupt_requested)

    def holding(self) -> bool:
        debugger = self.engine.debugger
        return self.hold or (debugger is not None and debugger.holding)

    async def resume_fast(self, packets: list[bytes], *, defer: bool = False) -> list[bytes]:
        """Send `packets` and `c` in one write; the guest runs freely after it.

        With `defer`, their (`OK`) replies are checked when the next stop is read, not waited for now.
        """
        self.engine.guest.move(Event.RESUMED)
        self.free_running = True
        replies = await self.engine.client.pipeline(packets, resume=cont(), defer=defer)
        if self.must_stop() or self.engine.breakpoints.dirty:
            # Asked for while we were writing: the asker could not interrupt yet.
            await self.engine.client.interrupt()
        return replies

    # -- requests -------------------------------------------------------------------------------------

    async def _wait_for_wake(self) -> bool:
        """Wait while the guest is held and nothing is asked; a target that hangs up meanwhile is lost
        at once (nobody would read the connection otherwise until the hold ends).

        While parked here, `call_stopped` runs its work in the caller's task (see `_run_inline`): the
        hangup watch lets go of the socket for it, and this waits until it is done. Returns True when
        that work let the guest run (it is running now: its stop is to be waited for).
        """
        while True:
            if self._inline:
                if self._inline_done is None:
                    self._inline_done = trio.Event()
                await self._inline_done.wait()
                continue
            if self._resumed_inline:
                self._resumed_inline = False
                return True
            if not (self.holding() and not self.requests):
                return False
            gone = None
            with trio.CancelScope() as scope:
                self._parked = scope
                try:
                    gone = await self._watch_hangup()
                finally:
                    self.engine.client.wake_on_data = False
            if self._parked is scope:
                self._parked = None
            if gone is not None:
                raise ConnectionClosed(gone)

    async def _watch_hangup(self) -> str | None:
        """Why the target hung up (when it does while parked); returns None when woken instead."""
        return await self.engine.client.wait_hangup()

    async def serve_requests(self) -> None:
        breakpoints = self.engine.breakpoints
        reboot = self.engine.reboot
        if reboot is not None and reboot.waiting:
            await reboot.poll()
        if breakpoints.dirty:
            breakpoints.dirty = False
            await breakpoints.reconcile()
        while self.requests:
            req = self.requests.popleft()
            try:
                req.result = await req.fn()
            except Exception as exc:
                req.error = exc
            finally:
                req.done.set()
        if breakpoints.dirty:
            breakpoints.dirty = False
            await breakpoints.reconcile()

    def fail_requests(self, reason: str = "the engine is not running") -> None:
        while self.requests:
            req = self.requests.popleft()
            req.error = TargetError(reason)
            req.done.set()

    # -- losing the target and getting it back --------------------------------------------------------

    async def reconnect(self, exc: BaseException) -> None:
        """The connection is lost (`exc` says how): keep the probes, wait for the target, attach again.

        Returns when attached again; the caller runs `loop` again, which re-arms every probe and resumes.
        """
        engine = self.engine
        reason = _why(exc)
        self.lost_reason = reason
        if engine.guest.state is not Guest.WAITING:
            engine.guest.move(Event.LOST)
        log.warning("lost the target %s (%s): probes kept, waiting for it", engine.target_address, reason)
        self.free_running = False
        engine.pipeline.abandon_open(f"the connection to the target was lost during this hit ({reason})")
        engine.break_hits.unfinished = None
        debugger = engine.debugger
        if debugger is not None:
            debugger.parked.clear()  # published just above, with the error
            debugger.forget_registers()
            debugger.memory.clear()
        self.fail_requests(f"the target is not connected ({reason}); probed is waiting for it to come back")
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await engine.client.aclose()
        delay, most = RECONNECT_DELAYS
        attempts = 0
        while True:
            attempts += 1
            try:
                await engine.attach()
                engine.breakpoints.installed.clear()  # `?` made QEMU drop them all: none is installed now
                if engine.reboot is not None:
                    await engine.reboot.after_reconnect()  # another boot behind it: the probes wait for it
            except (RSPError, TargetError) as err:
                if engine.target is not None and engine.target.client is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await engine.client.aclose()
                if attempts == 1:
                    log.info("target %s not back yet: %s (trying again every %g s at most)",
                             engine.target_address, err, most)
                await trio.sleep(delay)
                delay = min(delay * 2, most)
                continue
            break
        engine.breakpoints.dirty = True  # the loop's first `reconcile` re-arms every wanted point
        self.gdb_changes = False
        self.reconnects += 1
        self.lost_reason = None
        engine.guest.move(Event.RECONNECTED)
        if engine.debugger is not None and engine.debugger.holding:
            engine.guest.move(Event.TO_GDB)  # GDB held the guest: it still does
        log.info("target %s back after %d attempt(s): re-arming %d hook point(s)",
                 engine.target_address, attempts, len(engine.table.points))

    async def call_stopped(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` in the engine task while the guest is stopped; returns its result.

        Raises:
            TargetError: the engine is not attached or has stopped.
        """
        if self.engine.target is None or self.dead is not None:
            raise TargetError("the engine is not attached to a target")
        if self.engine.guest.state is Guest.WAITING:
            raise TargetError(f"the target is not connected ({self.lost_reason}); probed is waiting for it to come back")
        if self._parked is not None and not self._inline and not self.requests and not self._resumed_inline:
            return await self._run_inline(fn)  # (parked with the guest held, not watching for a stop)
        req = _Request(fn)
        self.requests.append(req)
        await self.wakeup()
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    async def _run_inline(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` in the caller's task while the loop is parked with the guest held (GDB's packets,
        mostly): two task switches less per request, the better part of a GDB exchange's time here.

        The loop's hangup watch goes on unless `fn` reads from the target: the client then calls
        `_unpark` first (cancelling the watch frees the socket at once), and the loop waits for `fn` to
        end before it looks at anything. Like work run by the loop, `fn` is not cut short by its caller's
        cancellation: an exchange with the target is never left half done. When `fn` lets the guest run
        (GDB's continue), a live watch stays: it ends on the stop's first byte, and the loop then reads the
        stop (meanwhile nothing more runs inline: the guest is not held).
        """
        self._inline = True
        client = self.engine.client
        client.claim = self._unpark
        try:
            with trio.CancelScope(shield=True):
                result = await fn()
                debugger = self.engine.debugger
                if not (self.holding() or self.requests or self.engine.breakpoints.dirty
                        or (debugger is not None and debugger.interrupt_requested)):
                    # GDB resumed the guest: the `c` goes now, not after a task switch to the loop (which
                    # waits for the stop next, or learns there that the connection failed).
                    self._resumed_inline = True
                    if self._parked is not None and client.watching:
                        # The parked watch wakes on the stop's first byte: no cancelling it now, and no
                        # taking the socket out of epoll and putting it back for the stop.
                        client.wake_on_data = True
                    else:
                        self._unpark()
                    await self._resume()
                return result
        finally:
            client.claim = None
            self._inline = False
            if self._inline_done is not None:
                done, self._inline_done = self._inline_done, None
                done.set()

    def _unpark(self) -> None:
        """Wake the parked loop (its hangup watch lets go of the socket now, before this returns)."""
        if self._parked is not None:
            parked, self._parked = self._parked, None
            parked.cancel()

    async def wakeup(self) -> None:
        self._unpark()
        if self.free_running:
            await self.engine.client.interrupt()

    async def shutdown(self) -> None:
        """Remove every breakpoint and detach (QEMU then resumes the guest)."""
        engine = self.engine
        if engine.target is None:
            return
        client = engine.client
        try:
            if client.running:
                await client.halt(timeout=2)
            packets = engine.breakpoints.removal_packets()
            if packets:
                await client.pipeline(packets, timeout=2)
            # `D` also makes QEMU drop every breakpoint and resume the guest.
            await client.request(detach(), timeout=2)
        except (Exception, trio.TooSlowError) as exc:
            log.warning("could not detach cleanly: %s", exc)
        finally:
            with trio.move_on_after(1):
                await client.aclose()


def _why(exc: BaseException) -> str:
    if isinstance(exc, TargetTimeout):
        return f"it did not answer: {exc}"
    return str(exc) or type(exc).__name__
