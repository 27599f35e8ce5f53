"""Which x86 instruction set a stopped CPU runs (16-, 32- or 64-bit code), so the emulator decodes right.

The same bytes mean different instructions in each: `53` is `push rbx` (8 bytes) in 64-bit code and
`push ebx` (4 bytes) in 32-bit code; a guest booting passes through all three. The `g` block has the
selectors and control registers but not the code segment's descriptor, whose D and L bits decide:
- CR0.PE clear (real mode) or EFLAGS.VM set (virtual-8086): 16-bit, no question to ask.
- Not in long mode (EFER.LMA clear): never 64-bit code.
- Otherwise the descriptor's bits, which QEMU's monitor shows (`info registers -a`, the `CS =` line).

Only the target's own width ("native": 32 on i386, 64 on x86_64) is simulated, and in 32-bit code only
over flat data segments (DS, SS, ES based at 0: the simulator takes addresses as they are), so only that
answer is remembered (per selectors and long mode); anything else is asked again next time, and stepped.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["CodeMode", "bits_key", "flat_data", "parse_cs_bits"]

log = logging.getLogger(__name__)

CR0_PE = 1 << 0
EFER_LMA = 1 << 10
EFLAGS_VM = 1 << 17
DESC_B = 1 << 22  # the D/B bit in QEMU's `flags` word of a segment
DESC_L = 1 << 21

NATIVE = {"i386": 32, "x86_64": 64}


class CodeMode:
    """Answers "what width is the code at this stop" for one x86 target.

    Args:
        target: the attached `probed.engine.target.Target` (its layout and client are used).
    """

    def __init__(self, target: Any):
        self.target = target
        self.native = NATIVE.get(target.arch.name)
        # (CS, DS, SS, ES selectors, long mode) seen running native code over flat data segments.
        self._known: set[tuple[int, int, int, int, bool]] = set()
        self.queries = 0

    def _key(self, g: bytes) -> tuple[int, int, int, int, bool] | None:
        """The remembered key for this register block, or None when the registers settle it: not native."""
        value = self.target.layout.value
        cr0, eflags, cs = value(g, "cr0"), value(g, "eflags"), value(g, "cs")
        if cr0 is None or eflags is None or cs is None or not cr0 & CR0_PE or eflags & EFLAGS_VM:
            return None
        efer = value(g, "efer") or 0
        long_mode = bool(efer & EFER_LMA)
        if self.native == 64 and not long_mode:
            return None
        ds, ss, es = value(g, "ds"), value(g, "ss"), value(g, "es")
        if ds is None or ss is None or es is None:
            return None
        return (cs, ds, ss, es, long_mode)

    async def is_native(self, g: bytes) -> bool:
        """Whether the CPU whose registers are `g` runs code of the target's own width."""
        if self.native is None:
            return False
        key = self._key(g)
        if key is None:
            return False
        if key in self._known:
            return True
        self.queries += 1
        try:
            out = await self.target.client.monitor("info registers -a")
        except Exception as exc:  # noqa: BLE001  (no monitor: step everything, say why once)
            log.info("cannot tell the CPU's code width (%s): instructions are stepped, not simulated", exc)
            self.native = None
            return False
        try:
            for cpu in _cpus(out):
                if parse_cs_bits(cpu) == self.native and (self.native == 64 or flat_data(cpu)):
                    self._known.add(bits_key(cpu))
        except (ValueError, IndexError) as exc:
            log.warning("cannot read the code width from QEMU's monitor (%s): stepping instead", exc)
            return False
        return key in self._known


def _cpus(monitor_output: str) -> list[str]:
    """The per-CPU sections of `info registers -a` (or the one section of `info registers`)."""
    parts = monitor_output.split("CPU#")
    return [p for p in parts if "CS =" in p]


def _field(section: str, name: str) -> int:
    for word in section.replace("\n", " ").split():
        if word.startswith(name + "="):
            return int(word.split("=", 1)[1], 16)
    raise ValueError(f"no {name}= in the monitor's registers")


def _cs_line(section: str) -> list[str]:
    for line in section.splitlines():
        if line.startswith("CS ="):
            return line[len("CS =") :].split()
    raise ValueError("no CS line in the monitor's registers")


def parse_cs_bits(section: str) -> int:
    """The code width (16, 32, 64) of one CPU section of QEMU's `info registers`."""
    flags = int(_cs_line(section)[3], 16)
    flags_register = _field(section, "RFL") if "RFL=" in section else _field(section, "EFL")  # RFL in long mode
    if not _field(section, "CR0") & CR0_PE or flags_register & EFLAGS_VM:
        return 16
    if _efer(section) & EFER_LMA and flags & DESC_L:
        return 64
    return 32 if flags & DESC_B else 16


def _efer(section: str) -> int:
    try:
        return _field(section, "EFER")
    except ValueError:
        return 0


def _segment(section: str, name: str) -> list[str]:
    for line in section.splitlines():
        if line.startswith(f"{name} ="):
            return line[len(name) + 2 :].split()
    raise ValueError(f"no {name} line in the monitor's registers")


def flat_data(section: str) -> bool:
    """Whether DS, SS and ES start at 0 (in 32-bit code the simulator takes an address as it is)."""
    return all(int(_segment(section, name)[1], 16) == 0 for name in ("DS", "SS", "ES"))


def bits_key(section: str) -> tuple[int, int, int, int, bool]:
    """The key `CodeMode` remembers for one CPU section of `info registers`."""
    cs, ds, ss, es = (int(_segment(section, name)[0], 16) for name in ("CS", "DS", "SS", "ES"))
    return (cs, ds, ss, es, bool(_efer(section) & EFER_LMA))
