"""Return probes (kretprobes): a probe's handler at its function's return, with what was kept at the entry.

    entry stop (the probe's breakpoint on the function)      return stop (the breakpoint at the return address)
      -> read the return address (x86: the word at sp;        -> the instances this return ends (the stack
         aarch64 x30, riscv64 ra) and `$argN`, in one batch       pointer says which, see `ReturnProbes.end`)
      -> keep an instance (`EntryContext`)                     -> one "return" record per instance, through
      -> arm the return address's breakpoint                     the same pipeline as every other hit

An instance is keyed by its task and its entry stack pointer. probed does not know the guest's tasks, so a
task is its stack: kernel stacks are THREAD_SIZE-aligned (16 KiB on x86_64 Linux), so `(cpu, sp >> 14)`
names one task's stack on one CPU. A return at sp matches the instance whose entry sp is the greatest one
at or below it (x86: sp - word after `ret` popped the return address, or less after `ret N`; aarch64 and
riscv64: sp itself), with that return address; so recursion, several CPUs and several tasks interleave
correctly. A task that moved to another CPU while in the function is matched by the exact entry sp.

Instances whose frame was unwound without a return (longjmp, an exception, a task that exited and whose
stack was reused) are reaped: any stop of ours on the same CPU and stack with a stack pointer above an
instance's entry sp means that frame is gone (`reaped` counts them).

One breakpoint per return address serves every instance (and GDB's breakpoint or a probe's at the same
place: `Breakpoints.wanted` is a set). A return address stays armed while a probe that used it is enabled,
so a function called in a loop costs no `Z`/`z` per call; at most `IDLE_RETURN_POINTS` addresses without a
live instance are kept. `maxactive` bounds a probe's live instances; an entry past it is counted in the
probe's `missed` (kretprobe semantics) and gets no return record.

Return probes on user functions (`probed.engine.uprobes`): an instance is keyed by its address space
(CR3's page-table root), its task (the kernel's `current`, read at the stop) and its entry sp, so a return
address (a user address: every process running there stops) ends only the calls of the task that made
them; a stop there in any other process or task is stepped past silently (`BreakHits`). A user return
address stays armed while an address space that called through it lives, and goes with the last one:
when a process exits or execs, its mappings of the probed files go (the `uprobe_munmap` hook), and
`forget_space` drops its instances and the return addresses only it used.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from probed.engine.hits import Hit, cpu_of
from probed.engine.probes import Probe
from probed.errors import BadSpec
from probed.lang.compat import CompatProgram, compat_arch, is_compat
from probed.lang.context import HitContext, RegisterView
from probed.lang.program import FetchProgram
from probed.lang.tree import Arg, FetchField, FieldType, Reg, StackEntry
from rsp.stop import ThreadId

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = [
    "EntryContext",
    "IDLE_RETURN_POINTS",
    "MAXACTIVE_MAX",
    "STACK_REGION_BITS",
    "ReturnProbes",
    "UserTask",
    "checked_maxactive",
    "default_maxactive",
]

log = logging.getLogger("probed.engine.engine")

STACK_REGION_BITS = 14
"""A task is its stack: `sp >> 14` (16 KiB, x86_64 Linux's THREAD_SIZE) names one stack on one CPU."""

IDLE_RETURN_POINTS = 64
"""Return addresses kept armed with no live instance (a loop's calls then cost no `Z`/`z` each)."""


UserTask = tuple[str, int, int]
"""A user-space task as return probes key it: ("user", page-table root, task_struct address)."""


MAXACTIVE_MAX = 4096
"""The largest `maxactive` (as kretprobes' KRETPROBE_MAXACTIVE_MAX)."""


def default_maxactive(cpus: int) -> int:
    """kretprobe's default when maxactive is 0: max(10, 2 * CPUs)."""
    return max(10, 2 * cpus)


def checked_maxactive(spec: str, *, retprobe: bool, offset: int, post: Any, maxactive: int, default: int) -> int:
    """A probe's `maxactive` (`default` for a return probe's 0), once its return-probe options are checked:
    a return probe goes on a function's entry, has no post-handler and at most `MAXACTIVE_MAX`; another
    probe has no `maxactive`. Kernel and user probes alike.

    Raises:
        BadSpec: what is wrong, with the spec.
    """
    if not retprobe:
        if maxactive:
            raise BadSpec(spec, "maxactive is for return probes (retprobe=True, probectl add -r)")
        return maxactive
    if offset:
        raise BadSpec(spec, "a return probe goes on a function's entry, without an offset")
    if post is not None:
        raise BadSpec(spec, "a return probe has no post-handler: its handler runs at the return")
    if not 0 <= maxactive <= MAXACTIVE_MAX:
        raise BadSpec(spec, f"maxactive must be 0..{MAXACTIVE_MAX}, not {maxactive}")
    return maxactive or default


@dataclass(eq=False)
class EntryContext:
    """What a return probe kept at its function's entry; its handler sees it as `ctx.entry` at the return.

    Attributes:
        probe: the return probe.
        cpu: the CPU of the entry (the return may be on another, if the task moved).
        sp: the stack pointer at the entry.
        return_address: where the function returns to.
        args: `$argN` at the entry, by N (an int, or an `Unfetched` message).
        seq: the entry record's `seq` when an entry probe on the same function recorded this call, else None.
        time_ns: monotonic time when the daemon saw the entry.
        g: the registers at the entry (`regs` decodes them).
        pc: where the function was entered (for a user function: its address in that process).
        space: a user function's address space (the page-table root), else None.
    """

    probe: Probe
    cpu: int
    sp: int
    return_address: int
    args: dict[int, Any]
    seq: int | None
    time_ns: int
    g: bytes = field(repr=False)
    target: Any = field(repr=False, default=None)
    pc: int | None = None
    space: int | None = None

    @property
    def regs(self) -> RegisterView:
        """The registers at the entry, by name."""
        return RegisterView(self.target, self.g)


class _EntryReads(HitContext):
    """The entry's hit context, serving reads already made with the registers (`ReturnProbes.prefetch`)."""

    def __init__(self, target: Any, cpu: int, g: bytes, prefetched: dict[tuple[int, int], bytes | Exception]):
        super().__init__(target, cpu, "entry", g)
        self._prefetched = prefetched

    async def read_many(self, requests):
        missing = [r for r in requests if r not in self._prefetched]
        got = dict(zip(missing, await super().read_many(missing), strict=True)) if missing else {}
        return [self._prefetched[r] if r in self._prefetched else got[r] for r in requests]


class ReturnProbes:
    """Live instances of return probes, the return addresses armed for them, and their stops."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # (cpu, stack region) -> entry sp -> the instances that entered there.
        self.live: dict[tuple[int, int], dict[int, list[EntryContext]]] = {}
        self.active: dict[int, int] = {}  # probe id -> live instances
        self.addresses: OrderedDict[int, set[int]] = OrderedDict()  # return address -> probe ids using it
        self.reaped = 0  # instances whose frame went without a return
        self._programs: dict[tuple[int, bool], FetchProgram] = {}  # (probe id, compat) -> its entry's reads
        self.entry_sp: dict[int, int] = {}  # function -> sp at its last entry (`prefetch`)
        # User return addresses -> the address spaces (page-table roots) whose calls armed them.
        self.user_spaces: dict[int, set[int]] = {}
        self.silent = 0  # stops at a user return address that ended no call (another process or task)

    # -- what is armed -------------------------------------------------------------------------------------

    def keys(self) -> set[tuple[str, int, int, str]]:
        """The breakpoints return probes want (`Breakpoints.wanted` adds them)."""
        return {("break", address, 0, "x") for address in self.addresses}

    def armed(self, pc: int) -> bool:
        """Whether a return breakpoint is at `pc`: a stop there is ours, never GDB's alone."""
        return pc in self.addresses

    def instances(self) -> int:
        return sum(self.active.values())

    def forget(self, probe: Probe) -> None:
        """Drop a probe's instances and the return addresses only it used (removed or disabled)."""
        for group in self.live.values():
            for sp in list(group):
                group[sp] = [e for e in group[sp] if e.probe is not probe]
                if not group[sp]:
                    del group[sp]
        self.active.pop(probe.id, None)
        self._programs.pop((probe.id, False), None)
        self._programs.pop((probe.id, True), None)
        self.entry_sp.pop(probe.address, None)
        for address in list(self.addresses):
            users = self.addresses[address]
            users.discard(probe.id)
            if not users:
                del self.addresses[address]
                self.user_spaces.pop(address, None)

    def is_user(self, pc: int) -> bool:
        """Whether `pc` is a user function's return address (armed for some process's call)."""
        return pc in self.user_spaces

    def forget_space(self, space: int) -> bool:
        """An address space went away (its process exited or exec'd): drop its calls in flight and the
        user return addresses only it used. True when a breakpoint must go (`Breakpoints.reconcile`)."""
        for task in [t for t in self.live if t[0] == "user" and t[1] == space]:
            for entries in self.live.pop(task).values():
                for entry in entries:
                    self._drop(entry)
                    self.reaped += 1
        changed = False
        for address in [a for a, spaces in self.user_spaces.items() if space in spaces]:
            spaces = self.user_spaces[address]
            spaces.discard(space)
            if not spaces:
                del self.user_spaces[address]
                self.addresses.pop(address, None)
                changed = True
        return changed

    def task_of(self, cpu: int, sp: int) -> tuple[int, int]:
        """The task a stop belongs to, as `(cpu, stack region)` (see the module's docstring)."""
        return (cpu, sp >> STACK_REGION_BITS)

    # -- the entry -----------------------------------------------------------------------------------------

    def _program(self, probe: Probe, compat: bool = False) -> FetchProgram:
        """What an entry reads for `probe`: the return address and the `$argN` its handler uses (`compat`:
        in a 32-bit process, by the i386 user ABI: a 4-byte return address, every argument on the stack)."""
        program = self._programs.get((probe.id, compat))
        if program is None:
            arch = compat_arch(self.engine.arch) if compat else self.engine.arch
            word = FieldType("u", arch.word_size, None)
            if arch.return_address_on_stack:
                ret: Any = StackEntry(0)
            else:
                ret = Reg(arch.resolve_register("x30" if arch.name == "aarch64" else "ra"))
            fields = [FetchField("ret", ret, word, "return address")]
            used = getattr(probe.pre, "program", None)
            for n in used.entry_args if used is not None else ():
                fields.append(FetchField(f"arg{n}", Arg(n), word, f"$arg{n}"))
            program = (CompatProgram if compat else FetchProgram)(tuple(fields), arch)
            self._programs[(probe.id, compat)] = program
        return program

    def prefetch(self, pc: int) -> tuple[int, int] | None:
        """A read to send with the registers of a stop expected at `pc`: the return address where it was
        at the last entry there (a function is usually entered at the same stack depth again)."""
        sp = self.entry_sp.get(pc)
        if sp is None or not self.engine.arch.return_address_on_stack:
            return None
        return (sp, self.engine.arch.word_size)

    async def on_entry(
        self,
        thread: ThreadId | None,
        pc: int,
        g: bytes,
        probes: list[Probe],
        seq: int | None,
        prefetched: dict[tuple[int, int], bytes | Exception] | None = None,
    ) -> bool:
        """Keep an instance per return probe entered at this stop; True when a return breakpoint must be
        installed before the guest goes on (`Breakpoints.reconcile`). `prefetched`: reads already made
        with the registers (see `prefetch`). User functions' probes (kind "user") key their instances by
        address space and task (`UserProbes.task_key`)."""
        engine = self.engine
        target = engine.target
        cpu = cpu_of(thread)
        sp = target.layout.value(g, engine.arch.sp)
        if len(self.entry_sp) > 4096:
            self.entry_sp.clear()
        self.entry_sp[pc] = sp
        user = probes[0].kind == "user"
        task: Any = await engine.uprobes.task_key(g) if user else self.task_of(cpu, sp)
        space = task[1] if user else None
        self._reap(task, sp)
        ctx = _EntryReads(target, cpu, g, prefetched or {})
        compat = user and engine.arch.name == "x86_64" and is_compat(ctx.regs)  # a 32-bit process
        now = time.monotonic_ns()
        install = False
        for probe in probes:
            if self.active.get(probe.id, 0) >= probe.maxactive:
                probe.missed += 1
                continue
            values = await self._program(probe, compat).evaluate(ctx)
            ret = values.pop("ret")
            if not isinstance(ret, int):
                probe.missed += 1
                log.warning("return probe %s: cannot read the return address at entry: %s", probe.name, ret)
                continue
            args = {int(name[3:]): value for name, value in values.items()}
            entry = EntryContext(probe, cpu, sp, ret, args, seq, now, g, target, pc, space)
            self.live.setdefault(task, {}).setdefault(sp, []).append(entry)
            self.active[probe.id] = self.active.get(probe.id, 0) + 1
            users = self.addresses.get(ret)
            if users is None:
                users = self.addresses[ret] = set()
                install = ("break", ret, 0, "x") not in engine.breakpoints.installed
            else:
                self.addresses.move_to_end(ret)
            users.add(probe.id)
            if user:
                self.user_spaces.setdefault(ret, set()).add(space)
        self._trim()
        return install

    # -- the return ----------------------------------------------------------------------------------------

    def end(self, cpu: int, pc: int, sp: int, task: Any = None) -> list[EntryContext]:
        """The instances a return to `pc` with stack pointer `sp` ends (taken out of the live set); `task`:
        a user task's key (`UserTask`), else the kernel's (cpu, stack region) is taken."""
        arch = self.engine.arch
        user = task is not None
        if task is None:
            task = self.task_of(cpu, sp)
        group = self.live.get(task, {})
        # x86: `ret` popped the return address, so the entry sp is below sp; elsewhere it is sp itself.
        below = [e for e in group if (e < sp if arch.return_address_on_stack else e <= sp)]
        ended: list[EntryContext] = []
        for entry_sp in sorted(below, reverse=True):
            ended = [e for e in group[entry_sp] if e.return_address == pc]
            if ended:
                rest = [e for e in group[entry_sp] if e.return_address != pc]
                if rest:
                    group[entry_sp] = rest
                else:
                    del group[entry_sp]
                break
        if not ended and not user:
            ended = self._migrated(task, pc, sp - arch.word_size if arch.return_address_on_stack else sp)
        for entry in ended:
            self._drop(entry)
        self._reap(task, sp)
        return ended

    def _migrated(self, task: tuple[int, int], pc: int, entry_sp: int) -> list[EntryContext]:
        """An instance of a task that moved to another CPU while in the function (matched by its exact sp)."""
        for other, group in self.live.items():
            if other != task and other[1] == task[1] and entry_sp in group:
                ended = [e for e in group[entry_sp] if e.return_address == pc]
                if ended:
                    group[entry_sp] = [e for e in group[entry_sp] if e.return_address != pc]
                    if not group[entry_sp]:
                        del group[entry_sp]
                    return ended
        return []

    async def ended_at(self, thread: ThreadId | None, pc: int, g: bytes) -> list[EntryContext]:
        """The instances a stop at the armed return address `pc` ends (taken out of the live set). At a
        user return address only the calls of the address space and task that stopped there end; any
        other process or task there ends none, cheaply (no memory read when its address space has no call
        in flight to `pc`)."""
        engine = self.engine
        sp = engine.target.layout.value(g, engine.arch.sp)
        if not self.is_user(pc):
            return self.end(cpu_of(thread), pc, sp)
        space = await engine.uprobes.space_of(g)
        if space not in self.user_spaces.get(pc, ()) or not any(
            t[0] == "user" and t[1] == space for t in self.live
        ):
            return []
        return self.end(cpu_of(thread), pc, sp, await engine.uprobes.task_key(g))

    async def on_return(
        self, thread: ThreadId | None, pc: int, g: bytes, ended: list[EntryContext] | None = None
    ) -> Hit:
        """The hit of a stop at an armed return address: one "return" record per instance it ends (none
        for a stray return to the same place, e.g. a call that entered before the probe was added).
        `ended`: what `ended_at` found already at this stop."""
        engine = self.engine
        if ended is None:
            ended = await self.ended_at(thread, pc, g)
        ended = [e for e in ended if e.probe.enabled]
        now = time.monotonic_ns()
        extra = [
            {"func": f"{e.pc if e.space is not None else e.probe.address:#x}", "duration_ns": now - e.time_ns,
             "entry_seq": e.seq}
            for e in ended
        ]
        hit = await engine.pipeline.begin(
            "return", thread, pc, g, [e.probe for e in ended], extra=extra, entries=ended
        )
        for entry, record in zip(ended, hit.records, strict=True):
            if entry.space is not None:  # a user return site: its place in a probed file, else none
                record.where = engine.uprobes.place_of(entry.space, pc)
        return hit

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def _drop(self, entry: EntryContext) -> None:
        count = self.active.get(entry.probe.id, 0) - 1
        if count > 0:
            self.active[entry.probe.id] = count
        else:
            self.active.pop(entry.probe.id, None)

    def _reap(self, task: tuple[int, int], sp: int) -> None:
        """Instances of this task whose entry sp is below `sp`: their frames are gone without a return."""
        group = self.live.get(task)
        if not group:
            return
        for entry_sp in [e for e in group if e < sp]:
            for entry in group.pop(entry_sp):
                self._drop(entry)
                self.reaped += 1
                log.debug("return probe %s: frame at sp %#x went without a return", entry.probe.name, entry_sp)
        if not group:
            del self.live[task]

    def _trim(self) -> None:
        """Keep at most IDLE_RETURN_POINTS return addresses armed without a live instance (oldest go)."""
        if len(self.addresses) <= IDLE_RETURN_POINTS:
            return
        busy = {e.return_address for group in self.live.values() for entries in group.values() for e in entries}
        idle = [a for a in self.addresses if a not in busy]
        for address in idle[: len(self.addresses) - IDLE_RETURN_POINTS]:
            del self.addresses[address]
            self.user_spaces.pop(address, None)
