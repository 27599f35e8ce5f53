"""How large a probe's hit record can grow, worked out from its fetch args before the probe is added.

The bound is on the record's JSON (what the ring buffer keeps and what `--events` writes): every field at
its longest rendering (a u32 as 10 digits, an x64 as 18 characters in quotes, a string of `STRING_MAX`
bytes each escaped as `\\uXXXX`), plus the record's fixed keys. A probe whose worst case is over the limit
is refused at `add` (RecordTooLarge): a ring of such records would hold only a handful, and one record
would stall the events file and every follower.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from probed.errors import ProbedError

__all__ = ["MAX_RECORD_BYTES", "RecordTooLarge", "check_record_size", "worst_case_record_bytes"]

MAX_RECORD_BYTES = 1 << 20
"""The default limit on one hit record's worst-case JSON size (1 MiB)."""

RECORD_OVERHEAD = 1024  # probe, name, seq, stop, time_ns, cpu, pc, where, error: their keys and values
FIELD_SLACK = 160  # a field that faulted renders as an error text instead of its value
SYMBOL_MAX = 512  # a `symbol` field: a symbol's name and offset
_DIGITS = {("u", 1): 3, ("u", 2): 5, ("u", 4): 10, ("u", 8): 20, ("s", 1): 4, ("s", 2): 6, ("s", 4): 11, ("s", 8): 20}


class RecordTooLarge(ProbedError):
    """A probe whose hit records could be larger than the limit."""

    code = 3  # a spec that cannot be used, as BadSpec

    def __init__(self, size: int, limit: int, largest: str):
        self.size, self.limit, self.largest = size, limit, largest
        super().__init__(
            f"a hit record of this probe could take {size} bytes, over the limit of {limit} "
            f"(largest field: {largest}); fetch fewer or shorter arrays"
        )

    def data(self) -> dict[str, Any]:
        return {**super().data(), "size": self.size, "limit": self.limit, "largest": self.largest}


def _value_bytes(kind: str, size: int) -> int:
    if kind in ("string", "ustring"):
        from probed.lang.fetch import STRING_MAX

        return 2 + 6 * STRING_MAX
    if kind in ("symbol", "symstr"):  # symstr adds "/0xsize" to what symbol shows; the bound covers it
        return 2 + SYMBOL_MAX
    if kind == "x":
        return 4 + 2 * size
    return _DIGITS.get((kind, size), 20)


def field_bytes(field: Any) -> int:
    """The longest JSON a parsed fetch field (`probed.lang.fetch.FetchField`) renders to, with its key."""
    t = field.type
    value = _value_bytes(t.kind, t.size)
    if t.count is not None:
        value = 2 + t.count * (value + 2)
    return len(field.name) + 4 + value + 2 + FIELD_SLACK


def worst_case_record_bytes(fields: Iterable[Any]) -> int:
    """The largest JSON a record with these fetch fields (pre and post together) can have."""
    return RECORD_OVERHEAD + sum(field_bytes(f) for f in fields)


def check_record_size(fields: Iterable[Any], limit: int = MAX_RECORD_BYTES) -> int:
    """Raise RecordTooLarge when these fields' worst-case record is over `limit`; returns the worst case."""
    fields = list(fields)
    size = worst_case_record_bytes(fields)
    if size > limit:
        largest = max(fields, key=field_bytes)
        raise RecordTooLarge(size, limit, f"{largest.text} ({field_bytes(largest)} bytes)")
    return size
