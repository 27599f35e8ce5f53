"""User-space probe specs (`PATH:OFFSET`, `PATH:SYMBOL[+OFF]`, uprobe_events' syntax) and the ELF file behind them.

OFFSET is into the file, as uprobe_events takes it (hex, `0x` optional). A SYMBOL is looked up in a host copy
of the guest's file (`file_copy`, read with pyelftools), and its virtual address turned into a file offset
through the program header that loads it: that offset is the same in every process, whatever base the
file is mapped at (PIE, shared libraries, ASLR). A 32-bit ELF (i386) is read the same way.

A probe added by symbol is saved (the daemon's state file, `probectl save`) with the file offset the symbol
resolved to: the offset is what the probe is, as uprobe_events keeps it, so a restarted daemon re-adds it
without the copy (`copy_for_saved`).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probed.errors import BadSpec, UnknownSymbol

__all__ = ["UserSpec", "UserElf", "copy_for_saved", "parse_user_spec", "is_user_spec"]

log = logging.getLogger(__name__)

_MACHINES = {"EM_386": "i386", "EM_X86_64": "x86_64", "EM_AARCH64": "aarch64", "EM_RISCV": "riscv64"}
_SPEC = re.compile(r"^(?P<path>/[^:]+):(?P<where>[^:]+)$")
_OFFSET = re.compile(r"^(0[xX])?[0-9a-fA-F]+$")
_SYMBOL = re.compile(r"^(?P<sym>[A-Za-z_.$][\w.$@]*)(?:\+(?P<off>(0[xX])?[0-9a-fA-F]+))?$")


@dataclass(frozen=True)
class UserSpec:
    """A parsed user probe spec: the guest path and either a file offset or a symbol (+ offset)."""

    path: str
    offset: int | None
    symbol: str | None = None
    symbol_offset: int = 0


def is_user_spec(spec: str) -> bool:
    """Whether `spec` names a file in the guest (`/PATH:...`) rather than a kernel location."""
    return bool(_SPEC.match(spec))


def parse_user_spec(spec: str) -> UserSpec:
    """Parse `PATH:OFFSET` or `PATH:SYMBOL[+OFF]`.

    Raises:
        BadSpec: naming the column where it goes wrong.
    """
    m = _SPEC.match(spec)
    if not m:
        raise BadSpec(spec, "a user probe is /PATH:OFFSET or /PATH:SYMBOL[+OFF] (an absolute path in the guest)")
    where = m.group("where")
    if _OFFSET.match(where) and (where.lower().startswith("0x") or not _SYMBOL.match(where)):
        return UserSpec(m.group("path"), int(where, 16))
    sm = _SYMBOL.match(where)
    if not sm:
        raise BadSpec(spec, f"column {m.start('where') + 1}: expected a hex file offset or SYMBOL[+OFF], got {where!r}")
    off = sm.group("off")
    return UserSpec(m.group("path"), None, sm.group("sym"), int(off, 16) if off else 0)


class UserElf:
    """A host copy of a guest's ELF file: its function symbols as file offsets.

    Raises:
        BadSpec: the file cannot be read or is not ELF.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                elf = ELFFile(f)
                # The instruction set its code is decoded with (probed.guest.insn's names), None if unknown.
                self.arch_name: str | None = _MACHINES.get(elf["e_machine"])
                self._segments = [(s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in elf.iter_segments()
                                  if s["p_type"] == "PT_LOAD"]
                self._symbols: dict[str, tuple[int, int]] = {}
                for name in (".symtab", ".dynsym"):
                    table = elf.get_section_by_name(name)
                    if table is None:
                        continue
                    for sym in table.iter_symbols():
                        if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and sym["st_value"]:
                            self._symbols.setdefault(sym.name, (sym["st_value"], sym["st_size"]))
        except (OSError, ELFError) as exc:
            raise BadSpec(str(path), f"cannot read the file copy as ELF: {exc}") from None

    async def read_many(self, requests: list[tuple[int, int]]) -> list[bytes | Exception]:
        """Bytes of the file at file offsets (the shape of the target's batched read, for decoding code)."""
        out: list[bytes | Exception] = []
        with self.path.open("rb") as f:
            for offset, length in requests:
                f.seek(offset)
                out.append(f.read(length))
        return out

    def file_offset(self, vaddr: int) -> int | None:
        for start, offset, size in self._segments:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        return None

    def resolve(self, symbol: str, offset: int = 0) -> int:
        """The file offset of `symbol+offset`.

        Raises:
            UnknownSymbol: with close matches.
        """
        if symbol not in self._symbols:
            raise UnknownSymbol(symbol, difflib.get_close_matches(symbol, list(self._symbols), n=5), file=str(self.path))
        vaddr, size = self._symbols[symbol]
        if size and offset >= size:
            raise BadSpec(f"{symbol}+{offset:#x}", f"{symbol} is {size:#x} bytes long")
        file_offset = self.file_offset(vaddr + offset)
        if file_offset is None:
            raise BadSpec(f"{symbol}+{offset:#x}", "the address is in no loadable segment of the file")
        return file_offset

    @cached_property
    def _by_offset(self) -> list[tuple[int, int, str]]:
        rows = []
        for name, (vaddr, size) in self._symbols.items():
            off = self.file_offset(vaddr)
            if off is not None:
                rows.append((off, size, name))
        return sorted(rows)

    def symbolize(self, file_offset: int) -> str | None:
        """`symbol+0xoff` of a file offset, or None when no function covers it."""
        best = None
        for off, size, name in self._by_offset:
            if off > file_offset:
                break
            if file_offset < off + max(size, 1):
                best = (off, name)
        if best is None:
            return None
        return best[1] if best[0] == file_offset else f"{best[1]}+{file_offset - best[0]:#x}"


def copy_for_saved(file_copy: str | None, spec: UserSpec, file_offset: int) -> UserElf | None:
    """The host copy of a probe re-added from its saved file offset, for naming places only; None when it
    is gone, unreadable, or no longer puts `spec`'s symbol at that offset (rebuilt since: the guest's file,
    which the probe is on, is what the offset was taken from)."""
    if not file_copy or spec.symbol is None:
        return None
    try:
        elf = UserElf(file_copy)
        now = elf.resolve(spec.symbol, spec.symbol_offset)
    except (BadSpec, UnknownSymbol) as exc:
        log.warning("the file copy %s cannot name places of the saved probe on %s: %s", file_copy, spec.path, exc)
        return None
    if now != file_offset:
        log.warning("the file copy %s puts %s at %#x, not at the saved offset %#x: not used to name places",
                    file_copy, spec.symbol, now, file_offset)
        return None
    return elf
