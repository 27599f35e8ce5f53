"""The host's cache of kernel symbol tables read from guests, one entry per kernel build.

An entry is two files in the cache directory: `<key>.json` (the fingerprint and where the tables lie, as
offsets from `_text`) and `<key>.syms` (one `OFFSET TYPE NAME` line per symbol, OFFSET from `_text` in hex,
or `=VALUE` for absolute symbols). The key is a hash of the kernel's banner and its kallsyms token table:
the banner names the build (version, compiler, build number and date), the token table is derived from
every symbol name of that build.

A guest matches an entry when, at its own `_text` plus the entry's offsets, it has the same banner and the
same token table bytes: two short reads, whatever the slide. Offsets from `_text` make the entry work for
any KASLR slide.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from probed.guest.linux.kallsyms import KallsymsTables, KernelSymbols
from probed.guest.linux.memory import GuestMemory, read_batch

__all__ = ["SymbolCache", "default_cache_dir"]

_VERSION = 1
_BANNER_MAX = 512


def default_cache_dir() -> Path:
    """`$PROBED_CACHE/kallsyms`, else `$XDG_CACHE_HOME/probed/kallsyms` (~/.cache/probed/kallsyms)."""
    if os.environ.get("PROBED_CACHE"):
        return Path(os.environ["PROBED_CACHE"]) / "kallsyms"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "probed" / "kallsyms"


@dataclass(frozen=True)
class _Entry:
    key: str
    banner: bytes
    banner_offset: int
    token_table_offset: int
    token_table_sha: str
    token_table_size: int
    tables: dict[str, int]


class SymbolCache:
    """Kernel symbol tables by build, in `directory` (created when first written)."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def _entries(self) -> list[_Entry]:
        out = []
        for meta in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                raw = json.loads(meta.read_text())
                if raw.get("version") != _VERSION:
                    continue
                out.append(_Entry(meta.stem, raw["banner"].encode("latin-1"), raw["banner_offset"],
                                  raw["token_table_offset"], raw["token_table_sha"], raw["token_table_size"],
                                  raw["tables"]))
            except (OSError, ValueError, KeyError):
                continue  # a damaged or foreign file is no entry
        return out

    async def lookup(self, memory: GuestMemory, text: int) -> KernelSymbols | None:
        """The cached table of the running kernel (whose `_text` is `text`), or None."""
        entries = self._entries()
        if not entries:
            return None
        spans = []
        for e in entries:
            spans += [(text + e.banner_offset, len(e.banner)), (text + e.token_table_offset, e.token_table_size)]
        found = await read_batch(memory, spans)
        for i, e in enumerate(entries):
            banner, tokens = found[2 * i], found[2 * i + 1]
            if banner == e.banner and tokens is not None and hashlib.sha256(tokens).hexdigest() == e.token_table_sha:
                loaded = self._load(e, text)
                if loaded is not None:
                    return loaded
        return None

    def _load(self, e: _Entry, text: int) -> KernelSymbols | None:
        try:
            lines = (self.directory / f"{e.key}.syms").read_text().splitlines()
        except OSError:
            return None
        out = KernelSymbols(text)
        for line in lines:  # (the caller holds off garbage collection)
            where, kind, name = line.split(" ", 2)
            if where.startswith("="):
                out.absolute.append((name, kind, int(where[1:], 16)))
            else:
                out.symbols.append((name, kind, text + int(where, 16)))
        t = e.tables
        out.tables = KallsymsTables(text, text + t["offsets"], 0, len(out.symbols) + len(out.absolute),
                                    text + t["names"], text + t["markers"], text + t["token_table"],
                                    text + t["token_index"])
        return out

    def store(self, table: KernelSymbols, banner: bytes, banner_address: int) -> str:
        """Write a table read from a guest; returns its key. Concurrent writers each write whole files."""
        assert table.tables is not None
        banner = banner.split(b"\0", 1)[0][:_BANNER_MAX]
        key = hashlib.sha256(banner + b"\0" + table.token_table).hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        text = table.text
        lines = [f"={value:x} {kind} {name}" for name, kind, value in table.absolute]
        lines += [f"{address - text:x} {kind} {name}" for name, kind, address in table.symbols]
        meta = {
            "version": _VERSION,
            "banner": banner.decode("latin-1"),
            "banner_offset": banner_address - text,
            "token_table_offset": table.tables.token_table - text,
            "token_table_sha": hashlib.sha256(table.token_table).hexdigest(),
            "token_table_size": len(table.token_table),
            "tables": table.tables.relative(),
        }
        # The symbols first, the fingerprint last: an entry without its .json is not used.
        for suffix, content in ((".syms", "\n".join(lines) + "\n"), (".json", json.dumps(meta, indent=1) + "\n")):
            tmp = self.directory / f"{key}{suffix}.{os.getpid()}.tmp"
            tmp.write_text(content)
            tmp.replace(self.directory / f"{key}{suffix}")
        return key
