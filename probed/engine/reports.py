"""What the engine reports about itself: the counters of `probectl stats`, the summary of `probectl status`,
the probeable functions of `probectl hooks`, the hook points by symbol. The engine's `stats()`, `status()`,
`hooks()` and `points()` are these.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from probed.engine.probes import HookPoint

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = ["hooks", "points", "stats", "status"]


def stats(engine: Engine) -> dict[str, Any]:
    """Counters for `probectl stats`."""
    return {
        "stops": engine.stops,
        "hits": engine.hits,
        "simulated": engine.simulated,
        "spurious_steps": engine.spurious_steps,
        "records": engine.records,
        "missed": sum(p.missed for p in engine.table),
        "faults": sum(p.faults for p in engine.table),
        "filtered": sum(p.filtered for p in engine.table),
        "breakpoints": len(engine.breakpoints.installed),
        "return_instances": engine.returns.instances(),
        "return_points": len(engine.returns.addresses),
        "reaped": engine.returns.reaped,
        "slots": engine.slots.table(),
        "retransmits": engine.client.retransmits if engine.target else 0,
        "memory_reads": dict(engine.target.memory.stats) if engine.target and engine.target.memory else {},
        "user": engine.uprobes.stats(),
    }


def status(engine: Engine) -> dict[str, Any]:
    """What `probectl status` shows."""
    return {
        "target": engine.target_address,
        "arch": engine.arch.name if engine.arch else None,
        "state": engine.state,
        "guest": engine.guest.state.value,
        "cpus": len(engine.target.threads) if engine.target else 0,
        "uptime_s": round(time.monotonic() - engine.started, 3),
        "probes": len(engine.probes()),
        "hook_points": len(engine.table.points),
        "symbol_files": [f.name for f in engine.symbols.files()],
        "reconnects": engine.service.reconnects,
        **({"lost": engine.service.lost_reason} if engine.service.lost_reason else {}),
        **(engine.linux.status() if engine.linux is not None else {}),
        **(engine.reboot.status() if engine.reboot is not None else {}),
        "guest_memory": engine.target.memory.describe() if engine.target and engine.target.memory else None,
    }


def hooks(engine: Engine, glob: str = "*") -> list[dict[str, Any]]:
    """Probeable functions from the loaded symbols, with the handlers on each active point."""
    rows = []
    for sym in engine.symbols.functions(glob):
        point = engine.table.breakpoint_at(sym.address)
        rows.append(
            {"name": sym.name, "address": f"{sym.address:#x}", "size": sym.size,
             "handlers": len(point.probes) if point else 0}
        )
    return rows


def points(engine: Engine, glob: str = "*") -> list[HookPoint]:
    """The hook points whose symbol matches `glob`."""
    def place(p: HookPoint) -> str:
        if p.kind == "user":  # an offset into a file: never a kernel symbol
            return p.probes[0].where if p.probes else ""
        return engine.symbols.symbolize(p.address) or ""

    return [p for p in engine.table.points.values() if fnmatchcase(place(p), glob)]
