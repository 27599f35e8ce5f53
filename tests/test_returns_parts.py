"""Return-probe bookkeeping on its own (no QEMU): which call a return ends, reaping, maxactive, return points.

The behaviour on real guests is in test_returns.py; here the stack is made up to reach the cases a
deterministic guest does not: longjmp, tail calls, tasks moving between CPUs, many call sites.
"""

from __future__ import annotations

import json

import trio

from probed.engine.probes import Probe
from probed.engine.returns import IDLE_RETURN_POINTS, ReturnProbes
from probed.guest.symbols import Location
from probed.lang.fetch import FetchEnv
from probed.lang.handlers import make_handler
from rsp.arch import ARCHES
from rsp.stop import ThreadId

ARCH = ARCHES["x86_64"]
STACK = 0xFFFFC90000010000  # a 16 KiB-aligned kernel stack's top (the task's region)


class _Layout:
    """Registers as JSON: enough for `layout.value`."""

    def value(self, g: bytes, name: str) -> int | None:
        return json.loads(g).get(name)


class _Target:
    def __init__(self):
        self.arch = ARCH
        self.layout = _Layout()
        self.layout_names = set(ARCH.registers)
        self.g_register_names = ARCH.registers
        self.memory: dict[int, int] = {}

    async def read_many(self, requests, registers=None, scope=None):
        return [self.memory[a].to_bytes(n, "little") if a in self.memory else RuntimeError("E14") for a, n in requests]

    def symbolize(self, address: int) -> None:
        return None


class _Breakpoints:
    installed: dict = {}


class _Engine:
    def __init__(self):
        self.target = _Target()
        self.arch = ARCH
        self.breakpoints = _Breakpoints()


def _probe(pid: int, maxactive: int = 10, pre=("n=$arg1:s64",)) -> Probe:
    return Probe(
        id=pid, name=f"p{pid}", spec="f", location=Location("f", None, "f", 0, 0x1000 * pid), retprobe=True,
        maxactive=maxactive, pre=make_handler(list(pre), ARCH, None, FetchEnv(retprobe=True)),
    )


class _Calls:
    """Entries and returns of a made-up guest: a call pushes a return address; a `ret` pops it."""

    def __init__(self):
        self.engine = _Engine()
        self.returns = ReturnProbes(self.engine)

    def enter(self, probe: Probe, sp: int, ret: int, arg: int = 0, cpu: int = 0) -> bool:
        self.engine.target.memory[sp] = ret
        g = json.dumps({"rsp": sp, "rdi": arg}).encode()
        return trio.run(self.returns.on_entry, ThreadId(1, cpu + 1), probe.address, g, [probe], None)

    def ret(self, ret: int, sp: int, cpu: int = 0) -> list[tuple[int, int]]:
        """A return to `ret` whose `ret` instruction left `sp`; (probe id, $arg1 at entry) of the calls it ends."""
        return [(e.probe.id, e.args[1]) for e in self.returns.end(cpu, ret, sp)]


def test_recursion_ends_the_innermost_call_first():
    calls, f = _Calls(), _probe(1)
    assert calls.enter(f, STACK - 0x100, 0x5000, arg=3) is True  # a new return address: install it
    assert calls.enter(f, STACK - 0x120, 0x1010, arg=2) is True
    assert calls.enter(f, STACK - 0x140, 0x1010, arg=1) is False  # armed already: nothing to install
    assert calls.returns.instances() == 3 and len(calls.returns.keys()) == 2
    assert calls.ret(0x1010, STACK - 0x140 + 8) == [(1, 1)]
    assert calls.ret(0x1010, STACK - 0x120 + 8) == [(1, 2)]
    assert calls.ret(0x5000, STACK - 0x100 + 8) == [(1, 3)]
    assert calls.returns.instances() == 0 and calls.returns.reaped == 0
    # The return addresses stay armed for the next calls (no Z/z per call).
    assert calls.returns.keys() == {("break", 0x5000, 0, "x"), ("break", 0x1010, 0, "x")}


def test_ret_n_pops_more_and_still_matches():
    calls, f = _Calls(), _probe(1)
    calls.enter(f, STACK - 0x100, 0x5000, arg=7)
    assert calls.ret(0x5000, STACK - 0x100 + 8 + 16) == [(1, 7)]  # `ret $16`


