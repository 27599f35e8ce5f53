"""Aggregations printed the way bpftrace prints its maps.

    @[alpha]: 3                      count, sum, min, max, avg
    @: count 4, average 6, total 25  stats
    @:                               hist
    [4, 8)                 3 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_map", "hist_label"]

BAR_WIDTH = 52  # bpftrace's widest histogram bar
_SUFFIXES = ((60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K"))


def _power_label(power: int) -> str:
    for shift, suffix in _SUFFIXES:
        if power >= shift:
            return f"{1 << (power - shift)}{suffix}"
    return str(1 << power)


def hist_label(bucket: int) -> str:
    """A histogram row's label: `(..., 0)`, `[0]`, `[1]`, `[2, 4)`, ..., `[1K, 2K)`."""
    if bucket < 0:
        return "(..., 0)"
    if bucket == 0:
        return "[0]"
    if bucket == 1:
        return "[1]"
    return f"[{_power_label(bucket - 1)}, {_power_label(bucket)})"


def _key_text(name: str, key: list[Any]) -> str:
    if not key:
        return f"@{name}"
    return f"@{name}[" + ", ".join(_scalar(k) for k in key) + "]"


def _scalar(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "(" + ", ".join(_scalar(v) for v in value) + ")"
    return str(value)


def _hist_lines(buckets: dict[str, int]) -> list[str]:
    counts = {int(b): n for b, n in buckets.items()}
    if not counts:
        return []
    peak = max(counts.values())
    lines = []
    for bucket in range(min(counts), max(counts) + 1):
        n = counts.get(bucket, 0)
        bar = "@" * int(n / peak * BAR_WIDTH) if peak else ""
        lines.append(f"{hist_label(bucket):<16}{n:>8} |{bar:<{BAR_WIDTH}}|")
    return lines


def format_map(snapshot: dict[str, Any], name: str = "") -> str:
    """A map snapshot (`Aggregation.snapshot()`) as bpftrace prints it at exit; "" for an empty map.

    Args:
        snapshot: the aggregation's definition and rows.
        name: the map's name after `@` (bpftrace's `@name`); empty for `@`.
    """
    out: list[str] = []
    for row in snapshot["rows"]:
        head = _key_text(name, row["key"])
        if snapshot["func"] == "hist":
            out.append(f"{head}:")
            out.extend(_hist_lines(row["buckets"]))
            out.append("")
        elif snapshot["func"] == "stats":
            v = row["value"]
            out.append(f"{head}: count {v['count']}, average {v['average']}, total {v['total']}")
        else:
            out.append(f"{head}: {row['value']}")
    return "".join(line + "\n" for line in out)
