"""User-space probes in Linux guests: probes on a FILE and an offset, firing in every process that maps it.

How (uprobes' semantics, from outside the guest):
- A user probe's hook point is `("user", file offset, 0, "inode:ADDR")`: it belongs to the file's inode,
  found when the probe is added by walking the guest's dentry cache from the root (probed.guest.linux.mm).
- Which processes map the file: at the first probe on it, every task's VMAs are read (the mm's maple
  tree); afterwards three kernel functions keep the table current, each a breakpoint of ours while any user
  probe exists: `uprobe_mmap(vma)` (every new file mapping: exec, mmap, a VMA split or merge),
  `uprobe_munmap(vma, start, end)` (munmap, a VMA adjusted, and process exit through unmap_vmas) and
  `uprobe_dup_mmap(oldmm, newmm)` (fork). Each mapping is kept as (page-table root, VMA).
- Breakpoints: QEMU's are by virtual address in whatever address space runs, so one breakpoint goes at
  each distinct address where some process maps a probed offset (each PIE process has its own base).
- A stop at such an address is a hit only if the CPU's address space (CR3, from the registers the stop
  already read: no memory read) is one whose mapping of our file puts the probed offset there. Any other
  process there (other code at the same address, or a copy of the same bytes in another file) is stepped
  past silently. A stop whose CR3 is unknown (a forked child) is settled by reading that process's VMAs.
- One execution, one hit: a breakpoint on an instruction whose page is not present yet stops, the fetch
  faults, the kernel maps the page and the instruction stops again. The first stop is told apart by the
  instruction's bytes being unreadable through the page tables (QEMU's `m` walks them as the CPU would),
  and is stepped past silently.
- Records name the place in the file (`/bin/utarget:utarget+0x0`), never a kernel symbol.
- 32-bit (compat) processes: each hit's registers say which user ABI its fetch args follow
  (probed.lang.compat); their instructions are decoded as 32-bit code.

Return probes on user functions (`add(..., ret=True)`, uretprobes): the entry is a user probe like any
other, and `probed.engine.returns` keeps the call (the return address read from the user stack through
the process's page tables) keyed by `task_key`: the address space (CR3) and the task (`current`). A
process that exits or execs unmaps its files: the `uprobe_munmap` hook that drops its last mapping of a
probed file also drops its calls in flight and the return addresses only it used (`ReturnProbes.forget_space`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probed.errors import BadSpec, TargetError, UnknownSymbol, Unsupported
from probed.guest.insn import verify_boundary
from probed.guest.linux.mm import (
    CR3_ADDRESS_MASK,
    DIRECT_MAP_DEFAULT,
    FileId,
    MmLayout,
    NotInDcache,
    Vma,
    lookup_path,
    mm_vmas,
    pgd_of,
    read_vma,
    read_word,
    tasks,
)
from probed.guest.userfile import UserElf, UserSpec, copy_for_saved, parse_user_spec
from probed.lang.compat import is_compat
from probed.lang.context import RegisterView
from probed.sim.emulate import MAX_INSN

if TYPE_CHECKING:
    from probed.engine.engine import Engine
    from probed.engine.probes import Probe

__all__ = ["HOOKS", "UserFile", "UserProbes"]

log = logging.getLogger(__name__)

HOOKS = ("uprobe_mmap", "uprobe_munmap", "uprobe_dup_mmap")
USER_MAXACTIVE = 4096
"""A user return probe's default limit of calls in flight, all processes together (uretprobes have no
global limit, only 64 nested calls per task; kretprobes' default of max(10, 2 * CPUs) is for one kernel)."""
PAGE = 4096
Key = tuple[str, int, int, str]


