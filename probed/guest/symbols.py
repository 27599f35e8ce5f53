"""Symbols: ELF symbol tables, System.map and /proc/kallsyms dumps, relocation, and probe specs.

A probe is tracked by file, symbol and offset, not by raw address: when a file's bias changes (a module or
a kernel loaded elsewhere) every location in it is resolved again (`SymbolStore.relocate`).
"""

from __future__ import annotations

import bisect
import difflib
import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple

from probed.errors import BadSpec, NotFound, UnknownSymbol

__all__ = ["Location", "Symbol", "SymbolFile", "SymbolStore", "no_gc_pauses", "parse_file_arg", "parse_number"]

_CODE_LETTERS = frozenset("tTwW")
_SYMBOLIZE_LOOKBACK = 16  # distinct addresses symbolize looks back over for an enclosing symbol
_MAP_LINE = re.compile(rb"^([0-9a-fA-F]+)\s+([a-zA-Z?])\s+(\S+)(?:\s+\[(\S+)\])?")


class Symbol(NamedTuple):
    """A symbol at its biased address (a named tuple: a kernel has ~100,000 and they are made in bulk)."""

    name: str
    address: int
    size: int
    kind: str  # "code" or "data"
    file: str


@dataclass(frozen=True)
class Location:
    """Where a probe is: the spec it came from, and what it resolved to."""

    spec: str
    file: str | None
    symbol: str | None
    offset: int
    address: int


def parse_number(text: str) -> int:
    """A decimal or 0x-hex number.

    Raises:
        ValueError: not a number.
    """
    text = text.strip()
    return int(text, 16) if text.lower().startswith(("0x", "-0x")) else int(text, 10)


def parse_file_arg(arg: str) -> tuple[str, int]:
    """`PATH[@BIAS]` to (path, bias), e.g. `vmlinux@0x1000000`.

    Raises:
        BadSpec: the bias is not a number.
    """
    path, sep, bias = arg.rpartition("@")
    if not sep:
        return arg, 0
    try:
        return path, parse_number(bias)
    except ValueError:
        raise BadSpec(arg, f"bad bias {bias!r} (decimal or 0x hex)") from None


