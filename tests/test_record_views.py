"""Views of hit records without a guest: bpftrace map printing, trace_pipe lines, the Perfetto trace.

The same views are checked against real records from a real guest in tests/test_tracing_cli.py.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

from probed.records.aggregate import Aggregation, hist_bucket
from probed.records.events import EventHub
from probed.records.maps_text import format_map, hist_label
from probed.records.perfetto_export import build_trace
from probed.records.trace_text import format_trace_line


def _record(seq, probe=1, name="p", cpu=0, time_ns=1_000_000_000, **pre):
    return {"probe": probe, "name": name, "seq": seq, "stop": seq, "time_ns": time_ns, "cpu": cpu, "pc": "0x1000",
            "where": "probe_target", "pre": pre, "post": None, "error": None}


def test_hist_buckets_and_labels_as_bpftrace():
    assert [hist_bucket(v) for v in (-5, 0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [-1, 0, 1, 2, 2, 3, 3, 4, 10, 11]
    assert [hist_label(b) for b in (-1, 0, 1, 2, 3, 11, 12, 21)] == [
        "(..., 0)", "[0]", "[1]", "[2, 4)", "[4, 8)", "[1K, 2K)", "[2K, 4K)", "[1M, 2M)"]


@given(st.lists(st.integers(-(1 << 40), 1 << 40), min_size=1, max_size=60))
def test_hist_counts_every_value_in_its_power_of_two_bucket(values):
    agg = Aggregation("hist", field="v")
    for i, v in enumerate(values):
        agg.add(_record(i, v=v))
    (row,) = agg.rows()
    for bucket, n in row["buckets"].items():
        b = int(bucket)
        inside = [v for v in values if (v < 0 if b < 0 else (v == 0 if b == 0 else (1 << (b - 1)) <= v < (1 << b)))]
        assert len(inside) == n
    assert sum(row["buckets"].values()) == len(values)


def test_maps_print_as_bpftrace_prints_them():
    count = Aggregation("count", by=("s",))
    hist = Aggregation("hist", field="a")
    stats = Aggregation("stats", field="a")
    for n in range(1, 23):
        for agg in (count, hist, stats):
            agg.add(_record(n, a=n, s=["delta", "alpha", "beta", "gamma"][n % 4]))
    assert format_map(count.snapshot()) == "@[delta]: 5\n@[gamma]: 5\n@[alpha]: 6\n@[beta]: 6\n"
    bar = "@" * 52
    assert format_map(hist.snapshot(), "a") == (
        "@a:\n"
        f"[1]                    1 |{'@' * 6:<52}|\n"
        f"[2, 4)                 2 |{'@' * 13:<52}|\n"
        f"[4, 8)                 4 |{'@' * 26:<52}|\n"
        f"[8, 16)                8 |{bar}|\n"
        f"[16, 32)               7 |{'@' * 45:<52}|\n"
        "\n"
    )
    assert format_map(stats.snapshot()) == "@: count 22, average 11, total 253\n"
    avg = Aggregation("avg", field="a")
    for v in (-7, 2):
        avg.add(_record(v, a=v))
    assert format_map(avg.snapshot()) == "@: -2\n"  # bpftrace truncates toward zero


def test_records_lacking_the_value_are_skipped_and_counted():
    agg = Aggregation("sum", field="a", by=("probe",))
    agg.add(_record(1, a=3))
    agg.add(_record(2, a="0x1f"))
    agg.add(_record(3, b=1))
    agg.add(_record(4, a=4, name="q"))
    assert (agg.records, agg.skipped) == (2, 2)
    assert format_map(agg.snapshot()) == "@[p]: 3\n@[q]: 4\n"


def test_a_consumer_on_the_hub_sees_every_record_a_full_subscription_misses():
    hub = EventHub(buffer=4)
    with hub.subscribe(maxsize=1) as slow, Aggregation("count").attach(hub) as agg:
        for n in range(1, 11):
            hub.publish(_record(n))
        assert agg.records == 10 and slow.missed == 9
    seeded = Aggregation("count").attach(hub, backlog=True)  # the ring keeps the newest 4
    hub.publish(_record(11))
    assert seeded.records == 5
    seeded.close()
    hub.publish(_record(12))
    assert seeded.records == 5


def test_trace_pipe_lines():
    rec = _record(1, time_ns=1_764_370_000_123_456_789, cpu=1, dfd=-100, filename="/etc/hostname", flags="0x8000",
                  raw=[1, 2], bad="<fault reading 0x0: E14>")
    line = format_trace_line(rec)
    assert line == ('           <...>-0       [001] ..... 1764370000.123456: p: (probe_target) dfd=-100 '
                    'filename="/etc/hostname" flags=0x8000 raw={1,2} bad=(fault)')
    fields = line.split()
    assert fields[0] == "<...>-0" and fields[1] == "[001]" and fields[3] == "1764370000.123456:"
    known = format_trace_line({**rec, "comm": "cat", "pid": 42, "pre": {}})
    assert re.match(r"^ {13}cat-42 +\[001\]", known)
    ret = format_trace_line({**rec, "kind": "return", "where": "do_sys_open+0x5a", "func": "0xffffffff81000000",
                             "func_where": "do_sys_openat2", "pre": {"ret": 3}, "duration_ns": 1500})
    assert "(do_sys_open+0x5a <- do_sys_openat2) ret=3 duration_ns=1500" in ret


def _events(trace: Trace):
    names = {p.track_descriptor.uuid: p.track_descriptor.name for p in trace.packet if p.HasField("track_descriptor")}
    return names, [p for p in trace.packet if p.HasField("track_event")]


def test_perfetto_slices_nest_per_cpu_and_instants_carry_args():
    recs = [
        # return probes on cpu0: an outer call [100, 1000) with a nested one [200, 300), and one that overlaps
        # the outer without nesting [900, 1200) (another task), which gets a second track.
        {**_record(1, name="outer", time_ns=1000, ret=1), "kind": "return", "duration_ns": 900},
        {**_record(2, name="inner", time_ns=300, ret=2), "kind": "return", "duration_ns": 100},
        {**_record(3, name="other", time_ns=1200, ret=3), "kind": "return", "duration_ns": 300},
        _record(4, name="entry", time_ns=250, cpu=1, a=7, s="x", arr=[1, 2]),
    ]
    trace = Trace()
    trace.ParseFromString(build_trace(recs).serialize())
    names, events = _events(trace)
    assert sorted(names.values()) == ["cpu0", "cpu0 (2)", "cpu1", "probed"]
    timeline = [(p.timestamp, names[p.track_event.track_uuid], TrackEvent.Type.Name(p.track_event.type),
                 p.track_event.name) for p in events]
    assert timeline == [
        (100, "cpu0", "TYPE_SLICE_BEGIN", "outer"),
        (200, "cpu0", "TYPE_SLICE_BEGIN", "inner"),
        (250, "cpu1", "TYPE_INSTANT", "entry"),
        (300, "cpu0", "TYPE_SLICE_END", ""),
        (900, "cpu0 (2)", "TYPE_SLICE_BEGIN", "other"),
        (1000, "cpu0", "TYPE_SLICE_END", ""),
        (1200, "cpu0 (2)", "TYPE_SLICE_END", ""),
    ]
    entry = next(p.track_event for p in events if p.track_event.name == "entry")
    args = {a.name: a for a in entry.debug_annotations}
    assert args["a"].int_value == 7 and args["s"].string_value == "x"
    assert [v.int_value for v in args["arr"].array_values] == [1, 2]
    assert args["seq"].int_value == 4 and args["where"].string_value == "probe_target"