@dataclass
class UserFile:
    """A probed file in the guest and where processes map it: VMA address -> (page-table root, Vma)."""

    path: str
    id: FileId
    elf: UserElf | None = None
    mappings: dict[int, tuple[int, Vma]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"inode:{self.id.inode:#x}"

    def addresses(self, offset: int) -> dict[int, set[int]]:
        """Virtual address -> the page-table roots of the processes that map `offset` there."""
        out: dict[int, set[int]] = {}
        for pgd, vma in self.mappings.values():
            address = vma.address_of(offset)
            if address is not None:
                out.setdefault(address, set()).add(pgd)
        return out


class UserProbes:
    """The engine's user-probe component: files, mappings, the breakpoints they need, and stop verdicts."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.files: dict[int, UserFile] = {}  # by inode address
        self.layout: MmLayout | None = None
        self.direct_map = DIRECT_MAP_DEFAULT
        self.hooks: dict[int, str] = {}  # kernel address -> hook function name
        self.kernel_code: dict[int, bytes] = {}  # the hooks' first instructions, read once
        self._unknown_ok: set[int] = set()  # page-table roots read and found not mapping any probed offset
        self._armed: dict[int, list[tuple[UserFile, int]]] = {}  # address -> (file, offset) probed there
        self.silent = 0  # stops at a probed address that were not a hit (other process, page not present)
        self.hook_stops = 0
        self.code: bytes | None = None  # the instruction bytes at the last user hit's pc, read by on_stop
        # After a reboot: probes whose file is not in the new boot's dentry cache yet (tried again at each
        # `uprobe_mmap`), and the host copies of the files forgotten with the old boot.
        self.waiting: dict[int, Probe] = {}
        self._elves: dict[str, UserElf | None] = {}

    # -- adding -------------------------------------------------------------------------------------

    async def add(self, spec: str, *, file_copy: str | None, name: str | None, pre: Any, post: Any,
                  condition: str | None, priority: int, ret: bool = False, file_offset: int | None = None,
                  maxactive: int = 0, timeout: float | None = None) -> Probe:
        """Add a user probe (`/PATH:OFFSET`, `/PATH:SYMBOL[+OFF]`); see `Engine.add_probe` (`file_offset`: the
        offset a symbol resolved to when the probe was first added, from a saved state). With `ret`, a
        return probe on the function there (`maxactive`: its calls in flight, all processes together;
        0: `USER_MAXACTIVE`).

        Raises:
            BadSpec, UnknownSymbol, Unsupported, FetchSyntaxError, TargetError.
        """
        from probed.engine.probes import Probe
        from probed.engine.returns import checked_maxactive
        from probed.guest.symbols import Location
        from probed.lang.handlers import make_handlers

        engine = self.engine
        parsed = parse_user_spec(spec)
        maxactive = checked_maxactive(spec, retprobe=ret, offset=parsed.symbol_offset, post=post, maxactive=maxactive,
                                      default=USER_MAXACTIVE)
        if file_copy is None and engine.sysroot is not None:
            candidate = Path(engine.sysroot) / parsed.path.lstrip("/")
            file_copy = str(candidate) if candidate.is_file() else None
        if file_offset is not None and parsed.symbol:
            elf, offset = copy_for_saved(file_copy, parsed, file_offset), file_offset  # checked when first added
        else:
            elf = UserElf(file_copy) if file_copy else None
            offset = _file_offset(parsed, elf, spec)
        if elf is not None and parsed.symbol and file_offset is None:
            # kprobes' rule, checked on the host copy: a probe starts an instruction.
            await verify_boundary(elf.read_many, elf.arch_name or engine.arch.name, spec, parsed.symbol,
                                  parsed.symbol_offset, offset)
        try:
            types = await engine.kernel_types()
        except LookupError as exc:  # NoKernelTypes: not a Linux guest, or no BTF
            raise Unsupported(f"user probes need a Linux guest with its kernel's types (BTF): {exc}") from None
        pre_h, post_h = await make_handlers([pre, post], engine.arch, engine.symbols, function=None, offset=offset,
                                            load_types=engine.kernel_types, user=True, retprobe=ret)
        cond = engine.make_condition(condition, pre_h, post_h)

        async def apply() -> Probe:
            self._prepare(types)
            file = await self._file(parsed.path, elf)
            where = _place(parsed, elf, offset)
            probe = Probe(
                id=engine.table.new_id(),
                name=engine.new_name(name, _default_name(parsed, offset)),
                spec=spec,
                location=Location(spec, parsed.path, parsed.symbol, offset, offset),
                kind="user", pre=pre_h, post=post_h, condition=cond, priority=priority, file_tag=file.tag,
                where=where, retprobe=ret, maxactive=maxactive, timeout=timeout,
            )
            engine.table.add(probe)
            await engine.breakpoints.reconcile()
            return probe

        return await engine.call_stopped(apply)

    def _prepare(self, types: Any) -> None:
        if self.layout is not None:
            return
        try:
            self.layout = MmLayout.from_btf(types.btf)
        except LookupError as exc:
            raise Unsupported(f"user probes need a Linux 6.1 or later kernel (maple-tree VMAs): {exc}") from None
        self._find_hooks()

    def _find_hooks(self) -> None:
        symbols = self.engine.symbols
        for hook in HOOKS:
            try:
                self.hooks[symbols.lookup(hook).address] = hook
            except UnknownSymbol:
                raise Unsupported(f"user probes need the kernel symbol {hook} (CONFIG_UPROBES, with the "
                                  "kernel's kallsyms loaded)") from None

    async def _file(self, path: str, elf: UserElf | None) -> UserFile:
        """The probed file at `path`, its mappings read from every process the first time."""
        init_task = self._symbol("init_task")
        try:
            fid = await self._run(lookup_path(self.layout, self._read, init_task, path))
        except NotInDcache as exc:
            raise BadSpec(path, str(exc)) from None
        file = self.files.get(fid.inode)
        if file is not None and file.id == fid:
            if elf is not None and file.elf is None:
                file.elf = elf
            return file
        try:
            (base,) = await self.engine.target.read_many([(self._symbol("page_offset_base"), 8)])
            if not isinstance(base, Exception):
                self.direct_map = int.from_bytes(base, "little")
        except TargetError:
            pass
        file = self.files[fid.inode] = UserFile(path, fid, elf)
        seen: set[int] = set()
        for _task, _tgid, _pid, mm in await self._run(tasks(self.layout, self._read, init_task)):
            if mm and mm not in seen:
                seen.add(mm)
                await self._scan_mm(mm, [file])
        return file

    async def _scan_mm(self, mm: int, files: Sequence[UserFile]) -> bool:
        """Read an mm's VMAs and file those of `files`; True if any was found."""
        layout = self.layout
        vmas = await self._run(mm_vmas(layout, self._read, mm))
        wanted = {f.id.inode: f for f in files}
        found = [v for v in vmas if v.inode in wanted]
        if found:
            pgd = await self._run(pgd_of(layout, self._read, mm, self.direct_map))
            for v in found:
                wanted[v.inode].mappings[v.address] = (pgd, v)
        return bool(found)

    def _symbol(self, name: str) -> int:
        try:
            return self.engine.symbols.lookup(name).address
        except UnknownSymbol:
            raise Unsupported(f"user probes need the kernel symbol {name} (load the kernel's kallsyms)") from None

    # -- breakpoints --------------------------------------------------------------------------------

    def wanted(self) -> set[Key]:
        """The breakpoints user probes need now: one per mapped address, and the kernel hooks."""
        points = [p for p in self.engine.table.points.values() if p.kind == "user"]
        live_tags = {p.key[3] for p in points}
        for inode in [i for i, f in self.files.items() if f.tag not in live_tags]:
            del self.files[inode]  # no probe on it any more: forget its mappings
        by_tag = {f.tag: f for f in self.files.values()}
        armed: dict[int, list[tuple[UserFile, int]]] = {}
        for point in points:
            file = by_tag.get(point.key[3])
            if file is None or not point.active():
                continue
            for address in file.addresses(point.address):
                armed.setdefault(address, []).append((file, point.address))
        self._armed = armed
        if not points and not self.waiting:
            return set()
        # The hooks stay while any user probe exists, enabled or not: its file's mappings stay current.
        return {("break", a, 0, "x") for a in armed} | {("break", a, 0, "x") for a in self.hooks}

    def owns(self, pc: int) -> bool:
        return pc in self._armed or (pc in self.hooks and bool(self._armed or self.files or self.waiting))

    # -- stops --------------------------------------------------------------------------------------

    async def on_stop(self, pc: int, g: bytes) -> list[Probe]:
        """The user probes this stop is a hit of (possibly none); kernel hooks update the mappings here."""
        engine = self.engine
        self.code = None
        regs = RegisterView(engine.target, g)
        if pc in self.hooks:
            self.hook_stops += 1
            changed = await self._hook(self.hooks[pc], regs)
            if self.waiting and self.hooks[pc] == "uprobe_mmap":
                changed = await self._find_waiting() or changed
            if changed:
                await engine.breakpoints.reconcile()
            if pc not in self._armed:
                return []
        places = self._armed.get(pc, [])
        pgd = await self._address_space(g, regs)
        hits = [(f, off) for f, off in places if pgd in f.addresses(off).get(pc, ())]
        if not hits and pgd not in self._unknown_ok:
            hits = await self._settle_unknown(pc, pgd, regs)
        if not hits or not await self._executes(pc, is_compat(regs)):
            self.silent += 1
            return []
        probes: list[Probe] = []
        for file, offset in hits:
            point = engine.table.points.get(("user", offset, 0, file.tag))
            if point is not None:
                probes += point.active()
        probes.sort(key=lambda p: (-p.priority, p.order))
        return probes

    def place_of(self, space: int, address: int) -> str | None:
        """`/PATH:SYMBOL+0xOFF` (or `/PATH:0xOFFSET` without a host copy) of a user address in the address
        space `space`, when a probed file is mapped there; else None (probed knows no other user files)."""
        for file in self.files.values():
            for pgd, vma in file.mappings.values():
                if pgd == space and vma.start <= address < vma.end:
                    offset = vma.file_offset(address)
                    where = file.elf.symbolize(offset) if file.elf is not None else None
                    return f"{file.path}:{where or hex(offset)}"
        return None

    async def _address_space(self, g: bytes, regs: RegisterView) -> int:
        """The stop's page-table root as `mm->pgd` has it: with KPTI, user mode runs on the user PGD of the
        mm's pair (bit 12 set), and CR3's low bits may hold a PCID (probed.guest.memory.kpti)."""
        space = await self.engine.target.address_space(g)
        return space if space is not None else regs["cr3"] & CR3_ADDRESS_MASK

    async def space_of(self, g: bytes) -> int:
        """The address space a user stop ran in: its page-table root as `mm->pgd` has it."""
        return await self._address_space(g, RegisterView(self.engine.target, g))

    async def task_key(self, g: bytes) -> tuple[str, int, int]:
        """A user stop's task, as return probes key their instances: ("user", address space, the task's
        task_struct address: the CPU's `current`, found through KERNEL_GS_BASE as `$tid` is)."""
        regs = RegisterView(self.engine.target, g)
        space = await self._address_space(g, regs)
        current = self.engine.types.current if self.engine.types is not None else None
        task = 0  # unknown: the address space's calls then share one stack of calls (a single thread's)
        if current is not None and current.user_register in regs:
            # With this stop's registers: under KPTI the per-CPU data is read through the kernel's PGD.
            (data,) = await self.engine.target.read_many([(regs[current.user_register] + current.percpu_offset, 8)],
                                                         registers=g)
            if isinstance(data, Exception):
                log.debug("user return probe: cannot read the current task: %s", data)
            else:
                task = int.from_bytes(data, "little")
        return ("user", space, task)

    async def _settle_unknown(self, pc: int, pgd: int, regs: RegisterView) -> list[tuple[UserFile, int]]:
        """A stop in an address space we have no mapping for (a forked child): read its VMAs."""
        current = self.engine.types.current if self.engine.types is not None else None
        if current is None:
            return []
        kgs = regs[current.user_register]
        task = await self._run(read_word(self._read, kgs + current.percpu_offset))
        mm = await self._run(read_word(self._read, task + self.layout.task_mm))
        if not mm or not await self._scan_mm(mm, list(self.files.values())):
            self._unknown_ok.add(pgd)
            return []
        self.engine.breakpoints.dirty = True
        return [(f, off) for f, off in self._armed.get(pc, []) if pgd in f.addresses(off).get(pc, ())]

    async def _executes(self, pc: int, compat: bool) -> bool:
        """Whether the instruction at pc can be fetched (its page present): else this stop is the first of two.

        The bytes read are kept in `code` for the engine (it simulates or steps the instruction next).
        """
        end = min(pc + MAX_INSN, (pc // PAGE + 1) * PAGE)
        (code,) = await self.engine.target.read_many([(pc, end - pc)])
        if isinstance(code, Exception):
            return False
        if end - pc >= MAX_INSN:
            self.code = code
            return True
        # The instruction may cross into the next page: it executes only if that page is there too,
        # unless it ends on this one.
        (more,) = await self.engine.target.read_many([(end, pc + MAX_INSN - end)])
        if isinstance(more, Exception):
            return _fits(code, pc, compat)
        self.code = code + more
        return True

    async def _hook(self, name: str, regs: RegisterView) -> bool:
        """Update the mappings from a kernel hook's arguments; True when the breakpoints must change."""
        layout = self.layout
        if name == "uprobe_mmap":
            vma = await self._run(read_vma(layout, self._read, regs["rdi"]))
            file = self.files.get(vma.inode)
            if file is None:
                return False
            pgd = await self._run(pgd_of(layout, self._read, vma.mm, self.direct_map))
            file.mappings[vma.address] = (pgd, vma)
            self._unknown_ok.discard(pgd)
            return True
        if name == "uprobe_munmap":
            address, start, end = regs["rdi"], regs["rsi"], regs["rdx"]
            for file in self.files.values():
                held = file.mappings.get(address)
                if held is not None and start <= held[1].start and end >= held[1].end:
                    del file.mappings[address]
                    pgd = held[0]
                    if not any(m[0] == pgd for f in self.files.values() for m in f.mappings.values()):
                        # Its last probed mapping: the process exits or execs; its calls never return.
                        self.engine.returns.forget_space(pgd)
                    return True
            return False
        if name == "uprobe_dup_mmap" and self._unknown_ok:
            self._unknown_ok.discard(await self._run(pgd_of(layout, self._read, regs["rsi"], self.direct_map)))
        return False

    # -- a reboot (probed.guest.linux.reboot) -------------------------------------------------------

    def forget_all(self) -> None:
        """The kernel is gone: its files, mappings, hook addresses and page-table roots with it."""
        self._elves.update({f.path: f.elf for f in self.files.values()})
        self.files.clear()
        self.hooks.clear()
        self.kernel_code.clear()
        self._unknown_ok.clear()
        self._armed = {}
        self.waiting.clear()
        self.code = None
        self.direct_map = DIRECT_MAP_DEFAULT

    async def place_again(self, probe: Probe) -> bool:
        """In the new kernel: find the probe's file again (a new inode) and read who maps it; False when the
        file is not there yet (the probe then waits, and is tried again at each new file mapping).

        The probe is out of the table while this runs (its key changes).
        """
        if not self.hooks:
            self._find_hooks()
        path = probe.location.file
        try:
            file = await self._file(path, self._elves.get(path))
        except BadSpec:
            probe.pending = f"the guest rebooted: waiting for {path} to appear in it"
            self.waiting[probe.id] = probe
            return False
        probe.file_tag, probe.pending = file.tag, None
        return True

    async def _find_waiting(self) -> bool:
        """At a new file mapping: place the probes whose file now exists; True if any was."""
        table = self.engine.table
        placed = False
        for pid, probe in list(self.waiting.items()):
            if table.get(pid) is not probe:
                del self.waiting[pid]
                continue
            del self.waiting[pid]
            table.remove(probe)
            placed = await self.place_again(probe) or placed
            table.add(probe)
        return placed

    # -- reads --------------------------------------------------------------------------------------

    @staticmethod
    def _read(address: int, length: int):
        data = yield (address, length)
        return data

    async def _run(self, gen) -> Any:
        """Drive a sans-IO reader generator against the target."""
        read_many = self.engine.target.read_many
        try:
            request = next(gen)
            while True:
                (data,) = await read_many([request])
                if isinstance(data, Exception):
                    request = gen.throw(TargetError(f"cannot read guest memory at {request[0]:#x}: {data}"))
                else:
                    request = gen.send(data)
        except StopIteration as done:
            return done.value

    def stats(self) -> dict[str, Any]:
        return {
            "files": {f.path: len(f.mappings) for f in self.files.values()},
            "addresses": len(self._armed),
            "silent_stops": self.silent,
            "silent_returns": self.engine.returns.silent,
            "return_addresses": len(self.engine.returns.user_spaces),
            "hook_stops": self.hook_stops,
        }


def _file_offset(parsed: UserSpec, elf: UserElf | None, spec: str) -> int:
    if parsed.offset is not None:
        return parsed.offset
    if elf is None:
        raise BadSpec(spec, "a symbol needs the file's ELF: name a host copy of it (--file-copy HOSTPATH, or "
                      "probed --sysroot DIR holding DIR/PATH), or give the file offset (PATH:0xOFFSET)")
    return elf.resolve(parsed.symbol, parsed.symbol_offset)


def _place(parsed: UserSpec, elf: UserElf | None, offset: int) -> str:
    where = elf.symbolize(offset) if elf is not None else None
    if where is None and parsed.symbol:  # re-added from a saved offset, without the copy: as it was named
        where = parsed.symbol + (f"+{parsed.symbol_offset:#x}" if parsed.symbol_offset else "")
    return f"{parsed.path}:{where or hex(offset)}"


def _default_name(parsed: UserSpec, offset: int) -> str:
    base = parsed.path.rsplit("/", 1)[-1]
    what = parsed.symbol + (f"+{parsed.symbol_offset:#x}" if parsed.symbol_offset else "") if parsed.symbol else hex(offset)
    return f"{base}:{what}".replace("-", "_")


def _fits(code: bytes, pc: int, compat: bool) -> bool:
    """Whether the first instruction of `code` ends within `code` (decoded with capstone, as 32-bit code in a
    compat process)."""
    from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs

    for insn in Cs(CS_ARCH_X86, CS_MODE_32 if compat else CS_MODE_64).disasm(code, pc, count=1):
        return insn.size <= len(code)
    return False
