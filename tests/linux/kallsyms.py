"""The guest's /proc/kallsyms as it arrives on the second serial port, and reading the dump back.

On the wire (tests/linux/init.sh): a gzip stream of /proc/kallsyms, then the line "PROBED KALLSYMS END".
Compressing cuts what crosses the emulated UART, byte by byte under TCG, to a fifth.
"""

from __future__ import annotations

import zlib
from pathlib import Path

__all__ = ["END_MARKER", "KallsymsDumpError", "decode_dump", "read_symbols"]

END_MARKER = b"PROBED KALLSYMS END"


class KallsymsDumpError(ValueError):
    """The capture ended with the marker but its gzip stream is damaged (e.g. the serial port was not raw)."""


def decode_dump(capture: bytes) -> str | None:
    """/proc/kallsyms's text from a complete capture of the second serial port.

    Args:
        capture: the serial file's bytes so far.

    Returns:
        The text, or None while the end marker has not arrived.

    Raises:
        KallsymsDumpError: the marker is there but the gzip stream before it does not decompress.
    """
    if END_MARKER not in capture[-64:]:
        return None
    unzip = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
    try:
        text = unzip.decompress(capture)
    except zlib.error as exc:
        raise KallsymsDumpError(f"the kallsyms dump ({len(capture)} bytes) is not a clean gzip stream: {exc}") from exc
    if not unzip.eof or not unzip.unused_data.strip().endswith(END_MARKER):
        raise KallsymsDumpError(f"the kallsyms gzip stream is cut short or followed by {unzip.unused_data[:40]!r}")
    return text.decode()


def read_symbols(path: Path) -> dict[str, int]:
    """Name -> address from a file in /proc/kallsyms (or System.map) format.

    Names that occur more than once (static functions and variables in several files) keep the global
    definition if there is one (the one an EXPORT_SYMBOL or a System.map "T"/"D" means), else the first;
    module symbols ("name [module]") keep their bare name.
    """
    symbols: dict[str, int] = {}
    global_names: set[str] = set()
    for line in path.read_text().splitlines():
        address, kind, name = line.split()[:3]
        if name not in symbols or (kind.isupper() and name not in global_names):
            symbols[name] = int(address, 16)
        if kind.isupper():
            global_names.add(name)
    return symbols
