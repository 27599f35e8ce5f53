"""The kernel's own symbol table (kallsyms), read from guest memory: no symbol file needed.

Layout (Linux 6.1, x86_64, CONFIG_KALLSYMS_BASE_RELATIVE and CONFIG_KALLSYMS_ABSOLUTE_PERCPU, as
scripts/kallsyms.c writes it into .rodata, each table 8-byte aligned, in this order):

    kallsyms_offsets        s32[N]   >= 0: an absolute value (per-cpu symbols); < 0: relative_base - 1 - off
    kallsyms_relative_base  u64      the lowest symbol address (`_text`), relocated with the kernel
    kallsyms_num_syms       u32      N
    kallsyms_names          N entries: a length (one byte, two when >= 0x80: ULEB128), then that many token
                            indexes; the tokens spell the type letter and the name
    kallsyms_markers        u32[ceil(N/256)]  offset in kallsyms_names of every 256th entry
    kallsyms_seqs_of_names  u8[3][N]  (6.1.y stable and 6.2 on) names' order; not used here
    kallsyms_token_table    256 NUL-terminated strings
    kallsyms_token_index    u16[256]  offset of each token in kallsyms_token_table

No symbol says where they are. They are found by their structure: 64-byte samples every 32 KiB from
`_text` on look for a run of kallsyms_offsets (sorted addresses, so the s32s fall steadily and decode to
addresses just above `_text`); the array is followed to its end, where relative_base and num_syms are; then
every later table is read in order. The markers and the token index are checked against what was decoded,
so a wrong guess is an error, not a wrong symbol table.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from probed.errors import TargetError
from probed.guest.linux.memory import GuestMemory, read_batch

__all__ = ["KallsymsError", "KallsymsTables", "KernelSymbols", "find_tables", "read_kallsyms"]

SAMPLE_STRIDE = 32 * 1024
SAMPLE_SIZE = 64
SAMPLE_SPAN = 96 << 20  # how far past _text the tables may lie (the image's text and rodata)
SAMPLES_PER_BATCH = 256
FOLLOW_CHUNK = 64 * 1024
NAMES_CHUNK = 256 * 1024
MAX_NAME = 512  # KSYM_NAME_LEN in 6.1

Progress = Callable[[int, int], None]  # (bytes done, bytes expected)


class KallsymsError(TargetError):
    """The kernel's kallsyms tables were not found, or did not check out."""


@dataclass(frozen=True)
class KallsymsTables:
    """Where the tables are, as offsets from `_text` (so a cache entry works at any slide)."""

    text: int
    offsets: int
    relative_base: int
    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int

    def relative(self) -> dict[str, int]:
        return {k: getattr(self, k) - self.text for k in ("offsets", "names", "markers", "token_table", "token_index")}


@dataclass
class KernelSymbols:
    """The decoded table: (name, type letter, address) by address, and the absolute (per-cpu) ones apart."""

    text: int
    symbols: list[tuple[str, str, int]] = field(default_factory=list)
    absolute: list[tuple[str, str, int]] = field(default_factory=list)
    tables: KallsymsTables | None = None
    token_table: bytes = b""


def _s32s(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 4}i", data[: len(data) // 4 * 4])


def _looks_like_offsets(data: bytes, text: int) -> bool:
    """A sample of kallsyms_offsets: negative s32s, never rising, decoding to addresses near `_text`."""
    vals = _s32s(data)
    if not vals or vals[0] == vals[-1] or any(v >= 0 for v in vals):
        return False
    if any(later > earlier for earlier, later in zip(vals, vals[1:], strict=False)):
        return False
    first, last = text - 1 - vals[0], text - 1 - vals[-1]
    return text <= first and last - first < (1 << 20) and last < text + (1 << 30)


async def find_tables(memory: GuestMemory, text: int, progress: Progress | None = None) -> KallsymsTables:
    """Locate the kallsyms tables of the kernel whose `_text` is `text`.

    Raises:
        KallsymsError: no run of kallsyms_offsets in the image, or what follows it is not the tables.
    """
    addresses = list(range(text, text + SAMPLE_SPAN, SAMPLE_STRIDE))
    rejected: list[str] = []
    skip_to = text
    for first in range(0, len(addresses), SAMPLES_PER_BATCH):
        batch = addresses[first : first + SAMPLES_PER_BATCH]
        samples = await read_batch(memory, [(a, SAMPLE_SIZE) for a in batch])
        if progress:
            progress(first + len(batch), len(addresses))
        for address, sample in zip(batch, samples, strict=True):
            if address < skip_to or not sample or not _looks_like_offsets(sample, text):
                continue
            end = await _follow_offsets(memory, address, text)
            try:
                return await _tables_after(memory, text, end)
            except KallsymsError as exc:
                rejected.append(str(exc))
                skip_to = end
    raise KallsymsError(f"no kallsyms_offsets table within {SAMPLE_SPAN >> 20} MiB of _text ({text:#x}): "
                        "is this a Linux 6.1-style x86_64 kernel with CONFIG_KALLSYMS_BASE_RELATIVE?"
                        + (f" (rejected: {'; '.join(rejected[:3])})" if rejected else ""))


async def _follow_offsets(memory: GuestMemory, start: int, text: int) -> int:
    """The address just past the last kallsyms_offsets entry, following the array from `start`."""
    prev = None
    address = start
    while True:
        chunk = await memory.read(address, FOLLOW_CHUNK)
        for i, v in enumerate(_s32s(chunk)):
            # Past the end: the zero padding, or relative_base's high half (-1), breaks the steady fall.
            if v >= 0 or (prev is not None and v > prev) or text - 1 - v >= text + (1 << 30):
                return address + 4 * i
            prev = v
        address += FOLLOW_CHUNK


