"""Control-socket methods for people coming from tracefs and bpftrace: kprobe_events files (`load`, `save`),
aggregations kept in the daemon (`aggregate`, `aggregations`), and per-probe counters for `probectl top`.

`ControlServer` takes these methods as its own; they share the daemon's state through one
`TracingMethods` per daemon: the group each loaded probe was given, and the running aggregations.
"""

from __future__ import annotations

from typing import Any

from probed.errors import BadSpec, ProbedError, Unsupported
from probed.front.kprobe_events import parse_text, split_return
from probed.front.probe_files import accepts, apply_lines, save_text
from probed.records.aggregate import AggregateError, Aggregation

__all__ = ["BadAggregation", "TracingMethods", "add_options"]


class BadAggregation(ProbedError):
    """An aggregation that cannot be made (unknown function, a missing value field, ...)."""

    code = 15


class TracingMethods:
    """The methods, over one engine.

    Args:
        engine: a `probed.engine.engine.Engine`.
        on_added: told of each probe a kprobe_events file adds, as `add` tells the state file.
    """

    def __init__(self, engine: Any, on_added: Any = None):
        self.engine = engine
        self.on_added = on_added  # called (probe, "break", params) for each probe a file adds (the state file)
        self.groups: dict[int, str] = {}  # probe id -> its kprobe_events group, for `save`
        self.aggregations: list[Aggregation] = []

    def methods(self) -> dict[str, Any]:
        """Method name -> coroutine function taking the request's params."""
        return {
            "load": self.load,
            "save": self.save,
            "aggregate": self.aggregate,
            "aggregations": self.list_aggregations,
            "counters": self.counters,
        }

    async def load(self, params: dict[str, Any]) -> dict[str, Any]:
        """`{"text": FILE CONTENTS, "source": NAME}`: apply a kprobe_events file, all of it or none."""
        text = params.get("text")
        if not isinstance(text, str):
            raise BadSpec("load", "needs the file's text as a string")
        source = params.get("source") if isinstance(params.get("source"), str) else None
        commands = parse_text(text, source)
        self._forget_removed()
        result = await apply_lines(self.engine, commands, self.groups, source)
        if self.on_added is not None:
            adds = {ev.name: ev for ev in commands if ev.action == "add"}
            for info in result["added"]:
                if info["name"] in adds and any(p.id == info["id"] for p in self.engine.probes()):
                    ev = adds[info["name"]]
                    self.on_added(self.engine.find_probe(info["id"]), "break", {"pre": list(ev.fetchargs)})
        return result

    async def save(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every probe as kprobe_events lines: `{"text": ...}`."""
        self._forget_removed()
        return {"text": save_text(self.engine.probes(), self.groups)}

    def _forget_removed(self) -> None:
        live = {p.id for p in self.engine.probes()}
        for pid in [pid for pid in self.groups if pid not in live]:
            del self.groups[pid]

    async def aggregate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Start (or find) a map and return its snapshot; `{"clear": true}` removes it instead.

        Params: `func`, `probe` (id or name; none for all), `field`, `by` (list of names). A new map starts
        with the records still in the ring buffer, then takes every new one.
        """
        probe = params.get("probe")
        probe_id = self.engine.find_probe(probe).id if probe not in (None, "") else None
        by = params.get("by") or []
        if not isinstance(by, list) or not all(isinstance(b, str) and b for b in by):
            raise BadAggregation(f"'by' must be a list of names, not {by!r}")
        try:
            wanted = Aggregation(str(params.get("func")), probe=probe_id, field=params.get("field") or None, by=tuple(by))
        except AggregateError as exc:
            raise BadAggregation(str(exc)) from None
        self._drop_orphans()
        found = next((a for a in self.aggregations if a.definition == wanted.definition), None)
        if params.get("clear"):
            if found is not None:
                found.close()
                self.aggregations.remove(found)
            return {"cleared": found is not None}
        if found is None:
            found = wanted.attach(self.engine.hub, backlog=True)
            self.aggregations.append(found)
        return self._snapshot(found)

    async def list_aggregations(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The running maps, each as a snapshot."""
        self._drop_orphans()
        return [self._snapshot(a) for a in self.aggregations]

    def _snapshot(self, agg: Aggregation) -> dict[str, Any]:
        snap = agg.snapshot()
        if agg.probe is not None:
            snap["probe_name"] = self.engine.find_probe(agg.probe).name
        return snap

    def _drop_orphans(self) -> None:
        """Maps of probes that were removed stop (bpftrace's maps go with their program)."""
        live = {p.id for p in self.engine.probes()}
        for agg in [a for a in self.aggregations if a.probe is not None and a.probe not in live]:
            agg.close()
            self.aggregations.remove(agg)

    async def counters(self, params: dict[str, Any]) -> dict[str, Any]:
        """What `probectl top` shows: per-probe counters and slot use, and the engine's totals."""
        stats = self.engine.stats()
        slot_of = {s.get("label"): s.get("slot") for s in stats.get("slots", []) if s.get("owner") == "probe"}
        rows = []
        for p in self.engine.probes():
            rows.append({
                "id": p.id, "name": p.name, "spec": p.spec, "kind": p.kind, "hits": p.hits, "missed": p.missed,
                "faults": p.faults, "filtered": p.filtered, "state": p.state,
                "slot": slot_of.get(p.name) if (p.hw or p.kind == "watch") else None,
            })
        return {"probes": rows, "stats": {k: v for k, v in stats.items() if k != "slots"},
                "slots": stats.get("slots", [])}


def add_options(engine: Any, spec: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`add`'s spec and the engine options it implies: `SYM%return` (or `"retprobe": true`) is a return
    probe, refused clearly while the engine has none.

    Raises:
        Unsupported: a return probe, and the engine cannot make one yet.
    """
    spec, retprobe = split_return(spec)
    retprobe = retprobe or bool(params.get("retprobe"))
    if not retprobe:
        return spec, {}
    if not accepts(engine.add_probe, "retprobe"):
        raise Unsupported(f"{spec}%return: return probes are not supported by this probed yet")
    extra: dict[str, Any] = {"retprobe": True}
    if params.get("maxactive") is not None:
        extra["maxactive"] = params["maxactive"]
    return spec, extra
