"""The engine: probes on a QEMU guest over one RSP connection, as a facade over its components.

    service      probed.engine.service      the loop that owns the connection; requests; hold; shutdown
    guest        probed.engine.state        who holds the guest (the state table)
    pipeline     probed.engine.hits         hit -> HitRecord (seq, time) -> handlers -> filter -> publish
    break_hits   probed.engine.breakhits    breakpoint stops: classify, step or simulate, complete
    watch        probed.engine.watch        watchpoint stops and watch requests
    breakpoints  probed.engine.breakpoints  the target's Z/z points made to match what is wanted; slots
    returns      probed.engine.returns      return probes: instances kept at entries, return breakpoints
    uprobes      probed.engine.uprobes      user-space probes: which processes map each probed file
    gdb          probed.gdbside.side        GDB's requests through the stub
    probe_changes probed.engine.probe_changes  adding, removing, enabling, relocating probes (the public API's)

`stats()`, `status()`, `hooks()` and `points()` are `probed.engine.reports`.

Components reach each other through this object's public attributes only. The public API (what the control
socket, the stub and the library use) is `probed.engine.api.EngineAPI` and `DebuggerAPI`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from probed.engine import reports
from probed.engine.breakhits import BreakHits
from probed.engine.breakpoints import Breakpoints
from probed.engine.hits import HitPipeline
from probed.engine.probe_changes import ProbeChanges
from probed.engine.probes import FAULT_LIMIT, HookPoint, Probe, ProbeTable
from probed.engine.returns import ReturnProbes
from probed.engine.service import Service
from probed.engine.slots import SlotAllocator
from probed.engine.state import Event, Guest, GuestState
from probed.engine.target import Target, attach_target
from probed.engine.uprobes import UserProbes
from probed.engine.watch import WatchHelper
from probed.errors import ProbedError, TargetError
from probed.gdbside.debugger import DebuggerLink
from probed.gdbside.side import GdbSide
from probed.guest.symbols import SymbolStore, parse_file_arg
from probed.lang.handlers import Handler
from probed.records.events import EventHub
from probed.sim.cpumode import CodeMode
from probed.sim.emulate import Emulator, NoEmulator
from rsp.connection import RSPClient
from rsp.errors import ConnectionClosed, TargetTimeout
from rsp.stop import StopReply, ThreadId

__all__ = ["Engine", "HANDLER_TIMEOUT"]

HANDLER_TIMEOUT = 5.0
"""Seconds a Python handler may run by default (see `probed.engine.hits`)."""

log = logging.getLogger(__name__)


class Engine:
    """Probes on a QEMU guest, driven over one RSP connection.

    Args:
        target: `tcp:HOST:PORT` or `unix:PATH` of QEMU's gdbstub.
        symbol_files: symbol files, each `PATH[@BIAS]`.
        stopped: leave the guest stopped after attaching until `resume()` (boot-time tracing).
        hw_slots: hardware debug-register slots (x86: 4).
        buffer: how many recent hit records the ring buffer keeps.
        fault_limit: consecutive handler faults after which a probe is disabled.
        timeout: seconds the target may take to answer a request; past it the connection counts as lost.
        handler_timeout: seconds a Python handler may run (a probe's own `timeout` wins); 0: no limit.
        reconnect: when the connection is lost (EOF, reset, no answer within `timeout`), keep the probes
            and connect again (backoff 0.1 s doubling to 1 s), re-arm them and resume the guest; False:
            `run` ends with TargetError.
        guest_memory: "auto" (guest RAM read directly when QEMU's memory is readable here) or "gdbstub".
        qemu_pid: QEMU's pid, when not found from the gdbstub connection.
        sysroot: a host directory holding copies of the guest's files (DIR/bin/prog for /bin/prog), where
            user probes find a file's ELF symbols when no `file_copy` is named.
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
        handler_timeout: float = HANDLER_TIMEOUT,
        reconnect: bool = True,
        guest_memory: str = "auto",
        qemu_pid: int | None = None,
        sysroot: str | os.PathLike | None = None,
    ):
        self.target_address = target
        self.handler_timeout = handler_timeout
        self.reconnect = reconnect
        self._memory_options = {"guest_memory": guest_memory, "qemu_pid": qemu_pid}
        self.sysroot = sysroot
        self.symbols = SymbolStore()
        for arg in symbol_files:
            path, bias = parse_file_arg(arg)
            self.symbols.add_file(path, bias=bias)
        self.table = ProbeTable()
        self.slots = SlotAllocator(hw_slots)
        self.fault_limit = fault_limit
        self.timeout = timeout
        self.target: Target | None = None
        self.emulator: Any = NoEmulator()
        self.code_mode: CodeMode | None = None
        self.guest = GuestState()
        self.stops = 0
        self.stop_seen_ns: int | None = None  # perf_counter_ns() of the latest stop reply (metrics' hit latency)
        self.simulated = 0  # instructions simulated instead of single-stepped (probes' and GDB's)
        self.spurious_steps = 0  # QEMU's single-steps that ran nothing, done again (SPURIOUS_RETRIES)
        self.current_thread: ThreadId | None = None
        self.debugger: DebuggerLink | None = None  # the GDB stub's session, when one is attached
        self.started = time.monotonic()  # for the status's uptime
        # The components (see the module's docstring).
        self.pipeline = HitPipeline(self)
        self.hub = EventHub(buffer, on_missed=self.pipeline.count_missed)
        self.service = Service(self, hold=stopped)
        self.breakpoints = Breakpoints(self, self.slots)
        self.returns = ReturnProbes(self)
        self.break_hits = BreakHits(self)
        self.watch = WatchHelper(self)
        self.gdb = GdbSide(self)
        # Guest-model hooks: each `await hook(engine)` runs once after attaching, the guest still stopped,
        # before the engine reports started (e.g. probed.guest.linux.kernel.LinuxKernel.setup).
        self.attach_hooks: list[Callable[[Engine], Awaitable[None]]] = []
        self.linux: Any = None  # probed.guest.linux.kernel.LinuxKernel, for a Linux guest
        self.reboot: Any = None  # probed.guest.linux.reboot.Reboots: the guest's reboots, followed
        self.uprobes = UserProbes(self)
        self.probe_changes = ProbeChanges(self)
        self._types: Any = None  # the kernel's BTF types, read the first time a fetch arg needs them

    # -- properties ---------------------------------------------------------------------------------

    @property
    def arch(self):
        return self.target.arch if self.target else None

    @property
    def client(self) -> RSPClient:
        return self.target.client

    @property
    def state(self) -> str:
        """running, stopped, detached or waiting for the target (`guest.state` says who holds it)."""
        return self.guest.summary

    @property
    def hits(self) -> int:
        return self.pipeline.hits

    @property
    def records(self) -> int:
        return self.pipeline.records

    # -- the service --------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Attach, report started, and run until cancelled; then clean up and detach.

        A lost connection is reconnected (`reconnect=True`, see `probed.engine.service`); the first attach
        must succeed.

        Raises:
            TargetError: the target cannot be reached, or went away (without `reconnect`).
        """
        service = self.service
        try:
            await self.attach()
            self.guest.move(Event.ATTACHED)
            log.info("attached to %s (%s, %d cpu)", self.target_address, self.arch.name, len(self.target.threads))
            for hook in self.attach_hooks:
                await hook(self)
            task_status.started()
            while True:
                try:
                    await service.loop()
                except (ConnectionClosed, TargetTimeout) as exc:
                    if not self.reconnect:
                        raise
                    await service.reconnect(exc)
        except (ConnectionClosed, TargetTimeout) as exc:
            service.dead = TargetError(f"the target went away: {exc}")
            raise service.dead from exc
        except BaseException as exc:
            service.dead = exc if isinstance(exc, ProbedError) else TargetError("the engine stopped")
            raise
        finally:
            service.fail_requests()
            if self.target is not None and self.guest.state is not Guest.WAITING:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(5):
                        await service.shutdown()
            if self.target is not None and self.target.memory is not None:
                self.target.memory.close()
            self.hub.close()
            self.guest.move(Event.DETACHED)

    async def attach(self) -> None:
        """Connect to the target and learn it (`probed.engine.target.attach_target`, which keeps the `Target`
        when reconnecting); then the emulator and the CPU-mode check for it.

        Raises:
            TargetError: nothing answers there, or it cannot be attached.
        """
        self.target = await attach_target(self.target_address, self.symbols, timeout=self.timeout,
                                          target=self.target, **self._memory_options)
        self.emulator = Emulator(self.arch, self.target.layout, self.symbols.image_ranges)
        self.code_mode = CodeMode(self.target)

    async def call_stopped(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` in the engine task while the guest is stopped; returns its result.

        Raises:
            TargetError: the engine is not attached or has stopped.
        """
        return await self.service.call_stopped(fn)

    # -- GDB's side (the stub's `DebuggerAPI`; see probed.gdbside.side) --------------------------------

    async def debugger_attach(self, link: DebuggerLink) -> StopReply:
        """Attach a debugger: the guest stops and stays stopped for it. Returns the stop to report.

        Raises:
            Unsupported: a debugger is attached already.
        """
        return await self.gdb.attach(link)

    async def debugger_detach(self, link: DebuggerLink) -> None:
        """Forget the debugger: its breakpoints and slots go, parked hits complete, the guest runs on."""
        await self.gdb.detach(link)

    async def debugger_request(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Forward packets to the target while the debugger holds it (in one write); the replies."""
        return await self.gdb.request(payloads)

    async def debugger_read_memory(self, address: int, length: int) -> bytes:
        """GDB's `m`: from what was read at this stop when it is there, else from the target."""
        return await self.gdb.read_memory(address, length)

    def debugger_insert(self, ztype: int, address: int, kind: int) -> None:
        """GDB's `Z` (takes effect when GDB next resumes). Raises SlotsExhausted."""
        self.gdb.insert(ztype, address, kind)

    def debugger_remove(self, ztype: int, address: int, kind: int) -> None:
        """GDB's `z`."""
        self.gdb.remove(ztype, address, kind)

    async def debugger_resume(self, action: str, thread: ThreadId | None = None) -> None:
        """GDB resumes the guest: `c` (continue) or `s` (step one instruction of `thread`)."""
        await self.gdb.resume(action, thread)

    async def debugger_interrupt(self, link: DebuggerLink) -> None:
        """GDB's Ctrl-C: stop the guest and give GDB the stop."""
        await self.gdb.interrupt(link)

    # -- public API (probe changes: probed.engine.probe_changes; reports: probed.engine.reports) -------

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
        internal: bool = False,
        file_copy: str | None = None,
        file_offset: int | None = None,
        retprobe: bool = False,
        maxactive: int = 0,
        timeout: float | None = None,
    ) -> Probe:
        """Add a breakpoint probe at `sym`, `sym+off`, `file:sym+off` or `0xADDR`; or a user probe at
        `/PATH:OFFSET` or `/PATH:SYMBOL[+OFF]` in a Linux guest (probed.engine.uprobes).

        On a Linux guest, `MOD:SYM+off` of a module that is not loaded makes a pending probe, set when the
        module loads (and taken out when it unloads).

        Args:
            pre: fetch args (list of `NAME=FETCHARG[:TYPE]`) or a callable `fn(ctx)`, run before the
                probed instruction (in a return probe: at the function's return, see `retprobe`).
            post: the same, run after it is single-stepped; `[]` steps without fetching, None skips the
                post phase.
            condition: a filter over the fetched names; a hit is reported only when it holds.
            hw: use a hardware breakpoint (takes a debug-register slot).
            internal: a guest model's own hook (not listed by `probes()`, publishes no records).
            file_copy: user probes: a host copy of the guest's file, for `PATH:SYMBOL`.
            file_offset: user probes by `PATH:SYMBOL`: the file offset the symbol resolved to when the probe
                was first added (a restarted daemon's state file); the probe goes there, and no host copy
                is needed (one that still agrees only names places).
            retprobe: a return probe (kretprobe) on the function at `spec`: `pre` runs at each return of
                that call, with `$retval`, registers at the return, `$argN` as they were at the entry,
                and `ctx.entry` (`probed.engine.returns.EntryContext`) for a callable.
            maxactive: a return probe's limit of calls in flight at once (0: kretprobe's default,
                max(10, 2 * CPUs); for a user function 4096, all processes together); entries past it
                are counted in `missed`.
            timeout: seconds a Python handler of this probe may run (None: the engine's `handler_timeout`;
                0: no limit); past it the hit is a fault and the guest goes on.

        Raises:
            UnknownSymbol, BadSpec, FetchSyntaxError, FilterSyntaxError, SlotsExhausted, TargetError.
        """
        return await self.probe_changes.add_probe(
            spec, name=name, pre=pre, post=post, condition=condition, priority=priority, hw=hw, internal=internal,
            file_copy=file_copy, file_offset=file_offset, retprobe=retprobe, maxactive=maxactive, timeout=timeout,
        )

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
        timeout: float | None = None,
    ) -> Probe:
        """Add a data watchpoint probe on a data symbol or `0xADDR` (see `probed.engine.watch`); `timeout` as
        in `add_probe`."""
        return await self.probe_changes.add_watch(
            spec, length=length, access=access, name=name, pre=pre, post=post, condition=condition,
            priority=priority, timeout=timeout,
        )

    def new_name(self, name: str | None, fallback: str) -> str:
        """A probe's name: `name` if free (else BadSpec), or `fallback` made unique."""
        return self.probe_changes.new_name(name, fallback)

    def make_condition(self, condition: str | None, pre: Handler | None, post: Handler | None):
        """The filter of a probe over its handlers' fields (None without a condition)."""
        return self.probe_changes.make_condition(condition, pre, post)

    @property
    def types(self) -> Any:
        """The kernel's types when they were read already (see `kernel_types`), else None."""
        return self._types

    async def kernel_types(self) -> Any:
        """The running kernel's types (see `_kernel_types`)."""
        return await self._kernel_types()

    async def _kernel_types(self) -> Any:
        """The running kernel's types (probed.guest.linux), read from the guest once, while it is stopped.

        Raises:
            NoKernelTypes (a LookupError): not a Linux kernel with BTF, or its symbols are not loaded.
        """
        if self._types is None:
            from probed.guest.linux.kernel_types import load_kernel_types

            self._types = await self.call_stopped(lambda: load_kernel_types(self.target.read_many, self.symbols))
        return self._types

    async def remove_probe(self, ref: int | str) -> None:
        """Remove a probe; its hook point stays while other probes hang on it.

        Raises:
            NotFound: no such probe.
        """
        await self.probe_changes.remove_probe(ref)

    async def remove_all(self) -> int:
        """Remove every probe; returns how many there were."""
        return await self.probe_changes.remove_all()

    async def enable_probe(self, ref: int | str) -> None:
        """Enable a probe (its breakpoint is installed again, and it takes a slot if it needs one)."""
        await self.probe_changes.enable_probe(ref)

    async def disable_probe(self, ref: int | str) -> None:
        """Disable a probe: its breakpoint goes when no enabled probe shares it (and frees its slot)."""
        await self.probe_changes.disable_probe(ref)

    async def resume(self) -> None:
        """Let a guest held by `stopped=True` run."""

        async def apply() -> None:
            self.service.hold = False

        await self.call_stopped(apply)

    async def hold(self) -> None:
        """Keep the guest stopped until `resume()`."""

        async def apply() -> None:
            self.service.hold = True

        await self.call_stopped(apply)

    async def set_bias(self, file: str, bias: int) -> list[Probe]:
        """Relocate a symbol file; its probes move with it. Returns the probes that moved."""
        return await self.probe_changes.set_bias(file, bias)

    async def reconcile_now(self) -> None:
        """Install and remove breakpoints to match the probe table now, from inside a handler (the guest is
        stopped): a guest model that set probes at a hit (a module's, as it loads) has them before the guest
        runs on."""
        self.breakpoints.dirty = False
        await self.breakpoints.reconcile()

    def probes(self) -> list[Probe]:
        """The users' probes, by id (not the guest model's internal hooks)."""
        return [p for p in self.table if not p.internal]

    def find_probe(self, ref: int | str) -> Probe:
        """A probe by id or name. Raises NotFound."""
        return self.table.find(ref)

    def stats(self) -> dict[str, Any]:
        """Counters for `probectl stats`."""
        return reports.stats(self)

    def status(self) -> dict[str, Any]:
        """What `probectl status` shows."""
        return reports.status(self)

    def hooks(self, glob: str = "*") -> list[dict[str, Any]]:
        """Probeable functions from the loaded symbols, with the handlers on each active point."""
        return reports.hooks(self, glob)

    def points(self, glob: str = "*") -> list[HookPoint]:
        """The hook points whose symbol matches `glob`."""
        return reports.points(self, glob)
