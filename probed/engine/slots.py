"""The debug-register slot allocator: the one place that decides who gets a hardware slot.

x86 has four debug address registers (DR0-DR3); hardware breakpoints and watchpoints each take one. Probes
and a debugger (the GDB stub) draw on the same slots, so each holder is named with its owner, and a request
that finds none free fails with an error that names who holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from probed.errors import SlotsExhausted

__all__ = ["Slot", "SlotAllocator"]


@dataclass(frozen=True)
class Slot:
    """One held slot: its index, the owner ("probe", "gdb"), a label and what it serves."""

    index: int
    owner: str
    label: str
    what: str

    def describe(self) -> str:
        return f"DR{self.index}: {self.owner} {self.label} ({self.what})"


class SlotAllocator:
    """Hands out `count` hardware slots."""

    def __init__(self, count: int = 4):
        if count < 0:
            raise ValueError("slot count must not be negative")
        self.count = count
        self._held: dict[int, Slot] = {}

    def allocate(self, owner: str, label: str, what: str) -> Slot:
        """Take a free slot.

        Raises:
            SlotsExhausted: every slot is held; the error names the holders.
        """
        for index in range(self.count):
            if index not in self._held:
                slot = Slot(index, owner, label, what)
                self._held[index] = slot
                return slot
        raise SlotsExhausted([s.describe() for s in self.holders()])

    def free(self, slot: Slot | None) -> None:
        """Give a slot back (freeing None or a freed slot does nothing)."""
        if slot is not None and self._held.get(slot.index) == slot:
            del self._held[slot.index]

    def holders(self) -> list[Slot]:
        return [self._held[i] for i in sorted(self._held)]

    @property
    def free_count(self) -> int:
        return self.count - len(self._held)

    def table(self) -> list[dict[str, object]]:
        """Every slot, held or free, for `probectl stats`."""
        rows: list[dict[str, object]] = []
        for index in range(self.count):
            slot = self._held.get(index)
            rows.append(
                {"slot": index, "owner": slot.owner if slot else None, "label": slot.label if slot else None,
                 "what": slot.what if slot else None}
            )
        return rows
