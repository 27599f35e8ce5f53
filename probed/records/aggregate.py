"""Aggregations kept where the hits happen: bpftrace's maps over hit records (count, sum, min, max, avg,
stats, power-of-two histograms), keyed by the probe or by fetched fields.

An `Aggregation` hangs on the engine's `EventHub` as a consumer: the hub hands it every record the moment it
is published, in the engine's own task, so it never falls behind and never misses one (unlike a
subscription, it has no buffer to overflow). Only records that are reported count: a hit a filter drops is
not a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FUNCTIONS", "AggregateError", "Aggregation", "hist_bucket", "record_value"]

FUNCTIONS = ("count", "sum", "min", "max", "avg", "stats", "hist")
_TOP_LEVEL = ("cpu", "where", "pc", "comm", "pid", "tid", "kind", "duration_ns", "seq")


class AggregateError(ValueError):
    """An aggregation asked for in a way that cannot work (an unknown function, a value it lacks)."""


def record_value(record: dict[str, Any], name: str) -> Any:
    """A record's value for a key or value name: `probe` (its name), a fetched field (pre, then post),
    or a field of the record itself (`cpu`, `comm`, `pid`, `duration_ns`, ...); KeyError if it has none."""
    if name == "probe":
        return record["name"]
    for phase in ("pre", "post"):
        values = record.get(phase)
        if isinstance(values, dict) and name in values:
            return values[name]
    if name in _TOP_LEVEL and record.get(name) is not None:
        return record[name]
    raise KeyError(name)


def hist_bucket(value: int) -> int:
    """bpftrace's hist() bucket: -1 for negatives, 0 for 0, else 1 + floor(log2(value))."""
    if value < 0:
        return -1
    return value.bit_length()


@dataclass
class _Cell:
    count: int = 0
    total: int = 0
    low: int | None = None
    high: int | None = None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)


class Aggregation:
    """One map: `func` of `field` over the records of `probe` (or all), per key.

    Args:
        func: one of `FUNCTIONS`.
        probe: the probe id whose records count, or None for every probe.
        field: the value aggregated (not for `count`): a fetched field or a record field.
        by: the key names (`probe`, fetched fields, `cpu`, ...); none makes one cell, `@`.

    Attributes:
        records: records aggregated; skipped: records that lacked a key or the value, or whose value was
            not an integer.
    """

    def __init__(self, func: str, *, probe: int | None = None, field: str | None = None, by: tuple[str, ...] = ()):
        if func not in FUNCTIONS:
            raise AggregateError(f"unknown aggregation {func!r} (one of {', '.join(FUNCTIONS)})")
        if func != "count" and not field:
            raise AggregateError(f"{func} needs a value field")
        if func == "count" and field:
            raise AggregateError("count takes no value field (count by one with --by)")
        self.func, self.probe, self.field, self.by = func, probe, field, tuple(by)
        self.records = 0
        self.skipped = 0
        self._cells: dict[tuple[Any, ...], _Cell] = {}
        self._hists: dict[tuple[Any, ...], dict[int, int]] = {}
        self._hubs: list[Any] = []

    @property
    def definition(self) -> tuple[Any, ...]:
        """What makes two aggregations the same map."""
        return (self.func, self.probe, self.field, self.by)

    def add(self, record: dict[str, Any]) -> None:
        """Aggregate one record."""
        if self.probe is not None and record.get("probe") != self.probe:
            return
        try:
            key = tuple(_hashable(record_value(record, k)) for k in self.by)
            value = 1 if self.func == "count" else record_value(record, self.field)
        except KeyError:
            self.skipped += 1
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.skipped += 1
            return
        self.records += 1
        if self.func == "hist":
            buckets = self._hists.setdefault(key, {})
            b = hist_bucket(value)
            buckets[b] = buckets.get(b, 0) + 1
        else:
            self._cells.setdefault(key, _Cell()).add(value)

    # The hub's consumer interface (what it calls on a subscription): take every record, never refuse one.
    def _offer(self, record: dict[str, Any], size: int = 0, line: str | None = None) -> bool:
        self.add(record)
        return True

    def attach(self, hub: Any, *, backlog: bool = False) -> Aggregation:
        """Start taking `hub`'s records; with `backlog`, first the ones still in its ring buffer.

        Nothing is published between reading the ring and attaching (both happen without yielding to the
        engine's task), so no record is counted twice or lost.
        """
        if backlog:
            for record in hub.recent(self.probe):
                self.add(record)
        hub.add_consumer(self)
        self._hubs.append(hub)
        return self

    def close(self) -> None:
        """Stop taking records."""
        for hub in self._hubs:
            hub.remove_consumer(self)
        self._hubs.clear()

    def __enter__(self) -> Aggregation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self) -> list[dict[str, Any]]:
        """The map's cells as bpftrace orders them when it prints: by value, smallest first.

        Returns:
            `{"key": [...], "value": N}` per cell; `stats` cells carry `{"count", "average", "total"}`;
            `hist` cells carry `{"buckets": {bucket: count}}` (see `hist_bucket`).
        """
        if self.func == "hist":
            out = [{"key": list(k), "buckets": {str(b): n for b, n in sorted(h.items())}} for k, h in self._hists.items()]
            out.sort(key=lambda r: (sum(r["buckets"].values()), _sort_key(r["key"])))
            return out
        out = []
        for key, cell in self._cells.items():
            if self.func == "stats":
                value: Any = {"count": cell.count, "average": _div(cell.total, cell.count), "total": cell.total}
                order = cell.total
            else:
                value = {
                    "count": cell.count, "sum": cell.total, "min": cell.low, "max": cell.high,
                    "avg": _div(cell.total, cell.count),
                }[self.func]
                order = value
            out.append({"key": list(key), "value": value, "_order": order})
        out.sort(key=lambda r: (r.pop("_order"), _sort_key(r["key"])))
        return out

    def snapshot(self) -> dict[str, Any]:
        """The definition, the counters and `rows()`, as the control socket sends them."""
        return {
            "func": self.func, "probe": self.probe, "field": self.field, "by": list(self.by),
            "records": self.records, "skipped": self.skipped, "rows": self.rows(),
        }


def _div(total: int, count: int) -> int:
    """bpftrace's avg: integer division, rounding toward zero."""
    q = abs(total) // count
    return q if total >= 0 else -q


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _sort_key(key: list[Any]) -> list[tuple[int, Any]]:
    return [(0, k) if isinstance(k, int | float) else (1, str(k)) for k in key]
