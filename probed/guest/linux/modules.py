"""Loaded kernel modules: their symbols as symbol files, and probes that follow modules in and out.

Each loaded module is a symbol file named after it, so `MOD:SYM+off` (as kprobe_events writes it) names a
place in it. A probe on a module that is not loaded waits (`pending`), is set when the module loads, taken
out when it unloads, and set again at the new address when it loads again: a probe belongs to its module,
its symbol and its offset, not to an address.

How modules are read (Linux 6.1, x86_64), without BTF:
- the kernel's `modules` list (a `list_head` in kallsyms) links every `struct module` through its `list`
  member, at offset 8 after `enum module_state state` (a layout unchanged since 2.6);
- `name` follows at offset 24 (`char[MODULE_NAME_LEN]`, 56 bytes);
- the module's symbols are in `core_kallsyms` (`struct mod_kallsyms`: symtab, num_symtab, strtab,
  typetab), whose offset depends on the configuration. It is found by its shape: the kernel lays the core
  symtab out right before the core strtab, so the one place in `struct module` holding
  (`symtab`, `n`, `strtab`, `typetab`) with `strtab == symtab + n * sizeof(Elf64_Sym)` is it. The offset is
  learnt from the first module and checked again for every later one.

Load and unload are followed with two internal probes: `do_init_module` (called with the new module, its
symbols in place, before its init function runs) and `free_module` (called with the module being freed,
on unload and when a load fails). Both are static functions of kernel/module/main.c, in kallsyms.
"""

from __future__ import annotations

import logging
import struct

import trio

from probed.errors import ProbedError, TargetError
from probed.guest.linux.memory import GuestMemory, GuestMemoryError
from probed.guest.symbols import Location, SymbolFile
from probed.lang.handlers import PythonHandler

__all__ = ["ModuleTracker", "LOAD_HOOK", "UNLOAD_HOOK"]

log = logging.getLogger(__name__)

LOAD_HOOK = "do_init_module"
UNLOAD_HOOK = "free_module"
MODULES_VADDR = 0xFFFF_FFFF_C000_0000
LIST_OFFSET = 8
NAME_OFFSET = 24
NAME_SIZE = 56
STRUCT_SCAN = 0x800  # struct module is about 1.3 KiB on 6.1; core_kallsyms lies well inside this
ELF64_SYM = struct.Struct("<IBBHQQ")
_CODE = frozenset("tTwW")
_MAX_MODULES = 4096


class ModuleLayoutError(TargetError):
    """`struct module` is not laid out as expected (see the module docstring)."""


def _is_module_address(value: int) -> bool:
    return value >= MODULES_VADDR


def _shape_ok(raw: bytes, off: int) -> bool:
    """Whether `raw[off:]` starts like a `struct mod_kallsyms` of a module's core symbols."""
    if off + 32 > len(raw):
        return False
    symtab, num, pad, strtab, typetab = struct.unpack_from("<QIIQQ", raw, off)
    return (pad == 0 and 0 < num < 1_000_000 and _is_module_address(symtab) and _is_module_address(typetab)
            and strtab == symtab + num * ELF64_SYM.size)


def find_core_kallsyms(raw: bytes) -> int | None:
    """The offset of `core_kallsyms` in the bytes of a `struct module`, by its shape; None if not there."""
    return next((off for off in range(NAME_OFFSET + NAME_SIZE, len(raw) - 31, 8) if _shape_ok(raw, off)), None)


