"""The task running on a CPU (`current`), as x86_64 Linux finds it: a per-CPU pointer at %gs_base + offset.

In the kernel, `current` reads the per-CPU variable `current_task` (6.1; 6.2 and later keep it as the member
`current_task` of the per-CPU struct `pcpu_hot`). Per-CPU variables are addressed from the CPU's GS base,
which QEMU's x86_64 `g` packet carries (`gs_base`): while the CPU runs kernel code GS holds the kernel's
per-CPU base (user GS is parked in `k_gs_base` by swapgs). So every CPU of an SMP guest finds its own task
with one read of `gs_base + offset`, then the task's fields: `comm` (char[16]), `tgid` (what ps shows as
PID) and `pid` (the thread id).

kallsyms lists per-CPU symbols as offsets from the start of the per-CPU area (small numbers, type `A` or
`D`, e.g. `000000000001fb80 A current_task`); a KASLR slide does not move them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .btf import Btf, UnknownMember, UnknownType

__all__ = ["CurrentTask", "NoCurrentTask", "current_task_layout"]

PER_CPU_LIMIT = 1 << 32  # per-CPU offsets are small; anything above is a real (kernel) address
GS_BASE = "gs_base"
KERNEL_GS_BASE = "k_gs_base"  # where the kernel's GS base is while the CPU runs user code (after swapgs)


class NoCurrentTask(LookupError):
    """The symbols or types do not say where the current task is; the message says what is missing."""


@dataclass(frozen=True)
class CurrentTask:
    """Where `current` and its fields are.

    Attributes:
        register: the register holding this CPU's per-CPU base ("gs_base").
        percpu_offset: the pointer to the current task_struct is at register + percpu_offset.
        comm, comm_size, pid, tgid: byte offsets (and comm's length) in task_struct.
    """

    register: str
    percpu_offset: int
    comm: int
    comm_size: int
    pid: int
    tgid: int
    user_register: str = KERNEL_GS_BASE


def _percpu_offset(symbols: Any, name: str) -> int | None:
    """A per-CPU symbol's offset into the per-CPU area, or None if there is no such symbol."""
    try:
        sym = symbols.lookup(name)
    except Exception:  # UnknownSymbol
        return None
    if sym.address < PER_CPU_LIMIT:
        return sym.address
    # A bias (KASLR) applied to the whole file moved the per-CPU offset too: undo it.
    bias = next((f.bias for f in symbols.files() if f.name == sym.file), 0)
    raw = sym.address - bias
    return raw if 0 <= raw < PER_CPU_LIMIT else None


def current_task_layout(btf: Btf, symbols: Any) -> CurrentTask:
    """Where the current task is on this kernel.

    Raises:
        NoCurrentTask: neither `current_task` nor `pcpu_hot` is a per-CPU symbol, or task_struct lacks a field.
    """
    offset = _percpu_offset(symbols, "current_task")
    if offset is None:
        hot = _percpu_offset(symbols, "pcpu_hot")
        if hot is None:
            raise NoCurrentTask("no per-CPU symbol current_task or pcpu_hot in the loaded symbols")
        try:
            offset = hot + btf.member(btf.struct("pcpu_hot"), "current_task").bit_offset // 8
        except (UnknownType, UnknownMember) as exc:
            raise NoCurrentTask(str(exc)) from None
    try:
        task = btf.struct("task_struct")
        comm = btf.member(task, "comm")
        pid, tgid = btf.member(task, "pid"), btf.member(task, "tgid")
    except (UnknownType, UnknownMember) as exc:
        raise NoCurrentTask(str(exc)) from None
    return CurrentTask(GS_BASE, offset, comm.bit_offset // 8, btf.size_of(comm.type), pid.bit_offset // 8,
                       tgid.bit_offset // 8)
