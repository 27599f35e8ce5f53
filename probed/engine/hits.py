"""The hit pipeline: one path from a stop that hit probes to the records they publish.

    begin (count the hit, create one `HitRecord` per probe: seq and time taken here; pre-handlers)
      -> get past the probed place (single-step, or simulate it: `probed.engine.breakpoints` and
         `probed.sim.emulate`; a watch hit on x86 needs no step)
      -> post-handlers
      -> finish (filter, then publish)

Breakpoint hits (`BreakHits`), watchpoint hits (`probed.engine.watch`), return probes
(`probed.engine.returns`) and, later, user-space probes all go through `HitPipeline.begin` / `run_post` / `finish`, so counting, faults, filters, `seq` and
publishing happen in one place.

Handlers' time limit: `HitPipeline.run_handler` runs a Python handler within its probe's `timeout` (else
the engine's `handler_timeout`), see `PythonHandler.run_limited`. Past it the hit is a fault like a handler
that raised (counted, the probe disabled after `fault_limit` in a row), and the hit goes on: the guest
resumes. The handler's time is not the target's: the time limit on the target's answers (the service's
bounded exchange) is suspended while a Python handler runs and moved on by the time it took.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from probed.engine.probes import Probe
from probed.errors import ProbedError
from probed.lang.context import HitContext
from probed.lang.handlers import Handler, PythonHandler
from probed.records.events import HitRecord
from rsp.errors import ConnectionClosed, TargetTimeout
from rsp.stop import ThreadId

if TYPE_CHECKING:
    from probed.engine.engine import Engine

__all__ = ["Hit", "HitPipeline", "cpu_of"]

log = logging.getLogger("probed.engine.engine")


AT_STOP = object()


def cpu_of(thread: ThreadId | None) -> int:
    """The 0-based CPU index of a stop's thread (QEMU's thread ids are CPU numbers from 1)."""
    return thread.tid - 1 if thread is not None and thread.tid > 0 else 0


@dataclass
class Hit:
    """One stop that hit probes, from its pre phase to its publication.

    `records` holds one record per probe, in handler order, created at the hit.
    """

    kind: str
    thread: ThreadId | None
    cpu: int
    pc: int
    stop: int
    probes: list[Probe]
    records: list[HitRecord]
    g: bytes  # the registers at the hit

    @property
    def tid(self) -> int:
        return self.thread.tid if self.thread is not None else 1


class HitPipeline:
    """Counts hits, runs handlers, filters and publishes; the one place a `HitRecord` is made."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.hits = 0  # stops that hit at least one probe
        self.records = 0  # records published
        self._warned: set[tuple[int, str]] = set()
        self.open: list[Hit] = []  # hits begun and not published yet (published anyway if the target goes)

    async def begin(
        self,
        kind: str,
        thread: ThreadId | None,
        pc: int,
        g: bytes,
        probes: list[Probe],
        *,
        where_pc: Any = AT_STOP,
        extra: list[dict[str, Any]] | None = None,
        entries: list[Any] | None = None,
    ) -> Hit:
        """Start a hit: count it on every probe, create its records (seq, time), run the pre-handlers.

        Args:
            kind: the records' kind ("break", "watch", "return", "user").
            pc: where the guest stopped; `where_pc` the address the records name, when another (None for
                unknown).
            extra: per probe, the kind's own fields for its record.
            entries: per probe, what a return probe kept at the entry (its handler's `ctx.entry`).
        """
        engine = self.engine
        self.hits += 1
        cpu = cpu_of(thread)
        shown = pc if where_pc is AT_STOP else where_pc
        # A user probe's place is in its file (set when added), never a kernel symbol.
        kernel = any(p.kind != "user" for p in probes)
        where = engine.target.symbolize(shown) if shown is not None and kernel else None
        records = []
        for i, probe in enumerate(probes):
            probe.hits += 1
            records.append(
                HitRecord(
                    probe=probe.id, name=probe.name, kind=kind, seq=probe.hits, stop=engine.stops, cpu=cpu,
                    pc=shown, where=probe.where if probe.kind == "user" else where,
                    extra=dict(extra[i]) if extra else {},
                )
            )
        hit = Hit(kind, thread, cpu, pc, engine.stops, probes, records, g)
        self.open.append(hit)
        ctx = HitContext(engine.target, cpu, "pre", g)
        for i, (probe, record) in enumerate(zip(probes, records, strict=True)):
            if entries is not None:
                ctx.entry = entries[i]
            record.pre, error = await self.run_handler(probe, probe.pre, ctx)
            record.add_error(error)
        return hit

    def merge(self, first: Hit, second: Hit) -> Hit:
        """One hit of two begun at the same stop (returns ending at a place that is also probed)."""
        first.probes += second.probes
        first.records += second.records
        return first

    async def run_post(self, hit: Hit, g: bytes) -> None:
        """Run the post-handlers over the registers after the probed instruction."""
        ctx = HitContext(self.engine.target, hit.cpu, "post", g)
        for probe, record in zip(hit.probes, hit.records, strict=True):
            if probe.post is not None:
                record.post, error = await self.run_handler(probe, probe.post, ctx)
                record.add_error(error)

    async def run_handler(self, probe: Probe, handler: Handler | None, ctx: HitContext) -> tuple[Any, str | None]:
        """Run one handler; a fault is counted, and after `fault_limit` in a row the probe is disabled."""
        if handler is None:
            return None, None
        ctx.probe = probe
        try:
            if isinstance(handler, PythonHandler):
                value = await self._run_python(probe, handler, ctx)
            else:
                value = await handler.run(ctx)
        except (ConnectionClosed, TargetTimeout):
            raise  # the target's fault, not the handler's: the service reconnects
        except Exception as exc:  # a handler's bug (or its time limit) is recorded, never fatal
            probe.faults += 1
            probe.fault_run += 1
            if probe.fault_run >= self.engine.fault_limit and probe.enabled:
                probe.enabled = False
                probe.disabled_reason = f"{probe.fault_run} handler faults in a row (last: {type(exc).__name__}: {exc})"
                log.warning("probe %s disabled: %s", probe.name, probe.disabled_reason)
                self.engine.breakpoints.dirty = True
            return None, f"{ctx.phase}: {type(exc).__name__}: {exc}"
        probe.fault_run = 0
        return value, None

    async def _run_python(self, probe: Probe, handler: PythonHandler, ctx: HitContext) -> Any:
        """Run a Python handler within its time limit, its time taken out of the target's."""
        limit = probe.timeout if probe.timeout is not None else self.engine.handler_timeout
        with self.engine.client.bound_paused():
            return await handler.run_limited(ctx, limit)

    def abandon_open(self, reason: str) -> None:
        """Publish every hit still open (the connection went away): their records say why they end here."""
        for hit in list(self.open):
            for record in hit.records:
                record.add_error(reason)
            self.finish(hit)

    def abandon(self, hit: Hit) -> None:
        """Publish a hit whose instruction's step never ran (the guest went elsewhere): no post values."""
        note = "the probed instruction's step did not run; no post values"
        for probe, record in zip(hit.probes, hit.records, strict=True):
            if probe.post is not None:
                record.add_error(note)
        self.finish(hit)

    def finish(self, hit: Hit) -> None:
        """Filter and publish every record of the hit."""
        try:
            self.open.remove(hit)
        except ValueError:
            return  # published already
        for probe, record in zip(hit.probes, hit.records, strict=True):
            self.publish(probe, record)

    def publish(self, probe: Probe, record: HitRecord) -> None:
        """Publish one record unless the probe's filter rejects it (then it is counted in `filtered`)."""
        if probe.condition is not None:
            values: dict[str, Any] = {}
            if isinstance(record.pre, dict):
                values.update(record.pre)
            if isinstance(record.post, dict):
                values.update(record.post)
            if not probe.condition.matches(values):
                probe.filtered += 1
                self._explain(probe, values)
                return
        if probe.internal:
            return  # a guest model's own hook: its handler did its work
        self.records += 1
        self.engine.hub.publish(record.as_dict())

    def _explain(self, probe: Probe, values: dict[str, Any]) -> None:
        """Say once per probe and field why a filter could not hold: a field it uses was not fetched."""
        for name, reason in probe.condition.unknown_fields(values):
            if (probe.id, name) not in self._warned:
                self._warned.add((probe.id, name))
                log.warning(
                    "probe %s: filter %r is false while field %r is not fetched (%s)",
                    probe.name, probe.condition.expr, name, reason,
                )

    def count_missed(self, probe_id: int) -> None:
        """A subscriber dropped a record of this probe."""
        try:
            self.engine.table.find(probe_id).missed += 1
        except ProbedError:
            pass