async def _tables_after(memory: GuestMemory, text: int, offsets_end: int) -> KallsymsTables:
    relative_base_at = (offsets_end + 7) & ~7
    head = await memory.read(relative_base_at, 16)
    relative_base, num_syms = struct.unpack_from("<QI", head)
    if not (text - (1 << 30) < relative_base <= text) or not 1000 < num_syms < 10_000_000:
        raise KallsymsError(f"after the kallsyms_offsets run ending at {offsets_end:#x}: relative base "
                            f"{relative_base:#x}, {num_syms} symbols: not the kallsyms tables")
    offsets = relative_base_at - ((4 * num_syms + 7) & ~7)
    return KallsymsTables(text, offsets, relative_base, num_syms, relative_base_at + 16, 0, 0, 0)


def _decode_names(data: bytes, count: int, entries: list[bytes], starts: list[int], pos: int) -> int:
    """Decode entries of kallsyms_names from `pos` on into `entries` (token-index strings) and `starts` (their
    offsets) until `count` or until `data` runs out; returns where it stopped."""
    size = len(data)
    while len(entries) < count:
        if pos >= size:
            break
        length = data[pos]
        skip = 1
        if length & 0x80:
            if pos + 1 >= size:
                break
            length = (length & 0x7F) | (data[pos + 1] << 7)
            skip = 2
        if pos + skip + length > size:
            break
        starts.append(pos)
        entries.append(data[pos + skip : pos + skip + length])
        pos += skip + length
    return pos


def _parse_tokens(raw: bytes) -> tuple[list[bytes], list[int], int] | None:
    """256 NUL-terminated tokens: (tokens, offset of each, table size), or None if `raw` is not that."""
    tokens: list[bytes] = []
    offsets: list[int] = []
    pos = 0
    for _ in range(256):
        end = raw.find(b"\0", pos)
        if end <= pos:  # an empty token or no terminator: not a token table
            return None
        offsets.append(pos)
        tokens.append(raw[pos:end])
        pos = end + 1
    return tokens, offsets, pos


async def read_kallsyms(
    memory: GuestMemory, text: int, tables: KallsymsTables | None = None, progress: Progress | None = None
) -> KernelSymbols:
    """Read and decode the whole table.

    Args:
        memory: the guest.
        text: the running kernel's `_text`.
        tables: where the tables are (a cache's memory); found with `find_tables` when None.
        progress: called with (bytes read, bytes expected) as the read goes.

    Raises:
        KallsymsError: the tables are not there or do not check out (markers, token index).
    """
    if tables is None:
        tables = await find_tables(memory, text)
    n = tables.num_syms
    offsets_size = 4 * n
    expected = offsets_size + n * 14  # names average ~14 bytes an entry in 6.1
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, max(expected, done + 1))  # complete only once everything is read

    offsets_raw = bytearray()
    for at in range(tables.offsets, tables.offsets + offsets_size, NAMES_CHUNK):
        part = await memory.read(at, min(NAMES_CHUNK, tables.offsets + offsets_size - at))
        offsets_raw += part
        advance(len(part))
    offsets = _s32s(bytes(offsets_raw))
    names = bytearray()
    entries: list[bytes] = []
    starts: list[int] = []
    used = 0
    while len(entries) < n:
        part = await memory.read(tables.names + len(names), NAMES_CHUNK)
        names += part
        advance(len(part))
        used = _decode_names(names, n, entries, starts, used)
    markers_at = tables.names + ((used + 7) & ~7)
    marker_count = (n + 255) // 256
    markers = struct.unpack(f"<{marker_count}I", await memory.read(markers_at, 4 * marker_count))
    if list(markers) != [starts[i] for i in range(0, n, 256)]:
        raise KallsymsError(f"kallsyms_markers at {markers_at:#x} do not match kallsyms_names: not the tables")
    # Stable kernels from 6.1.y on (backported from 6.2) put kallsyms_seqs_of_names (3 bytes a symbol)
    # between the markers and the token table; earlier ones do not. The token index tells which.
    after_markers = markers_at + ((4 * marker_count + 7) & ~7)
    for token_table_at in (after_markers + ((3 * n + 7) & ~7), after_markers):
        tokens_raw = await memory.read(token_table_at, 8192)
        parsed = _parse_tokens(tokens_raw)
        if parsed is None:
            continue
        tokens, token_offsets, table_size = parsed
        token_index_at = token_table_at + ((table_size + 7) & ~7)
        index_raw = await memory.read(token_index_at, 512)
        if list(struct.unpack("<256H", index_raw)) == token_offsets:
            break
    else:
        raise KallsymsError(f"no kallsyms_token_table/token_index after the markers at {markers_at:#x}")
    advance(4 * marker_count + 3 * n + table_size + 512)
    if progress:
        progress(done, done)
    tables = KallsymsTables(text, tables.offsets, tables.relative_base, n, tables.names, markers_at,
                            token_table_at, token_index_at)
    out = KernelSymbols(text, tables=tables, token_table=tokens_raw[:table_size])
    expand = [t.decode("latin-1") for t in tokens]
    base = tables.relative_base
    for entry, off in zip(entries, offsets, strict=True):
        full = "".join([expand[b] for b in entry])
        kind, name = full[:1], full[1:]
        if off >= 0:
            out.absolute.append((name, kind, off))
        else:
            out.symbols.append((name, kind, base - 1 - off))
    return out


