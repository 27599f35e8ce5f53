"""The running Linux kernel as probed sees it: where it is (KASLR), its symbols, its modules.

`LinuxKernel.setup` runs once when the engine attaches, while the guest is stopped (an engine attach hook):

1. `_text` is found in guest memory (`kaslr.find_kernel_text`); the slide is `_text - 0xffffffff81000000`.
2. With kernel symbol files (`--symbols` naming `_text`): each is moved by `_text(running) - _text(file)`
   and checked against the guest (`kaslr.check_file`); a file of another build is refused.
3. Without one: the kernel's kallsyms tables are read from guest memory (`kallsyms.read_kallsyms`), or taken
   from the host's cache when this build was read before (`symcache.SymbolCache`), and loaded as the
   symbol file `vmlinux`.
4. Loaded modules become symbol files of their own, and module load/unload is followed
   (`modules.ModuleTracker`).
5. The boot is remembered (`reboot.Reboots`): when the guest reboots, in place or behind a reconnect, the
   probes are taken out and placed again in the new kernel (`move_to` moves the model to its slide).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from probed.errors import ProbedError
from probed.guest.linux.kallsyms import KernelSymbols, read_kallsyms
from probed.guest.linux.kaslr import (
    LINK_TEXT,
    check_against_kallsyms,
    check_file,
    file_text,
    find_kernel_text,
)
from probed.guest.linux.memory import GuestMemory, RspMemory, read_batch
from probed.guest.linux.symcache import SymbolCache
from probed.guest.symbols import SymbolFile, SymbolStore, no_gc_pauses

__all__ = ["KERNEL_FILE", "LinuxKernel", "is_linux_kernel", "use_linux"]

log = logging.getLogger(__name__)

KERNEL_FILE = "vmlinux"
"""The name of the symbol file made from the guest's own kallsyms."""

_CODE = frozenset("tTwW")

Progress = Callable[[str, int, int], None]  # (what, done, total)


def is_linux_kernel(symbols: SymbolStore) -> bool:
    """Whether a loaded symbol file is an x86_64 Linux kernel's (it has `_text` and `linux_banner` up high)."""
    for sf in symbols.files():
        text = file_text(sf)
        if text is not None and text >= 0xFFFF_FFFF_8000_0000:
            return True
    return False


def kernel_entries(table: KernelSymbols, link_text: int) -> list[tuple[str, int, int, str]]:
    """The table as SymbolFile entries at link addresses (`link_text` is where `_text` would be unslid)."""
    delta = link_text - table.text
    return [(name, address + delta, 0, "code" if kind in _CODE else "data") for name, kind, address in table.symbols]


def use_linux(engine, kernel: LinuxKernel | None = None) -> LinuxKernel:
    """Make `engine` treat its guest as a Linux kernel: `kernel.setup` runs when it attaches, and a reboot of
    the guest is followed (`engine.reboot`, probed.guest.linux.reboot)."""
    from probed.guest.linux.reboot import Reboots

    kernel = kernel or LinuxKernel()
    engine.linux = kernel
    engine.reboot = Reboots(engine, kernel)
    engine.attach_hooks.append(kernel.setup)
    return kernel