def test_a_longjmp_past_calls_reaps_them():
    calls, f = _Calls(), _probe(1)
    calls.enter(f, STACK - 0x100, 0x5000, arg=1)
    calls.enter(f, STACK - 0x200, 0x1010, arg=2)
    calls.enter(f, STACK - 0x300, 0x1010, arg=3)
    # A longjmp back above the two inner frames, then a new call at a higher sp than theirs.
    calls.enter(f, STACK - 0x180, 0x6000, arg=4)
    assert calls.returns.reaped == 2 and calls.returns.instances() == 2
    assert calls.ret(0x6000, STACK - 0x180 + 8) == [(1, 4)]
    assert calls.ret(0x5000, STACK - 0x100 + 8) == [(1, 1)]
    assert calls.returns.instances() == 0


def test_a_return_past_deeper_calls_reaps_them():
    calls, f, g = _Calls(), _probe(1), _probe(2)
    calls.enter(f, STACK - 0x100, 0x5000, arg=1)
    calls.enter(g, STACK - 0x200, 0x1010, arg=2)  # g never returns (its frame is unwound)
    assert calls.ret(0x5000, STACK - 0x100 + 8) == [(1, 1)]
    assert calls.returns.reaped == 1 and calls.returns.instances() == 0


def test_a_tail_call_ends_both_calls_at_one_return():
    calls, f, g = _Calls(), _probe(1), _probe(2)
    calls.enter(f, STACK - 0x100, 0x5000, arg=1)
    calls.enter(g, STACK - 0x100, 0x5000, arg=2)  # f jumped to g: same sp, same return address
    assert sorted(calls.ret(0x5000, STACK - 0x100 + 8)) == [(1, 1), (2, 2)]
    assert calls.returns.reaped == 0


def test_tasks_on_two_cpus_and_a_task_that_moved():
    calls, f = _Calls(), _probe(1)
    other = STACK + 0x8000  # another task's stack (another 16 KiB region)
    calls.enter(f, STACK - 0x100, 0x5000, arg=1, cpu=0)
    calls.enter(f, other - 0x100, 0x5000, arg=2, cpu=1)
    calls.enter(f, STACK - 0x200, 0x1010, arg=3, cpu=0)
    # The task on CPU 1 returns on CPU 1; the inner call of CPU 0's task returns on CPU 1 (it moved).
    assert calls.ret(0x5000, other - 0x100 + 8, cpu=1) == [(1, 2)]
    assert calls.ret(0x1010, STACK - 0x200 + 8, cpu=1) == [(1, 3)]
    assert calls.ret(0x5000, STACK - 0x100 + 8, cpu=0) == [(1, 1)]
    assert calls.returns.reaped == 0 and calls.returns.instances() == 0


def test_another_task_on_the_same_cpu_reaps_nothing_of_this_one():
    calls, f = _Calls(), _probe(1)
    calls.enter(f, STACK - 0x200, 0x5000, arg=1)
    calls.enter(f, STACK + 0x4000 - 0x10, 0x5000, arg=2)  # a task switch: another stack, higher up
    assert calls.returns.reaped == 0 and calls.returns.instances() == 2


def test_maxactive_counts_missed_entries():
    calls, f = _Calls(), _probe(1, maxactive=2)
    for depth in range(4):
        calls.enter(f, STACK - 0x100 - 0x20 * depth, 0x1010, arg=depth)
    assert f.missed == 2 and calls.returns.instances() == 2
    assert calls.ret(0x1010, STACK - 0x160 + 8) == []  # a call past the limit: no record
    assert calls.ret(0x1010, STACK - 0x120 + 8) == [(1, 1)]


def test_an_unreadable_return_address_is_missed_not_armed():
    calls, f = _Calls(), _probe(1)
    g = json.dumps({"rsp": STACK - 0x100, "rdi": 0}).encode()
    assert trio.run(calls.returns.on_entry, ThreadId(1, 1), f.address, g, [f], None) is False
    assert f.missed == 1 and calls.returns.keys() == set()


def test_idle_return_points_are_bounded_and_forget_drops_everything():
    calls, f = _Calls(), _probe(1)
    for site in range(IDLE_RETURN_POINTS + 10):
        calls.enter(f, STACK - 0x100, 0x10000 + 16 * site)
        calls.ret(0x10000 + 16 * site, STACK - 0x100 + 8)
    assert len(calls.returns.keys()) == IDLE_RETURN_POINTS
    assert ("break", 0x10000 + 16 * (IDLE_RETURN_POINTS + 9), 0, "x") in calls.returns.keys()  # the newest stay
    calls.enter(f, STACK - 0x100, 0x9000)
    calls.returns.forget(f)
    assert calls.returns.keys() == set() and calls.returns.instances() == 0


