"""Hit records as ftrace's trace_pipe prints kprobe events, so grep and awk habits carry over.

    <...>-0       [000] .....  1764370000.123456: opens: (do_sys_openat2) dfd=-100 filename="/etc/hostname"

Columns as ftrace's (with its default `irq-info` option): `COMM-PID`, `[CPU]`, the five latency flags,
`SECONDS.MICROS:`, `EVENT:`, `(PLACE)`, then `NAME=VALUE` per fetched field. What probed does not know is
printed the way ftrace prints what it does not know: `<...>` for a command name, `0` for a pid, and the
latency flags as dots. The timestamp is the record's `time_ns` (wall clock; ftrace's default clock counts
from boot). A return probe's place is `(RETURN_SITE <- FUNCTION)`, as for kretprobe events.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["format_trace_line", "format_value"]

_HEX = re.compile(r"-?0x[0-9a-fA-F]+\Z")
NO_FLAGS = "....."


def format_value(value: Any) -> str:
    """One fetched value as ftrace prints it: numbers bare, strings quoted, arrays in braces, faults."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if value.startswith("<fault") or value.startswith("<no register"):
            return "(fault)"
        if _HEX.match(value):
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "{" + ",".join(format_value(v) for v in value) + "}"
    if value is None:
        return "(null)"
    return json.dumps(value, separators=(",", ":"), default=repr)


def _task(rec: dict[str, Any]) -> str:
    comm = rec.get("comm") or "<...>"
    pid = rec.get("pid")
    return f"{comm:>16}-{pid if pid is not None else 0:<7}"


def _place(rec: dict[str, Any]) -> str:
    where = rec.get("where") or rec.get("pc")
    if rec.get("kind") == "return":
        func = rec.get("func_where") or rec.get("func")
        return f"({where} <- {func})"
    if rec.get("kind") == "watch":
        return f"({where}) {rec.get('access')}@{rec.get('addr')}"
    return f"({where})"


def _fields(values: Any, prefix: str = "") -> list[str]:
    if values is None:
        return []
    if isinstance(values, dict):
        return [f"{prefix}{k}={format_value(v)}" for k, v in values.items()]
    return [f"{prefix}value={format_value(values)}"]


def format_trace_line(rec: dict[str, Any]) -> str:
    """One hit record as a trace_pipe line (post-handler fields follow as `post.NAME=VALUE`)."""
    seconds, nanos = divmod(int(rec.get("time_ns") or 0), 1_000_000_000)
    parts = [f"{_task(rec)} [{int(rec.get('cpu') or 0):03d}] {NO_FLAGS} {seconds:>5}.{nanos // 1000:06d}:",
             f"{rec['name']}:", _place(rec)]
    if rec.get("kind") == "watch":
        parts += [f"{k}={format_value(rec.get(k))}" for k in ("old", "new", "value") if rec.get(k) is not None]
    parts += _fields(rec.get("pre"))
    parts += _fields(rec.get("post"), "post.")
    if rec.get("duration_ns") is not None:
        parts.append(f"duration_ns={rec['duration_ns']}")
    if rec.get("error"):
        parts.append(f"error={format_value(rec['error'])}")
    return " ".join(parts)
