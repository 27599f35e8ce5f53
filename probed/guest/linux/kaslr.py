"""KASLR on x86_64: where the running kernel's image starts, and whether a symbol file is this kernel.

The kernel image is mapped in the 1 GiB window at `__START_KERNEL_map` (0xffffffff80000000), at a
2 MiB-aligned place that KASLR picks at boot (CONFIG_PHYSICAL_ALIGN). Early boot (`cleanup_highmap`) removes
every 2 MiB mapping of that window below `_text` and past the image, so the first mapped 2 MiB slot is
`_text`. One byte is read from each of the 512 slots in one pipelined batch; unmapped ones answer `E14`.
Reads go through the CPU's current page tables: the kernel's half is in every process's tables on a guest
without page-table isolation (QEMU's default CPU is an AMD model, which Linux does not isolate).

A symbol file gets the slide `_text (running) - _text (file)`; before it is used, `check_file` reads a few
things the file predicts (see there) and refuses a file of another build.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from probed.errors import TargetError
from probed.guest.linux.memory import GuestMemory, read_batch
from probed.guest.symbols import SymbolFile

__all__ = ["KERNEL_MAP", "LINK_TEXT", "KernelMismatch", "check_against_kallsyms", "check_file", "file_text",
           "find_kernel_text"]

KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
KERNEL_MAP_SIZE = 1 << 30  # KERNEL_IMAGE_SIZE with KASLR
ALIGN = 2 << 20  # CONFIG_PHYSICAL_ALIGN on x86_64 distribution kernels
LINK_TEXT = 0xFFFF_FFFF_8100_0000  # _text of an x86_64 kernel linked at the default 16 MiB
_KSYM = struct.Struct("<iii")  # struct kernel_symbol with PREL32 relocations: value, name, namespace
_KSYM_CHECKS = 8
KALLSYMS_MIN = 100
KALLSYMS_AGREE = 0.99


class KernelMismatch(TargetError):
    """A symbol file that is not the running kernel (another build): using it would set probes at random."""


@dataclass(frozen=True)
class Evidence:
    """What `check_file` compared: a short line per check, for the log and `probectl status`."""

    checks: tuple[str, ...]


async def find_kernel_text(memory: GuestMemory) -> int:
    """The running kernel's `_text`: the first mapped 2 MiB slot of the kernel image window.

    Raises:
        TargetError: nothing is mapped there (not an x86_64 Linux kernel, or page-table isolation hides
            the kernel from the CPU's current page tables).
    """
    slots = [(KERNEL_MAP + i * ALIGN, 1) for i in range(KERNEL_MAP_SIZE // ALIGN)]
    for (address, _), data in zip(slots, await read_batch(memory, slots), strict=True):
        if data is not None:
            return address
    raise TargetError(
        "no kernel image mapped at 0xffffffff80000000-0xffffffffc0000000: not an x86_64 Linux kernel, or the "
        "CPU is in user mode with page-table isolation (stop it in the kernel and attach again)"
    )


def file_text(sf: SymbolFile) -> int | None:
    """The link address of `_text` (or `startup_64`) in a symbol file, if it names one."""
    for sym in sf.symbols():
        if sym.name in ("_text", "startup_64", "_stext"):
            return sym.address - sf.bias
    return None


def _address(sf: SymbolFile, name: str) -> int | None:
    for sym in sf.symbols():
        if sym.name == name:
            return sym.address - sf.bias
    return None


async def check_file(memory: GuestMemory, sf: SymbolFile, slide: int, banner: bytes | None = None) -> Evidence:
    """Check that `sf`, moved by `slide`, describes the running kernel; refuse it otherwise.

    Checks, each where the file has what it needs:
    - `linux_banner`: the running kernel's banner is there ("Linux version ..."), and equal to `banner`
      when the caller has the file's own (an ELF's bytes).
    - `__start___ksymtab`: the first exported symbols' entries (relative offsets, the same whatever the
      slide) name symbols the file puts exactly where the entries point.

    Returns:
        What was checked; no checks when the file has neither symbol (see `check_against_kallsyms`).

    Raises:
        KernelMismatch: a check failed (the message says which, and what was found).
    """
    checks: list[str] = []
    where = _address(sf, "linux_banner")
    if where is not None:
        (found,) = await read_batch(memory, [(where + slide, 256)])
        text = (found or b"").split(b"\0", 1)[0]
        if not text.startswith(b"Linux version "):
            raise KernelMismatch(
                f"{sf.path} is not the running kernel: at its linux_banner (+slide {slide:#x}) the guest has "
                f"{text[:40]!r}, not 'Linux version ...' (a symbol file of another build?)"
            )
        if banner is not None and text != banner.split(b"\0", 1)[0]:
            raise KernelMismatch(
                f"{sf.path} is another build: its banner is {banner[:100]!r}, the guest's {text[:100]!r}"
            )
        checks.append(f"linux_banner: {text.decode(errors='replace').strip()[:100]}")
    ksymtab = _address(sf, "__start___ksymtab")
    if ksymtab is not None:
        checks.append(await _check_ksymtab(memory, sf, slide, ksymtab))
    return Evidence(tuple(checks))


def check_against_kallsyms(sf: SymbolFile, slide: int, kernel: list[tuple[str, str, int]]) -> Evidence:
    """Check `sf` (moved by `slide`) against the kernel's own symbol table: for a file with nothing else to
    check by (an export list, a partial map). Names that occur once on each side must sit at the same
    address, at least `KALLSYMS_AGREE` of them, and there must be `KALLSYMS_MIN` such names.

    Raises:
        KernelMismatch: too many disagree.
        TargetError: too few names in common to tell.
    """
    counts: dict[str, int] = {}
    for name, _, _ in kernel:
        counts[name] = counts.get(name, 0) + 1
    live = {name: address for name, _, address in kernel if counts[name] == 1}
    mine: dict[str, list[int]] = {}
    for sym in sf.symbols():
        mine.setdefault(sym.name, []).append(sym.address - sf.bias + slide)
    common = sorted(n for n, where in mine.items() if len(where) == 1 and n in live)
    if len(common) < KALLSYMS_MIN:
        raise TargetError(
            f"{sf.path} has no linux_banner or __start___ksymtab, and only {len(common)} names in common with the "
            "running kernel's kallsyms: cannot check that it is the running kernel (use a full System.map, a "
            "/proc/kallsyms dump or a vmlinux, or no file with --linux)"
        )
    agree = sum(mine[n][0] == live[n] for n in common)
    if agree < KALLSYMS_AGREE * len(common):
        wrong = next(n for n in common if mine[n][0] != live[n])
        raise KernelMismatch(
            f"{sf.path} is not the running kernel: only {agree} of {len(common)} symbols are where the guest's "
            f"kallsyms has them (+slide {slide:#x}; e.g. {wrong} at {mine[wrong][0]:#x}, the guest has it at "
            f"{live[wrong]:#x})"
        )
    return Evidence((f"kallsyms: {agree} of {len(common)} symbols where the guest has them",))


async def _check_ksymtab(memory: GuestMemory, sf: SymbolFile, slide: int, ksymtab: int) -> str:
    base = ksymtab + slide
    (table,) = await read_batch(memory, [(base, _KSYM.size * _KSYM_CHECKS)])
    if table is None:
        raise KernelMismatch(f"{sf.path}: nothing mapped at its __start___ksymtab ({base:#x}) in the guest")
    entries = []
    for i in range(_KSYM_CHECKS):
        value_off, name_off, _ = _KSYM.unpack_from(table, i * _KSYM.size)
        at = base + i * _KSYM.size
        entries.append((at + value_off, at + 4 + name_off))
    names = await read_batch(memory, [(name_at, 64) for _, name_at in entries])
    by_address = {}
    for sym in sf.symbols():
        by_address.setdefault(sym.address - sf.bias + slide, set()).add(sym.name)
    for (value, _), raw in zip(entries, names, strict=True):
        name = (raw or b"").split(b"\0", 1)[0].decode(errors="replace")
        if name not in by_address.get(value, ()):
            raise KernelMismatch(
                f"{sf.path} is not the running kernel: the guest exports {name or '?'!r} at {value:#x}, the file "
                f"(+slide {slide:#x}) has {sorted(by_address.get(value, ())) or 'nothing'} there"
            )
    return f"__ksymtab: {_KSYM_CHECKS} exported symbols where the file says"