class ModuleTracker:
    """The loaded modules of a Linux guest, and the probes waiting for them.

    Args:
        engine: the engine (its symbols, probe table and breakpoints are used while the guest is stopped).
        memory: guest memory.
    """

    def __init__(self, engine, memory: GuestMemory):
        self.engine = engine
        self.memory = memory
        self.loaded: dict[str, int] = {}  # name -> struct module address
        self.kallsyms_offset: int | None = None
        self.loads = 0
        self.unloads = 0
        self.history: list[tuple[str, str]] = []  # ("load" or "unload", module), in order
        self._changed = trio.Event()

    def loaded_names(self) -> list[str]:
        return sorted(self.loaded)

    async def wait_for(self, event: str, module: str, after: int = 0) -> int:
        """Wait until `history` has `(event, module)` at an index >= `after`; returns that index."""
        while True:
            for i in range(after, len(self.history)):
                if self.history[i] == (event, module):
                    return i
            await self._changed.wait()

    def _record(self, event: str, module: str) -> None:
        self.history.append((event, module))
        self._changed.set()
        self._changed = trio.Event()

    # -- attach ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the modules loaded now, and set the load/unload hooks.

        Raises:
            TargetError: the kernel has no `modules` list or hook functions in its symbols.
        """
        symbols = self.engine.symbols
        try:
            head = symbols.resolve_data("modules")[0].address
            symbols.lookup(LOAD_HOOK)
            symbols.lookup(UNLOAD_HOOK)
        except ProbedError as exc:
            raise TargetError(f"cannot follow modules: {exc}") from exc
        for mod in await self._walk(head):
            await self._add_module(mod)
        await self._hook(LOAD_HOOK, self._on_load)
        await self._hook(UNLOAD_HOOK, self._on_unload)

    async def _hook(self, function: str, handler) -> None:
        # Run now, in the attach hook (the guest is stopped and the engine task is ours): file the probe and
        # let the engine install it when it reconciles, as for any change made while stopped.
        from probed.engine.probes import Probe

        engine = self.engine
        location = engine.symbols.resolve(function)
        probe = Probe(id=engine.table.new_id(internal=True), name=f"linux:{function}", spec=function, location=location,
                      pre=PythonHandler(handler), internal=True)
        engine.table.add(probe)
        engine.breakpoints.dirty = True

    async def _walk(self, head: int) -> list[int]:
        out = []
        (first,) = struct.unpack("<Q", await self.memory.read(head, 8))
        node = first
        while node != head and len(out) < _MAX_MODULES:
            out.append(node - LIST_OFFSET)
            (node,) = struct.unpack("<Q", await self.memory.read(node, 8))
        return out

    # -- one module ------------------------------------------------------------------------------------

    async def _read_module(self, mod: int) -> tuple[str, list[tuple[str, int, int, str]]]:
        raw = await self.memory.read(mod, STRUCT_SCAN)
        name = raw[NAME_OFFSET : NAME_OFFSET + NAME_SIZE].split(b"\0", 1)[0].decode(errors="replace")
        off = self.kallsyms_offset
        if off is None or not _shape_ok(raw, off):
            found = find_core_kallsyms(raw)
            if found is None:
                raise ModuleLayoutError(f"module {name!r} at {mod:#x}: no core_kallsyms in its struct module")
            if off is not None:
                log.warning("linux: core_kallsyms of %s at +%#x, not +%#x as before", name, found, off)
            off = self.kallsyms_offset = found
        symtab, num, _, strtab, typetab = struct.unpack_from("<QIIQQ", raw, off)
        table = await self.memory.read(symtab, num * ELF64_SYM.size)
        types = await self.memory.read(typetab, num)
        strings = await self.memory.read(strtab, max(1, min(typetab - strtab, 1 << 20)) if typetab > strtab else 1 << 16)
        entries = []
        for i in range(1, num):  # entry 0 is the ELF's null symbol
            st_name, _info, _other, _shndx, value, size = ELF64_SYM.unpack_from(table, i * ELF64_SYM.size)
            end = strings.find(b"\0", st_name)
            sym = strings[st_name:end].decode(errors="replace")
            if not sym or not value:
                continue
            kind = "code" if chr(types[i]) in _CODE else "data"
            entries.append((sym, value, size, kind))
        return name, entries

    async def _add_module(self, mod: int) -> str | None:
        try:
            name, entries = await self._read_module(mod)
        except (GuestMemoryError, ModuleLayoutError) as exc:
            log.warning("linux: cannot read the module at %#x: %s", mod, exc)
            return None
        self.engine.symbols.add(SymbolFile.from_entries(name, f"<module {name} at {mod:#x}>", entries))
        self.loaded[name] = mod
        return name

    # -- pending probes ---------------------------------------------------------------------------------

    def pending_location(self, spec: str) -> tuple[Location, str] | None:
        """For `MOD:SYM[+off]` of a module not loaded: an address-less location and why it waits."""
        module, sep, rest = spec.strip().partition(":")
        if not sep or not module or module in self.loaded or not module.replace("-", "_").isidentifier():
            return None
        symbol, plus, offset = rest.partition("+")
        if not symbol or symbol[0].isdigit():
            return None
        try:
            value = int(offset, 0) if plus else 0
        except ValueError:
            return None
        return Location(spec, module, symbol, value, 0), f"module {module} not loaded"

    def _arm(self, module: str) -> int:
        """Set the probes waiting for `module` (just loaded); returns how many."""
        engine = self.engine
        armed = 0
        for probe in [p for p in engine.table if p.pending and p.location.file == module]:
            engine.table.remove(probe)
            try:
                probe.location = engine.symbols.resolve(probe.spec)
                probe.pending = None
                armed += 1
            except ProbedError as exc:
                probe.pending = f"module {module} loaded, but: {exc}"
            engine.table.add(probe)
        engine.breakpoints.dirty = True
        return armed

    def _disarm(self, module: str, why: str = "unloaded") -> int:
        engine = self.engine
        moved = 0
        for probe in [p for p in engine.table if not p.pending and p.location.file == module]:
            engine.breakpoints.give_back(probe.point_key)
            engine.table.remove(probe)
            probe.pending = f"module {module} {why}"
            probe.location = Location(probe.spec, module, probe.location.symbol, probe.location.offset, 0)
            engine.table.add(probe)
            moved += 1
        engine.symbols.remove_file(module)
        engine.breakpoints.dirty = True
        return moved

    # -- a reboot (probed.guest.linux.reboot) -----------------------------------------------------------

    def forget_all(self, why: str) -> None:
        """The kernel is gone: every module with it; their probes wait for them to load again."""
        for name in list(self.loaded):
            self._disarm(name, f"not loaded ({why})")
        self.loaded.clear()

    async def rescan(self) -> None:
        """In the new kernel (its symbols moved already): read the modules loaded so far, set their probes."""
        head = self.engine.symbols.resolve_data("modules")[0].address  # moved with the kernel
        for mod in await self._walk(head):
            name = await self._add_module(mod)
            if name is not None:
                self._arm(name)
                self._record("load", name)

    # -- the hooks ---------------------------------------------------------------------------------------

    async def _on_load(self, ctx) -> None:
        name = await self._add_module(ctx.regs["rdi"])
        if name is not None:
            self.loads += 1
            armed = self._arm(name)
            await self.engine.reconcile_now()  # set before the module's init runs
            self._record("load", name)
            log.debug("linux: module %s loaded; %d pending probe(s) set", name, armed)

    async def _on_unload(self, ctx) -> None:
        mod = ctx.regs["rdi"]
        name = next((n for n, m in self.loaded.items() if m == mod), None)
        if name is None:
            return  # a load that failed before do_init_module: nothing was read
        del self.loaded[name]
        self.unloads += 1
        moved = self._disarm(name)
        await self.engine.reconcile_now()  # out before its memory is freed
        self._record("unload", name)
        log.debug("linux: module %s unloaded; %d probe(s) wait for it again", name, moved)