# -- user functions: instances keyed by address space and task -----------------------------------------

USTACK = 0x7FFD_1234_0000  # a user stack (both processes' stacks at the same address: no ASLR)


class _UserProbes:
    """`space_of` and `task_key` from the made-up registers' "cr3" and "task"; counts the task reads."""

    def __init__(self):
        self.task_reads = 0

    async def space_of(self, g: bytes) -> int:
        return json.loads(g)["cr3"]

    async def task_key(self, g: bytes) -> tuple[str, int, int]:
        self.task_reads += 1
        regs = json.loads(g)
        return ("user", regs["cr3"], regs["task"])

    def place_of(self, space: int, address: int) -> None:
        return None


class _UserCalls(_Calls):
    def __init__(self):
        super().__init__()
        self.engine.uprobes = _UserProbes()

    def uenter(self, probe: Probe, space: int, task: int, sp: int, ret: int, arg: int) -> bool:
        self.engine.target.memory[sp] = ret
        g = json.dumps({"rsp": sp, "rdi": arg, "cr3": space, "task": task}).encode()
        return trio.run(self.returns.on_entry, ThreadId(1, 1), probe.address, g, [probe], None)

    def uret(self, space: int, task: int, ret: int, sp: int) -> list[tuple[int, int]]:
        g = json.dumps({"rsp": sp, "cr3": space, "task": task}).encode()
        return [(e.probe.id, e.args[1]) for e in trio.run(self.returns.ended_at, ThreadId(1, 1), ret, g)]


def _uprobe(pid: int) -> Probe:
    probe = _probe(pid, maxactive=4096)
    probe.kind = "user"
    return probe


def test_user_calls_end_only_in_their_address_space_and_task():
    calls, f = _UserCalls(), _uprobe(1)
    # Two processes (page-table roots 0xA000, 0xB000) at the same addresses, and a second thread in A.
    calls.uenter(f, 0xA000, 1, USTACK - 0x100, 0x401000, arg=1)
    calls.uenter(f, 0xB000, 2, USTACK - 0x100, 0x401000, arg=2)
    calls.uenter(f, 0xA000, 3, USTACK - 0x200, 0x401000, arg=3)  # thread 3's stack is below thread 1's
    assert calls.returns.is_user(0x401000) and calls.returns.instances() == 3
    reads = calls.engine.uprobes.task_reads
    assert calls.uret(0xC000, 4, 0x401000, USTACK - 0x100 + 8) == []  # a third process there: nothing ends,
    assert calls.engine.uprobes.task_reads == reads  # and nothing was read to know it
    # Thread 1 returns at an sp above thread 3's call: that is not thread 3's frame going away.
    assert calls.uret(0xA000, 1, 0x401000, USTACK - 0x100 + 8) == [(1, 1)]
    assert calls.uret(0xB000, 2, 0x401000, USTACK - 0x100 + 8) == [(1, 2)]
    assert calls.uret(0xA000, 3, 0x401000, USTACK - 0x200 + 8) == [(1, 3)]
    assert calls.returns.reaped == 0 and calls.returns.instances() == 0
    assert calls.returns.keys() == {("break", 0x401000, 0, "x")}  # armed while A and B live


def test_an_address_space_that_goes_takes_its_calls_and_return_addresses():
    calls, f = _UserCalls(), _uprobe(1)
    calls.uenter(f, 0xA000, 1, USTACK - 0x100, 0x401000, arg=1)
    calls.uenter(f, 0xA000, 1, USTACK - 0x140, 0x555000, arg=2)  # A's own return address
    calls.uenter(f, 0xB000, 2, USTACK - 0x100, 0x401000, arg=3)
    assert calls.returns.forget_space(0xA000) is True  # 0x555000 was A's alone
    assert calls.returns.reaped == 2 and calls.returns.instances() == 1
    assert calls.returns.keys() == {("break", 0x401000, 0, "x")}
    assert calls.uret(0xA000, 1, 0x401000, USTACK - 0x100 + 8) == []  # (a new process with A's root)
    assert calls.returns.forget_space(0xB000) is True
    assert calls.returns.keys() == set() and calls.returns.instances() == 0 and not calls.returns.is_user(0x401000)
    assert calls.returns.forget_space(0xB000) is False
