"""Guest-physical RAM as QEMU maps it in its own address space, read through `/proc/PID/mem`.

The map comes from QEMU itself, over the gdbstub's monitor (`qRcmd`), at attach:
- `info mtree -f` gives the flat view of the address space "memory": each guest-physical range and the
  region behind it (`ram`, `rom`, `i/o`, ...). On pc and q35 machines with more RAM than fits below the
  PCI hole, RAM is two ranges of one region ("pc.ram" from 0, and "pc.ram @OFFSET" from 4 GiB); ROMs
  (BIOS, option ROMs) are ranges too. Only `ram` and `rom` ranges are host memory; everything else (MMIO,
  the APIC) is read through the stub's `m` as before.
- `gpa2hva ADDR` (an HMP command) gives the host-virtual address of a guest-physical one. A RAM block is one
  contiguous host mapping, so one `gpa2hva` per range (its first byte) maps the whole range.

The map is taken once, so only what stays put is read directly: `ram` ranges (not ROMs), and nothing in the
legacy window 640 KiB-1 MiB, where the chipset switches between ROM, shadow RAM and SMRAM while the guest
runs (seen here: SeaBIOS's shadowing makes 0xe0000-0xfffff read differently after boot than at `-S`).
Those, MMIO and everything else go to the stub. Memory hot-plug after attach is not followed.
"""

from __future__ import annotations

import mmap
import os
import re
import weakref
from dataclasses import dataclass

__all__ = ["HostRam", "RamRange", "parse_flat_view", "parse_gpa2hva"]

_RANGE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([\w/-]+)\): (\S+)(?: @([0-9a-f]+))?", re.IGNORECASE
)
_HVA = re.compile(r"is (0x[0-9a-f]+)", re.IGNORECASE)
HOST_BACKED = ("ram",)
LEGACY_WINDOW = (0xA0000, 0x100000)


@dataclass(frozen=True)
class RamRange:
    """Guest-physical `[start, end)` backed by host memory at `host` onwards."""

    start: int
    end: int
    name: str
    host: int = 0


def parse_flat_view(text: str, address_space: str = "memory") -> list[RamRange]:
    """The RAM ranges of `address_space` in `info mtree -f` output, less the legacy window (host addresses
    still 0)."""
    out: list[RamRange] = []
    in_view = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("FlatView #"):
            in_view = False
        elif stripped.startswith("AS ") and f'"{address_space}"' in stripped:
            in_view = True
        elif in_view and (m := _RANGE.match(line)):
            start, last, kind, name = int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4)
            if kind in HOST_BACKED:
                out += _outside_legacy(RamRange(start, last + 1, name))
    return out


def _outside_legacy(r: RamRange) -> list[RamRange]:
    lo, hi = LEGACY_WINDOW
    parts = []
    if r.start < lo:
        parts.append(RamRange(r.start, min(r.end, lo), r.name))
    if r.end > hi:
        parts.append(RamRange(max(r.start, hi), r.end, r.name))
    return parts


def parse_gpa2hva(text: str) -> int:
    """The host address in `gpa2hva`'s answer (`Host virtual address for 0x0 (pc.ram) is 0x7f...`).

    Raises:
        ValueError: the answer has none (an error message instead).
    """
    m = _HVA.search(text)
    if not m:
        raise ValueError(text.strip() or "no answer")
    return int(m.group(1), 16)


class HostRam:
    """Reads guest-physical memory from QEMU's process.

    Args:
        fd: an open `/proc/PID/mem` of QEMU (owned by this object from now on).
        ranges: the host-backed ranges, with their host addresses.
        pid: QEMU's pid (for messages).
        views: per range (by its start), the range mapped into this process, when QEMU's RAM is a file it maps
            shared (`memory-backend-memfd`, `-file` with `share=on`): read as memory, with no system call.
            Ranges without one are read with `pread` on `fd`.
    """

    def __init__(self, fd: int, ranges: list[RamRange], pid: int = 0, views: dict[int, mmap.mmap] | None = None):
        self.fd = fd
        self.pid = pid
        self._finalizer = weakref.finalize(self, os.close, fd)
        self.ranges = sorted(ranges, key=lambda r: r.start)
        self.size = sum(r.end - r.start for r in self.ranges)
        self.views = dict(views or {})
        # (start, end, host, view): what `read` looks through, largest range first (where nearly all reads go).
        self._spans = sorted(((r.start, r.end, r.host, self.views.get(r.start)) for r in self.ranges),
                             key=lambda s: s[0] - s[1])

    @property
    def mapped(self) -> bool:
        """Every range is mapped into this process (reads are memory reads)."""
        return bool(self.ranges) and len(self.views) == len(self.ranges)

    def close(self) -> None:
        self._finalizer()
        self.fd = -1
        views, self.views = self.views, {}
        self._spans = [(start, end, host, None) for start, end, host, _ in self._spans]
        for view in views.values():
            view.close()

    def host_address(self, phys: int, length: int) -> int | None:
        """Where `[phys, phys+length)` lies in QEMU's memory, or None if it is not all in one range."""
        for r in self.ranges:
            if r.start <= phys and phys + length <= r.end:
                return r.host + (phys - r.start)
        return None

    def read(self, phys: int, length: int) -> bytes | None:
        """`length` bytes at guest-physical `phys`, or None if they are not all in one range."""
        for start, end, host, view in self._spans:
            if start <= phys and phys + length <= end:
                if view is not None:
                    return view[phys - start : phys - start + length]
                data = os.pread(self.fd, length, host + (phys - start))
                return data if len(data) == length else None
        return None

    def describe(self) -> str:
        where = ", ".join(f"{r.start:#x}-{r.end:#x} {r.name}" for r in self.ranges)
        how = "mapped shared" if self.mapped else "/proc/PID/mem"
        return f"QEMU pid {self.pid} ({how}): {where}"
