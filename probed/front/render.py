"""How probectl shows things to people: rich tables, and one line per hit record."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["format_record", "print_events_line", "print_table"]

_console = Console(highlight=False, soft_wrap=True)

LIST_COLUMNS = ("id", "name", "spec", "address", "hits", "missed", "faults", "state")


def _fields(values: Any) -> str:
    if isinstance(values, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
    return json.dumps(values)


def format_record(rec: dict[str, Any]) -> str:
    """One hit record as a line: `#17 name cpu0 pc=0x... (sym+0x0) pre: a=1 post: ...`."""
    where = f" ({rec['where']})" if rec.get("where") else ""
    parts = [f"#{rec['seq']}", str(rec["name"]), f"cpu{rec['cpu']}"]
    if rec.get("kind") == "watch":
        parts.append(f"{rec.get('access')} {rec.get('addr')}")
        if rec.get("access") != "read":
            parts.append(f"old={rec.get('old')} new={rec.get('new')}")
        else:
            parts.append(f"value={rec.get('value')}")
        parts.append(f"by pc={rec.get('pc')}{where}")
    elif rec.get("kind") == "return":
        duration = rec.get("duration_ns")
        took = f" after {duration / 1000:.1f}us" if isinstance(duration, int) else ""
        parts.append(f"returned to pc={rec['pc']}{where}{took}")
    else:
        parts.append(f"pc={rec['pc']}{where}")
    if rec.get("pre") is not None:
        parts.append("pre: " + _fields(rec["pre"]))
    if rec.get("post") is not None:
        parts.append("post: " + _fields(rec["post"]))
    if rec.get("error"):
        parts.append(f"error: {rec['error']}")
    return " ".join(parts)


def print_events_line(rec: dict[str, Any]) -> None:
    """Print one hit record the way people read it (see `format_record`)."""
    print(format_record(rec))


def print_table(command: str, result: Any) -> None:
    """Print a control method's result as rich tables.

    Args:
        command: the probectl verb whose result this is (`list`, `hooks`, `symbols`, `stats`, `status`).
        result: that method's result as the daemon sent it.
    """
    if command == "list":
        _rows(LIST_COLUMNS, result, "no probes")
    elif command == "hooks":
        _rows(("name", "address", "size", "handlers"), result, "no functions match")
    elif command == "symbols":
        if isinstance(result, dict):
            moved = ", ".join(f"{p['name']} -> {p['address']}" for p in result["moved"]) or "no probes"
            print(f"{result['file']} relocated by {result['bias']:#x}; moved: {moved}")
        else:
            slide = ("slide",) if any("slide" in row for row in result) else ()
            _rows(("name", "path", "bias", "symbols", *slide), result, "no symbol files")
    elif command == "stats":
        counters = dict(result)
        slots = counters.pop("slots", [])
        _pairs(counters)
        _rows(("slot", "owner", "label", "what"), slots, "no hardware slots", title="debug-register slots")
    else:
        _pairs(result)


def _rows(columns: tuple[str, ...], rows: list[dict[str, Any]], empty: str, title: str | None = None) -> None:
    if not rows:
        print(empty)
        return
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*("-" if row.get(c) is None else str(row.get(c)) for c in columns))
    _console.print(table)


def _pairs(result: dict[str, Any]) -> None:
    table = Table("key", "value", show_header=False)
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, list | dict) else str(value))
    _console.print(table)
