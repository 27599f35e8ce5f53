"""Addresses of a kernel's exported symbols, read from the ELF inside its bzImage: a System.map stand-in.

Debian's kernel package ships a placeholder System.map (the real one is in the 850 MB -dbg package). The
vmlinux inside the bzImage is stripped of its symbol table but keeps its sections, and `__ksymtab` /
`__ksymtab_gpl` list every EXPORT_SYMBOL with its link address: enough to check /proc/kallsyms against an
independent source. Only for x86 bzImages with an xz payload and PREL32 ksymtab entries (Debian's amd64).
"""

from __future__ import annotations

import io
import lzma
import struct
from pathlib import Path

from elftools.elf.elffile import ELFFile

__all__ = ["KernelImageError", "vmlinux_from_bzimage", "exported_symbols", "write_exports_map"]

# struct kernel_symbol with CONFIG_HAVE_ARCH_PREL32_RELOCATIONS: three s32 offsets, each relative to itself.
_KSYM = struct.Struct("<iii")


class KernelImageError(ValueError):
    """The file is not a bzImage this module can read; the message says what was found instead."""


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """The vmlinux ELF a bzImage carries (boot protocol 2.08+: payload_offset/length in the setup header).

    Raises:
        KernelImageError: no "HdrS" header, or a payload other than xz.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise KernelImageError("no x86 boot protocol header (HdrS at 0x202): not a bzImage")
    setup_sectors = bzimage[0x1F1] or 4  # 0 means 4, for old bootloaders' sake
    protected_mode = (setup_sectors + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[protected_mode + offset:protected_mode + offset + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise KernelImageError(f"payload is not xz (starts {payload[:6].hex()}); only xz kernels are read")
    # The payload ends with the decompressed size (4 bytes) after the xz stream: the decompressor stops before.
    return lzma.LZMADecompressor().decompress(payload)


def exported_symbols(vmlinux: bytes) -> dict[str, int]:
    """Name -> link address of each exported symbol (EXPORT_SYMBOL and EXPORT_SYMBOL_GPL).

    Raises:
        KernelImageError: the ELF has no __ksymtab sections.
    """
    elf = ELFFile(io.BytesIO(vmlinux))
    strings = elf.get_section_by_name("__ksymtab_strings")
    tables = [s for s in (elf.get_section_by_name(n) for n in ("__ksymtab", "__ksymtab_gpl")) if s is not None]
    if strings is None or not tables:
        raise KernelImageError("the kernel ELF has no __ksymtab/__ksymtab_strings sections")
    names, names_at = strings.data(), strings["sh_addr"]
    symbols: dict[str, int] = {}
    for table in tables:
        data, base = table.data(), table["sh_addr"]
        for i in range(0, len(data) - _KSYM.size + 1, _KSYM.size):
            value_offset, name_offset, _namespace = _KSYM.unpack_from(data, i)
            name_at = base + i + 4 + name_offset - names_at
            name = names[name_at:names.index(b"\0", name_at)].decode()
            symbols[name] = (base + i + value_offset) & 0xFFFF_FFFF_FFFF_FFFF
    return symbols


def write_exports_map(vmlinuz: Path, out: Path) -> Path:
    """Write `vmlinuz`'s exported symbols to `out` in System.map format ("ADDR ? name", sorted), once.

    Returns:
        `out`.

    Raises:
        KernelImageError: see vmlinux_from_bzimage and exported_symbols.
    """
    if not out.exists():
        symbols = exported_symbols(vmlinux_from_bzimage(vmlinuz.read_bytes()))
        lines = [f"{address:016x} ? {name}\n" for name, address in sorted(symbols.items(), key=lambda s: s[::-1])]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(out)
    return out