class LinuxKernel:
    """The Linux guest model of one engine.

    Args:
        cache: the host's cache of kernel symbol tables (None: the default directory; False: no cache).
        progress: called as symbols are read (what, done, total), for a progress bar.
        modules: follow loaded modules and module load/unload.
        memory: makes the guest-memory reader from the engine (default: the gdbstub's `m` packets,
            `RspMemory`); a faster reader of guest RAM plugs in here.

    Attributes (after setup):
        text: the running kernel's `_text`.
        slide: its KASLR slide (`text - 0xffffffff81000000`).
        source: where the kernel symbols came from: "file", "guest kallsyms" or "cache".
        evidence: what was checked to accept a symbol file.
        setup_seconds: how long setup took.
    """

    def __init__(self, *, cache: SymbolCache | Path | bool | None = None, progress: Progress | None = None,
                 modules: bool = True, memory: Callable[[Any], GuestMemory] | None = None):
        if cache is False:
            self.cache = None
        elif isinstance(cache, SymbolCache):
            self.cache = cache
        else:
            self.cache = SymbolCache(cache if isinstance(cache, Path) else None)
        self.progress = progress
        self.follow_modules = modules
        self.text: int | None = None
        self.slide: int | None = None
        self.source: str | None = None
        self.evidence: list[str] = []
        self.percpu: dict[str, int] = {}
        self.setup_seconds = 0.0
        self.modules = None  # a probed.guest.linux.modules.ModuleTracker once set up
        self.memory: GuestMemory | None = None
        self._make_memory = memory or (lambda engine: RspMemory(engine.target))
        self.kernel_files: list[str] = []
        self.banner: bytes | None = None  # linux_banner's bytes (to tell this build after a reboot)
        self.banner_address = 0

    async def setup(self, engine) -> None:
        """The engine's attach hook: find the kernel, its symbols and its modules (the guest is stopped).

        Raises:
            KernelMismatch: a symbol file is not the running kernel.
            KallsymsError: no symbol file, and the kallsyms tables cannot be read.
            TargetError: not an x86_64 Linux kernel.
        """
        started = time.monotonic()
        memory = self.memory = self._make_memory(engine)
        self.text = await find_kernel_text(memory)
        self.slide = self.text - LINK_TEXT
        kernel_files = [sf for sf in engine.symbols.files() if file_text(sf) is not None or _in_kernel_window(sf)]
        if kernel_files:
            for sf in kernel_files:
                await self._rebase(memory, engine.symbols, sf)
            self.kernel_files = [sf.name for sf in kernel_files]
            self.source = "file"  # (checked against the kernel's kallsyms when it has nothing else to check by)
        else:
            with no_gc_pauses():
                await self._load_kallsyms(memory, engine.symbols)
        if self.follow_modules:
            from probed.guest.linux.modules import ModuleTracker

            self.modules = ModuleTracker(engine, memory)
            await self.modules.start()
        await self._read_banner(engine)
        if getattr(engine, "reboot", None) is not None:
            await engine.reboot.remember()
        self.setup_seconds = time.monotonic() - started
        log.info("linux: _text at %#x (KASLR slide %#x), symbols from %s, in %.2f s", self.text, self.slide,
                 self.source, self.setup_seconds)

    async def _read_banner(self, engine) -> None:
        try:
            self.banner_address = engine.symbols.lookup("linux_banner").address
        except ProbedError:
            self.banner = None
            return
        (banner,) = await read_batch(self.memory, [(self.banner_address, 512)])
        self.banner = banner.split(b"\0", 1)[0] + b"\0" if banner else None

    async def move_to(self, engine, text: int) -> None:
        """The guest rebooted into this build with `_text` at `text`: move the kernel's symbol files there
        (a file given by the user is checked again, as at attach).

        Raises:
            KernelMismatch: a kernel symbol file is not the new kernel.
        """
        self.text, self.slide = text, text - LINK_TEXT
        self.evidence = []
        for name in self.kernel_files:
            sf = engine.symbols.file(name)
            if name == KERNEL_FILE:
                engine.symbols.set_bias(name, self.slide)  # the guest's own table, at link addresses
            else:
                await self._rebase(self.memory, engine.symbols, sf)
        await self._read_banner(engine)
        log.info("linux: the rebooted kernel's _text at %#x (KASLR slide %#x)", self.text, self.slide)

    async def _rebase(self, memory: GuestMemory, symbols: SymbolStore, sf: SymbolFile) -> None:
        text = file_text(sf)
        if text is None:
            # No _text to anchor on (an export list): the slide that puts most names where the kernel's own
            # kallsyms has them, then checked like any file with nothing else to check by.
            bias = _likeliest_bias(sf, (await self._kernel_table(memory)).symbols)
            evidence = check_against_kallsyms(sf, bias, (await self._kernel_table(memory)).symbols)
        else:
            bias = self.text - text
            evidence = await check_file(memory, sf, bias, _elf_banner(sf))
            if not evidence.checks:
                evidence = check_against_kallsyms(sf, bias, (await self._kernel_table(memory)).symbols)
        symbols.set_bias(sf.name, bias)
        self.evidence += [f"{sf.name}: {line}" for line in evidence.checks]

    async def _load_kallsyms(self, memory: GuestMemory, symbols: SymbolStore) -> None:
        table = await self._kernel_table(memory)
        self.percpu = {name: value for name, _, value in table.absolute}
        self.kernel_files = [KERNEL_FILE]
        symbols.add(SymbolFile.from_entries(KERNEL_FILE, f"<guest kallsyms, {len(table.symbols)} symbols>",
                                            kernel_entries(table, LINK_TEXT), bias=self.slide))

    async def _kernel_table(self, memory: GuestMemory) -> KernelSymbols:
        """The kernel's kallsyms, from the host's cache or read from the guest (and then cached)."""
        table = await self.cache.lookup(memory, self.text) if self.cache is not None else None
        if table is not None:
            self.source = "cache"
        else:
            report = (lambda done, total: self.progress("kallsyms", done, total)) if self.progress else None
            table = await read_kallsyms(memory, self.text, progress=report)
            self.source = "guest kallsyms"
            banner_at = next((a for n, _, a in table.symbols if n == "linux_banner"), None)
            if self.cache is not None and banner_at is not None:
                (banner,) = await read_batch(memory, [(banner_at, 512)])
                if banner:
                    try:
                        self.cache.store(table, banner, banner_at)
                    except OSError as exc:
                        log.warning("linux: cannot cache the kernel symbols in %s: %s", self.cache.directory, exc)
        return table

    def is_kernel_file(self, name: str) -> bool:
        """Whether the symbol file `name` describes the kernel itself (not a module)."""
        return name in self.kernel_files

    def status(self) -> dict[str, Any]:
        """What `probectl status` shows of the kernel."""
        out: dict[str, Any] = {
            "kernel_text": f"{self.text:#x}" if self.text is not None else None,
            "kaslr_slide": f"{self.slide:#x}" if self.slide is not None else None,
            "kernel_symbols": self.source,
        }
        if self.modules is not None:
            out["modules"] = self.modules.loaded_names()
        return out


