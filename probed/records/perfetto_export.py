"""Hit records as a Perfetto trace (TrackEvent protos, built with the `perfetto` package's trace builder).

One track per CPU, under a `probed` parent track. A record with a `duration_ns` (a return probe's) is a
slice from its entry to its return; any other record is an instant at its time. Each event carries the
record's fields as debug annotations (`args.*` in Perfetto's UI): the fetched values, `probe`, `seq`, `pc`,
`where`, and an `error` if there was one. Slices that overlap without nesting on one CPU (two tasks
interleaving in one function) go to extra tracks `cpuN (2)`, ... so each track nests properly.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import DebugAnnotation, TracePacket, TrackEvent
from perfetto.trace_builder.proto_builder import TraceProtoBuilder

__all__ = ["SEQUENCE_ID", "build_trace", "write_perfetto"]

SEQUENCE_ID = 0x70726F62  # "prob": one writer sequence for the whole file
ROOT_UUID = 0x70726F626564  # the `probed` parent track
_META = ("probe", "seq", "stop", "pc", "where", "kind", "comm", "pid", "error")


def _annotate(ann: DebugAnnotation, value: Any) -> None:
    if isinstance(value, bool):
        ann.bool_value = value
    elif isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            ann.int_value = value
        else:
            ann.string_value = hex(value)
    elif isinstance(value, float):
        ann.double_value = value
    elif isinstance(value, list):
        for item in value:
            _annotate(ann.array_values.add(), item)
    elif isinstance(value, dict):
        for key, item in value.items():
            entry = ann.dict_entries.add()
            entry.name = str(key)
            _annotate(entry, item)
    else:
        ann.string_value = "null" if value is None else str(value)


def _args(event: TrackEvent, record: dict[str, Any]) -> None:
    for phase, prefix in (("pre", ""), ("post", "post.")):
        values = record.get(phase)
        if isinstance(values, dict):
            for key, value in values.items():
                ann = event.debug_annotations.add()
                ann.name = prefix + str(key)
                _annotate(ann, value)
        elif values is not None:
            ann = event.debug_annotations.add()
            ann.name = phase
            _annotate(ann, values)
    for key in _META:
        if record.get(key) is not None:
            ann = event.debug_annotations.add()
            ann.name = key
            _annotate(ann, record[key])


def _lane(lanes: list[list[int]], start: int, end: int) -> int:
    """The first lane where [start, end) nests inside what is open there (ends are a stack per lane)."""
    for index, stack in enumerate(lanes):
        while stack and stack[-1] <= start:
            stack.pop()
        if not stack or end <= stack[-1]:
            stack.append(end)
            return index
    lanes.append([end])
    return len(lanes) - 1


def build_trace(records: Iterable[dict[str, Any]]) -> TraceProtoBuilder:
    """The trace for these records (any order); see the module's docstring for its shape."""
    builder = TraceProtoBuilder()
    first = True

    def packet(ts: int | None = None) -> TracePacket:
        nonlocal first
        pkt = builder.add_packet()
        pkt.trusted_packet_sequence_id = SEQUENCE_ID
        if first:
            pkt.sequence_flags = TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
            first = False
        if ts is not None:
            pkt.timestamp = ts
        return pkt

    root = packet().track_descriptor
    root.uuid, root.name = ROOT_UUID, "probed"
    tracks: dict[tuple[int, int], int] = {}
    lanes: dict[int, list[list[int]]] = {}
    # (ts, order, tie, track, record, what): at one time, slices end (the later-begun first), then instants
    # happen, then slices begin (the longer first); a zero-length slice ends right after it begins.
    events: list[tuple[int, int, int, int, dict[str, Any] | None, str]] = []

    def track(cpu: int, lane: int) -> int:
        key = (cpu, lane)
        if key not in tracks:
            uuid = tracks[key] = zlib.crc32(f"probed/cpu{cpu}/{lane}".encode()) | (1 << 40)
            desc = packet().track_descriptor
            desc.uuid, desc.parent_uuid = uuid, ROOT_UUID
            desc.name = f"cpu{cpu}" if lane == 0 else f"cpu{cpu} ({lane + 1})"
        return tracks[key]

    ordered = sorted(records, key=lambda r: (int(r.get("time_ns") or 0) - int(r.get("duration_ns") or 0),
                                             -int(r.get("duration_ns") or 0)))
    for record in ordered:
        end = int(record.get("time_ns") or 0)
        cpu = int(record.get("cpu") or 0)
        duration = record.get("duration_ns")
        if duration is None:
            events.append((end, 1, 0, track(cpu, 0), record, "instant"))
            continue
        start = end - int(duration)
        uuid = track(cpu, _lane(lanes.setdefault(cpu, []), start, end))
        events.append((start, 2, start - end, uuid, record, "begin"))
        events.append((end, 3 if start == end else 0, -start, uuid, None, "end"))
    for ts, _, _, uuid, record, what in sorted(events, key=lambda e: e[:3]):
        event = packet(ts).track_event
        event.track_uuid = uuid
        if what == "end":
            event.type = TrackEvent.TYPE_SLICE_END
            continue
        event.type = TrackEvent.TYPE_INSTANT if what == "instant" else TrackEvent.TYPE_SLICE_BEGIN
        event.name = str(record["name"])
        event.categories.append(record.get("kind") or "break")
        _args(event, record)
    return builder


def write_perfetto(records: Iterable[dict[str, Any]], path: str) -> int:
    """Write the records' trace to `path` (open it at https://ui.perfetto.dev); returns the bytes written."""
    data = build_trace(records).serialize()
    with open(path, "wb") as out:
        out.write(data)
    return len(data)