@contextmanager
def no_gc_pauses():
    """No garbage collection while ~100,000 symbols are made at once: every young-generation pass would
    walk them all again (they are made in seconds otherwise, on a busy host)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_EXTENSIONS = {".elf", ".txt", ".map", ".sym", ".syms", ".debug", ".dbg", ".ko", ".o", ".so", ".out", ".bin"}


def short_name(path: Path) -> str:
    """How specs name a symbol file by default: its file name less one known extension.

    Version numbers stay whole: `kallsyms-6.1.0-57-amd64.txt` is `kallsyms-6.1.0-57-amd64`, `guest.elf`
    is `guest`, `System.map-6.1.0-57-amd64` keeps its name.
    """
    name = path.name
    suffix = path.suffix
    return name[: -len(suffix)] if suffix.lower() in _EXTENSIONS and len(name) > len(suffix) else name


class SymbolFile:
    """One loaded symbol file: its symbols at link addresses, and a bias added to each."""

    def __init__(
        self,
        name: str,
        path: Path,
        raw: list[tuple[str, int, int, str]],
        bias: int = 0,
        sections: list[tuple[int, int, bool]] | None = None,
    ):
        self.name = name
        self.path = path
        self.bias = bias
        self._raw = raw  # (name, link address, size, kind), sorted by address
        # The image's allocated sections (link address, size, writable), from an ELF's section headers.
        self.sections = sections or []
        self._made: tuple[int, list[Symbol]] | None = None  # (bias, symbols at that bias), made when first asked

    @classmethod
    def load(cls, path: str | Path, bias: int = 0, name: str | None = None) -> SymbolFile:
        """Read an ELF, a System.map or a kallsyms dump (told apart by content).

        Raises:
            NotFound: the file does not exist.
            BadSpec: it is none of the three formats.
        """
        path = Path(path)
        try:
            head = path.open("rb").read(4)
        except OSError as exc:
            raise NotFound(f"symbol file {path} ({exc.strerror})") from None
        is_elf = head == b"\x7fELF"
        try:
            with no_gc_pauses():
                raw = _load_elf(path) if is_elf else _load_map(path)
        except Exception as exc:  # pyelftools raises several types on a damaged ELF
            raise BadSpec(str(path), f"cannot read symbols: {exc}") from None
        if not raw and is_elf:
            raise BadSpec(str(path), "the ELF has no symbol table (stripped?)")
        if not raw:
            raise BadSpec(str(path), "no symbols found (expected an ELF, a System.map or a kallsyms dump)")
        if not is_elf and raw[-1][1] == 0:
            raise BadSpec(str(path), "every address is 0: dump /proc/kallsyms as root (kernel.kptr_restrict hides them)")
        sections = _elf_sections(path) if is_elf else []
        return cls(name or short_name(path), path, raw, bias, sections)

    @classmethod
    def from_entries(
        cls, name: str, origin: str, entries: list[tuple[str, int, int, str]], bias: int = 0
    ) -> SymbolFile:
        """A file made from symbols read elsewhere (a kernel's kallsyms tables in guest memory, a module).

        Args:
            name: how specs name it (`name:sym`).
            origin: where the symbols came from, shown where a path would be.
            entries: (name, link address, size or 0, "code" or "data"); a size of 0 extends to the next symbol.
            bias: added to every address.
        """
        with no_gc_pauses():
            return cls(name, Path(origin), _fill_sizes(list(entries)), bias)

    def symbols(self) -> Iterator[Symbol]:
        """Every symbol of the file at its current bias, by address."""
        if self._made is None or self._made[0] != self.bias:
            bias, name = self.bias, self.name
            with no_gc_pauses():
                self._made = (bias, [Symbol(n, addr + bias, size, kind, name) for n, addr, size, kind in self._raw])
        return iter(self._made[1])

    def __len__(self) -> int:
        return len(self._raw)


def _fill_sizes(entries: list[tuple[str, int, int, str]]) -> list[tuple[str, int, int, str]]:
    """Sort by address; a symbol without a size extends to the next symbol."""
    entries.sort(key=lambda e: e[1])
    addrs = [e[1] for e in entries]
    out = []
    for i, (name, addr, size, kind) in enumerate(entries):
        if size <= 0:
            j = bisect.bisect_right(addrs, addr, i)
            size = addrs[j] - addr if j < len(addrs) else 0
        out.append((name, addr, size, kind))
    return out


def _load_map(path: Path) -> list[tuple[str, int, int, str]]:
    entries = []
    with path.open("rb") as f:
        for line in f:
            m = _MAP_LINE.match(line)
            if m is None:
                continue
            letter = m.group(2).decode()
            if letter in "uUvV":
                continue
            entries.append((m.group(3).decode(errors="replace"), int(m.group(1), 16), 0, "code" if letter in _CODE_LETTERS else "data"))
    return _fill_sizes(entries)


def _load_elf(path: Path) -> list[tuple[str, int, int, str]]:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    entries = []
    with path.open("rb") as f:
        elf = ELFFile(f)
        exec_sections = {
            i for i, s in enumerate(elf.iter_sections()) if s["sh_flags"] & 0x4  # SHF_EXECINSTR
        }
        for section in elf.iter_sections():
            if not isinstance(section, SymbolTableSection) or section.name != ".symtab":
                continue
            for sym in section.iter_symbols():
                st_type = sym["st_info"]["type"]
                shndx = sym["st_shndx"]
                if not sym.name or shndx == "SHN_UNDEF" or st_type in ("STT_FILE", "STT_SECTION", "STT_TLS"):
                    continue
                if shndx == "SHN_ABS" and sym["st_value"] == 0:
                    continue  # linker-script and assembler constants, not places in the image
                if sym.name.startswith("$"):
                    continue  # ARM/RISC-V mapping symbols ($x, $d): mark instruction sets, not functions
                if st_type == "STT_FUNC":
                    kind = "code"
                elif st_type == "STT_OBJECT":
                    kind = "data"
                else:
                    kind = "code" if isinstance(shndx, int) and shndx in exec_sections else "data"
                entries.append((sym.name, sym["st_value"], sym["st_size"], kind))
    return _fill_sizes(entries)


def _elf_sections(path: Path) -> list[tuple[int, int, bool]]:
    """The sections the image occupies in memory: (link address, size, writable).

    Writable means SHF_WRITE, except Linux's `.data..ro_after_init`, which turns read-only after boot.
    """
    from elftools.elf.elffile import ELFFile

    out = []
    with path.open("rb") as f:
        for section in ELFFile(f).iter_sections():
            flags = section["sh_flags"]
            if flags & 0x2 and section["sh_addr"] and section["sh_size"]:  # SHF_ALLOC
                writable = bool(flags & 0x1) and "ro_after_init" not in section.name
                out.append((section["sh_addr"], section["sh_size"], writable))
    return out


class SymbolStore:
    """Every loaded symbol file, looked up together."""

    def __init__(self) -> None:
        self._files: dict[str, SymbolFile] = {}
        self._by_name: dict[str, list[Symbol]] | None = None
        self._sorted: list[Symbol] | None = None
        self._names_at: dict[int, str | None] = {}
        self._addrs: list[int] = []
        self._image: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None

    # -- files --------------------------------------------------------------------------------------

    def add_file(self, path: str | Path, bias: int = 0, name: str | None = None) -> SymbolFile:
        """Load a symbol file (replacing one of the same name).

        Args:
            path: an ELF, a System.map or a kallsyms dump.
            bias: added to every address (where the image is loaded relative to its link address).
            name: how specs name the file (`name:sym`); default the file's stem.

        Returns:
            The loaded file.

        Raises:
            NotFound, BadSpec: see `SymbolFile.load`.
        """
        sf = SymbolFile.load(path, bias, name)
        self._files[sf.name] = sf
        self._invalidate()
        return sf

    def add(self, sf: SymbolFile) -> SymbolFile:
        """Add a file made elsewhere (`SymbolFile.from_entries`), replacing one of the same name."""
        self._files[sf.name] = sf
        self._invalidate()
        return sf

    def remove_file(self, name: str) -> None:
        """Forget a file (a module that was unloaded); nothing happens if there is none by that name."""
        if self._files.pop(name, None) is not None:
            self._invalidate()

    def has_file(self, name: str) -> bool:
        """Whether a file by that name is loaded."""
        return name in self._files

    def files(self) -> list[SymbolFile]:
        """The loaded files, in load order."""
        return list(self._files.values())

    def file(self, name: str) -> SymbolFile:
        """A loaded file by name.

        Raises:
            NotFound: no file by that name (the message lists the loaded ones).
        """
        try:
            return self._files[name]
        except KeyError:
            raise NotFound(f"symbol file {name!r} (loaded: {', '.join(self._files) or 'none'})") from None

    def set_bias(self, file_name: str, bias: int) -> None:
        """Relocate a file: its symbols move to link address + bias.

        Raises:
            NotFound: no file by that name.
        """
        self.file(file_name).bias = bias
        self._invalidate()

    def image_ranges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Where the loaded images lie in memory, at their biases: (all sections, writable ones), each a
        list of (start, end). Only ELF files know their sections."""
        if self._image is not None:
            return self._image
        readable, writable = [], []
        for f in self._files.values():
            for address, size, rw in f.sections:
                span = (address + f.bias, address + f.bias + size)
                readable.append(span)
                if rw:
                    writable.append(span)
        self._image = (readable, writable)
        return self._image

    def _invalidate(self) -> None:
        self._image = None
        self._by_name = None
        self._sorted = None
        self._names_at.clear()

    def _index(self) -> dict[str, list[Symbol]]:
        if self._by_name is None:
            by_name: dict[str, list[Symbol]] = {}
            with no_gc_pauses():
                for sf in self._files.values():
                    for sym in sf.symbols():
                        by_name.setdefault(sym.name, []).append(sym)
            self._by_name = by_name
        return self._by_name

    def _address_index(self) -> list[Symbol]:
        if self._sorted is None:
            with no_gc_pauses():
                syms = [s for sf in self._files.values() for s in sf.symbols()]
                # At one address prefer code, then the name with the fewest leading underscores
                # (`startup_64` over `_text`, `ksys_read` over `__ksys_read`).
                syms.sort(key=lambda s: (s.address, s.kind != "code", len(s.name) - len(s.name.lstrip("_"))))
            self._sorted = syms
            self._addrs = [s.address for s in syms]
        return self._sorted

    # -- lookups ------------------------------------------------------------------------------------

    def lookup(self, name: str, file: str | None = None) -> Symbol:
        """A symbol by name (code preferred when names repeat).

        Raises:
            UnknownSymbol: with close matches.
        """
        candidates = self._index().get(name, [])
        if file is not None:
            self.file(file)
            candidates = [s for s in candidates if s.file == file]
        if not candidates:
            raise UnknownSymbol(name, self.close_matches(name), file)
        code = [s for s in candidates if s.kind == "code"]
        return (code or candidates)[0]

    def close_matches(self, name: str, n: int = 5) -> list[str]:
        """Names like `name` (quick: a cheap prefilter before difflib)."""
        names = self._index().keys()
        low = name.lower()
        lo, hi = len(name) - 3, len(name) + 3
        head, tail = low[:2], low[-3:]
        pool = [
            s for s in names
            if (lo <= len(s) <= hi and (s[:2].lower() == head or s[-3:].lower() == tail)) or (len(low) > 3 and low in s.lower())
        ]
        return difflib.get_close_matches(name, pool, n=n, cutoff=0.6)

    def symbolize(self, address: int) -> str | None:
        """`sym` or `sym+0xoff` for an address inside a known symbol, else None.

        Of several symbols at one address the preferred is a code symbol, then the one with the fewest
        leading underscores. Answers are remembered (a probe's pc is asked for at every hit).
        """
        try:
            return self._names_at[address]
        except KeyError:
            pass
        if len(self._names_at) > 65536:
            self._names_at.clear()
        name = self._names_at[address] = self._symbolize(address)
        return name

    def _symbolize(self, address: int) -> str | None:
        syms = self._address_index()
        addrs = self._addrs
        i = bisect.bisect_right(addrs, address) - 1
        # Walk back over a few earlier addresses too: a function may contain labels that end before `address`.
        for _ in range(_SYMBOLIZE_LOOKBACK):
            if i < 0:
                break
            first = bisect.bisect_left(addrs, addrs[i], 0, i)
            for sym in syms[first : i + 1]:
                if address < sym.address + max(sym.size, 1):
                    off = address - sym.address
                    return sym.name if off == 0 else f"{sym.name}+{off:#x}"
            i = first - 1
        return None

    def functions(self, glob: str = "*") -> Iterator[Symbol]:
        """Code symbols whose names match a glob, by address."""
        for sym in self._address_index():
            if sym.kind == "code" and fnmatchcase(sym.name, glob):
                yield sym

    # -- specs --------------------------------------------------------------------------------------

    def _parse_spec(self, spec: str) -> tuple[str | None, str | None, int]:
        """(file or None, symbol or None, offset or absolute address) of a probe spec."""
        text = spec.strip()
        file = None
        if ":" in text:
            file, _, text = text.partition(":")
            self.file(file)
        if text.lower().startswith("0x"):
            try:
                return file, None, int(text, 16)
            except ValueError:
                raise BadSpec(spec, f"bad address {text!r} (0x hex)") from None
        sym, sep, off = text.partition("+")
        if not sym or sym[0].isdigit():
            raise BadSpec(spec, "expected sym, sym+off, file:sym+off or 0xADDR")
        try:
            offset = parse_number(off) if sep else 0
        except ValueError:
            raise BadSpec(spec, f"bad offset {off!r} (decimal or 0x hex)") from None
        if offset < 0:
            raise BadSpec(spec, "the offset must not be negative")
        return file, sym, offset

    def resolve(self, spec: str) -> Location:
        """A code location from `sym`, `sym+off`, `file:sym+off` or `0xADDR`.

        Raises:
            UnknownSymbol, BadSpec: unknown name, offset past the symbol, data not code, bad syntax.
        """
        file, name, value = self._parse_spec(spec)
        if name is None:
            return Location(spec, file, None, 0, value)
        sym = self.lookup(name, file)
        if sym.kind != "code":
            raise BadSpec(spec, f"{name} is data, not code (use a watchpoint for data)")
        if sym.size and value >= sym.size:
            raise BadSpec(spec, f"offset {value:#x} is past the end of {name} (size {sym.size:#x})")
        return Location(spec, sym.file, sym.name, value, sym.address + value)

    def resolve_data(self, spec: str) -> tuple[Location, int]:
        """A data location (any symbol, or an address) and the size of the symbol there (0 if unknown)."""
        file, name, value = self._parse_spec(spec)
        if name is None:
            return Location(spec, file, None, 0, value), 0
        sym = self.lookup(name, file)
        if sym.size and value >= sym.size:
            raise BadSpec(spec, f"offset {value:#x} is past the end of {name} (size {sym.size:#x})")
        return Location(spec, sym.file, sym.name, value, sym.address + value), (sym.size if not value else 0)

    def relocate(self, location: Location) -> Location:
        """The same file, symbol and offset at the file's current bias."""
        if location.symbol is None:
            return location
        sym = self.lookup(location.symbol, location.file)
        return Location(location.spec, sym.file, sym.name, location.offset, sym.address + location.offset)
