"""Prometheus metrics for a long-running daemon (`probed --metrics tcp:127.0.0.1:PORT`), with prometheus-client.

Counters are read from the engine at each scrape, inside the engine's own trio thread (the HTTP server runs
in prometheus-client's thread), so a scrape never sees a half-updated probe table:

    probed_probe_hits_total{probe,name}      hits (counted before any filter)
    probed_probe_missed_total{probe,name}    records dropped for slow readers (kprobes' nmissed)
    probed_probe_faults_total{probe,name}    handler faults
    probed_probe_filtered_total{probe,name}  hits a filter did not report
    probed_stops_total, probed_hits_total, probed_records_total, probed_simulated_total
    probed_target_connected                  1 while attached to the target
    probed_target_state{state}               1 for the engine's state (running, stopped, detached, ...)
    probed_debug_register_slots{use}         held and free hardware slots
    probed_hit_latency_seconds               histogram: from the stop reply to the hit's record published

The listener is on a loopback address unless the daemon is told otherwise (`--metrics-public`).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from probed.errors import BadSpec

__all__ = ["EngineCollector", "parse_listen", "serve_metrics"]

LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


def parse_listen(spec: str, *, public: bool = False) -> tuple[str, int]:
    """`tcp:HOST:PORT` -> (host, port); a host that is not loopback only with `public`.

    Raises:
        BadSpec: not `tcp:HOST:PORT`, or not loopback without `public`.
    """
    kind, _, rest = spec.partition(":")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if kind != "tcp" or not host or not port.isdigit():
        raise BadSpec(spec, "metrics listen on tcp:HOST:PORT (e.g. tcp:127.0.0.1:9464)")
    if not public:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)}
        except socket.gaierror as exc:
            raise BadSpec(spec, f"cannot resolve {host}: {exc}") from None
        if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
            raise BadSpec(spec, f"{host} is not a loopback address; add --metrics-public to serve it anyway")
    return host, int(port)


class _Latency:
    """A hub consumer timing each stop's first record against the moment the engine saw the stop."""

    probe = None

    def __init__(self, engine: Any, histogram: Histogram):
        self.engine, self.histogram, self.last_stop = engine, histogram, None

    def _offer(self, record: dict[str, Any], size: int = 0, line: str | None = None) -> bool:
        seen = getattr(self.engine, "stop_seen_ns", None)
        if record.get("stop") != self.last_stop and seen:
            self.last_stop = record.get("stop")
            self.histogram.observe((time.perf_counter_ns() - seen) / 1e9)
        return True

    def close(self) -> None:
        """The hub ends its consumers when the engine stops; nothing to let go of here."""


class EngineCollector(Collector):
    """The engine's counters, read at scrape time in the engine's trio thread."""

    def __init__(self, engine: Any, token: trio.lowlevel.TrioToken):
        self.engine, self.token = engine, token

    def _snapshot(self) -> dict[str, Any]:
        e = self.engine
        return {
            "probes": [(p.id, p.name, p.hits, p.missed, p.faults, p.filtered) for p in e.probes()],
            "stats": {k: v for k, v in e.stats().items() if k != "slots"} if e.target is not None else {},
            "slots": e.slots.table(),
            "state": e.state,
            "connected": e.target is not None and getattr(getattr(e, "service", None), "dead", None) is None
            and e.state != "detached",
        }

    def collect(self):
        try:
            snap = trio.from_thread.run_sync(self._snapshot, trio_token=self.token)
        except trio.RunFinishedError:
            return
        families = {
            name: CounterMetricFamily(f"probed_probe_{name}", text, labels=["probe", "name"])
            for name, text in (("hits", "Hits of each probe (before filters)"),
                               ("missed", "Records of each probe dropped for slow readers"),
                               ("faults", "Handler faults of each probe"),
                               ("filtered", "Hits of each probe that its filter did not report"))
        }
        for pid, name, *values in snap["probes"]:
            for family, value in zip(families.values(), values, strict=True):
                family.add_metric([str(pid), name], value)
        yield from families.values()
        stats = snap["stats"]
        for key, text in (("stops", "Guest stops the engine handled"), ("hits", "Breakpoint hits"),
                          ("records", "Hit records published"), ("simulated", "Probed instructions simulated")):
            yield CounterMetricFamily(f"probed_{key}", text, value=stats.get(key, 0))
        yield GaugeMetricFamily("probed_target_connected", "1 while attached to the target",
                                value=1 if snap["connected"] else 0)
        state = GaugeMetricFamily("probed_target_state", "The engine's state", labels=["state"])
        state.add_metric([snap["state"]], 1)
        yield state
        slots = GaugeMetricFamily("probed_debug_register_slots", "Hardware debug-register slots", labels=["use"])
        held = sum(1 for s in snap["slots"] if s.get("owner"))
        slots.add_metric(["held"], held)
        slots.add_metric(["free"], len(snap["slots"]) - held)
        yield slots


async def serve_metrics(engine: Any, spec: str, *, public: bool = False,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the metrics until cancelled; `task_status.started((host, port))` with the port bound.

    Raises:
        BadSpec: see `parse_listen`.
        OSError: the address cannot be bound.
    """
    host, port = parse_listen(spec, public=public)
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, trio.lowlevel.current_trio_token()))
    latency = Histogram("probed_hit_latency_seconds", "From the stop reply to the hit's record published",
                        registry=registry, buckets=LATENCY_BUCKETS)
    consumer = _Latency(engine, latency)
    server, thread = start_http_server(port, host, registry=registry)
    engine.hub.add_consumer(consumer)
    try:
        task_status.started(server.server_address[:2])
        await trio.sleep_forever()
    finally:
        engine.hub.remove_consumer(consumer)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
        thread.join(timeout=5)