def _in_kernel_window(sf: SymbolFile) -> bool:
    """Whether most of a file's symbols lie in the x86_64 kernel image window (a kernel's file without _text)."""
    inside = sum(0xFFFF_FFFF_8000_0000 <= s.address - sf.bias < 0xFFFF_FFFF_C000_0000 for s in sf.symbols())
    return inside > len(sf) // 2


def _likeliest_bias(sf: SymbolFile, kernel: list[tuple[str, str, int]]) -> int:
    """The commonest (kernel address - file link address) over names found once in each."""
    live: dict[str, int | None] = {}
    for name, _, address in kernel:
        live[name] = None if name in live else address
    votes: dict[int, int] = {}
    for sym in sf.symbols():
        address = live.get(sym.name)
        if address is not None:
            delta = address - (sym.address - sf.bias)
            votes[delta] = votes.get(delta, 0) + 1
    return max(votes, key=votes.get) if votes else 0


def _elf_banner(sf: SymbolFile) -> bytes | None:
    """The banner bytes an ELF symbol file carries (to compare with the guest's), else None."""
    if not sf.sections:
        return None
    try:
        from elftools.elf.elffile import ELFFile

        banner = next((s for s in sf.symbols() if s.name == "linux_banner"), None)
        if banner is None:
            return None
        link = banner.address - sf.bias
        with Path(sf.path).open("rb") as f:
            elf = ELFFile(f)
            for section in elf.iter_sections():
                start, size = section["sh_addr"], section["sh_size"]
                if section["sh_type"] != "SHT_NOBITS" and start <= link < start + size:
                    data = section.data()
                    return data[link - start : link - start + 512].split(b"\0", 1)[0]
    except Exception:  # a damaged ELF: the banner is then only checked for its shape
        return None
    return None
