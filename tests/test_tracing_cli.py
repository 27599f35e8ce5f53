"""probectl load/save, trace_pipe lines, aggregations and the Perfetto export, for real: probed and probectl
as processes, the bundled deterministic guest under QEMU.

The guest's contract: call n of `probe_target` has a = n, b = 3n + 1, name = names[n % 4]. A filter
`a <= N` makes a probe report exactly N records over the guest's life, so counts are exact however long the
guest runs on.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

from probed.records.maps_text import format_map, hist_label
from tests.daemon import Daemon

NAMES = ["alpha", "beta", "gamma", "delta"]
N = 22


@pytest.fixture
def daemon(guest_i386, tmp_path):
    d = Daemon(guest_i386, tmp_path, "--stopped")
    yield d
    d.kill()


def test_load_save_round_trip(daemon, tmp_path):
    text = (
        "# probes for the test guest\n"
        "\n"
        "p:mygrp/first probe_target a=$arg1:s32 name=+0($arg3):string\n"
        "p probe_target+1 b=+12(%sp):u32   # after push %ebp: b is one word further\n"
        "p:second guest:elsewhere\n"
    )
    src = tmp_path / "probes.kprobe_events"
    src.write_text(text)
    out = daemon.ctl("load", str(src)).stdout
    assert out.splitlines() == ["1 first", "2 p_probe_target_1", "3 second"]
    saved = daemon.ctl("save").stdout
    assert saved == (
        "p:mygrp/first probe_target a=$arg1:s32 name=+0($arg3):string\n"
        "p:kprobes/p_probe_target_1 probe_target+1 b=+12(%sp):u32\n"
        "p:kprobes/second guest:elsewhere\n"
    )
    daemon.ctl("resume")
    first = daemon.records("first", 3)
    assert [r["pre"] for r in first] == [{"a": n, "name": NAMES[n % 4]} for n in (1, 2, 3)]
    second = daemon.records("p_probe_target_1", 2)
    assert [r["pre"] for r in second] == [{"b": 3 * n + 1} for n in (1, 2)]
    assert second[0]["where"] == "probe_target+0x1"

    # `-:` lines and a round trip through the saved file (from stdin).
    out = daemon.ctl("load", "-", check=0, input="-:mygrp/first\n-:p_probe_target_1\n-:second\n")
    assert out.stdout.splitlines() == ["- first", "- p_probe_target_1", "- second"]
    assert daemon.ctl("list").stdout.strip() == "no probes"
    daemon.ctl("load", "-", input=saved)
    daemon.ctl("save", str(tmp_path / "saved.txt"))
    assert (tmp_path / "saved.txt").read_text() == saved

    # What kprobe_events cannot say is kept as a comment.
    daemon.ctl("add", "-n", "filtered", "probe_target", "c=@calls:u32", "--if", "c >= 2", "--post", "ip=%ip")
    assert daemon.ctl("save").stdout.endswith(
        "# probed: filtered: --post ip=%ip; --if 'c >= 2' (not in kprobe_events syntax)\n"
        "p:kprobes/filtered probe_target c=@calls:u32\n"
    )


def test_load_errors_name_line_and_column_and_change_nothing(daemon, tmp_path):
    daemon.ctl("add", "-n", "kept", "probe_target")
    before = daemon.ctl("save").stdout

    def refused(text: str, code: int = 1) -> str:
        f = tmp_path / "bad.txt"
        f.write_text(text)
        out = daemon.ctl("load", str(f), check=code)
        assert daemon.ctl("save").stdout == before
        return out.stderr

    err = refused("p:ok probe_target\np:2bad probe_target\n")
    assert f"{tmp_path / 'bad.txt'}:2:3: bad event name '2bad'" in err and "\n    ^" in err
    err = refused("p:ok probe_target\np:typo probe_targt\n")
    assert "bad.txt:2:8: unknown symbol 'probe_targt'" in err and "probe_target" in err
    err = refused("p:ok probe_target\np:ok2 probe_target a=+4(%sp:s32\n")
    assert "bad.txt:2:28: expected )" in err
    err = refused("-:nothere\n")
    assert "bad.txt:1:3: no event nothere to remove" in err
    err = refused("-:other/kept\n")  # probes added by probectl add are in the default group
    assert "bad.txt:1:9: no event other/kept to remove" in err
    err = refused("p:kept elsewhere\n")
    assert "an event named 'kept' exists already" in err
    err = refused("r5000:ret probe_target $retval\n")
    assert "bad.txt:1:2: MAXACTIVE must be 1..4096" in err
    err = refused("p:up /bin/true:0x1000 %ax\n")
    assert "bad.txt:1:6: user probes need a Linux guest with its kernel's types (BTF)" in err
    daemon.ctl("add", "-n", "pret", "probe_target%return", "$retval")
    # The default maxactive (max(10, 2 * CPUs)) is written out, so a load gives the same probe back.
    assert daemon.ctl("save").stdout.endswith("r10:kprobes/pret probe_target $retval\n")
    assert daemon.ctl("load", str(tmp_path / "missing.txt"), check=2).stderr.startswith("probectl: cannot read")


def test_events_as_trace_pipe_lines(daemon):
    daemon.ctl("add", "-n", "pt", "probe_target", "a=$arg1:s32", "b=$arg2:x32", "name=+0($arg3):string")
    daemon.ctl("resume")
    lines = daemon.ctl("events", "--probe", "pt", "--count", "3", "--format", "trace").stdout.splitlines()
    records = daemon.records("pt", 3)
    pattern = re.compile(r"^ +<\.\.\.>-0 +\[000\] \.\.\.\.\. +(\d+)\.(\d{6}): pt: \(probe_target\) (.*)$")
    for n, (line, rec) in enumerate(zip(lines, records, strict=True), start=1):
        m = pattern.match(line)
        assert m, line
        assert int(m.group(1)) * 10**6 + int(m.group(2)) == rec["time_ns"] // 1000
        assert m.group(3) == f'a={n} b={3 * n + 1:#x} name="{NAMES[n % 4]}"'


def test_aggregations_exact_live_and_from_the_ring(daemon):
    daemon.ctl("add", "-n", "pt", "probe_target", "a=$arg1:s32", "b=$arg2:s32", "name=+0($arg3):string",
               "--if", f"a <= {N}")
    daemon.ctl("add", "-n", "other", "elsewhere", "--if", "0 == 1")  # never reports: no records
    # Maps made while the guest is held see every record live.
    assert daemon.ctl("count", "pt", "--by", "name").stdout == ""
    assert daemon.ctl("hist", "pt", "a").stdout == ""
    follow = subprocess.Popen(
        [sys.executable, "-m", "probed.front.cli", "--control", str(daemon.control), "sum", "pt", "a", "--by",
         "name", "--follow", "--interval", "0.1", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        daemon.ctl("resume")
        assert len(daemon.records("pt", N)) == N
        for line in follow.stdout:  # the map as it grows, until all N records are in
            if json.loads(line)["records"] == N:
                break
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=30) == 0
    finally:
        follow.kill()
        follow.stdout.close()

    ns = range(1, N + 1)
    by_name = {name: [n for n in ns if NAMES[n % 4] == name] for name in NAMES}
    count = daemon.ctl("count", "pt", "--by", "name").stdout
    expected = sorted(by_name.items(), key=lambda kv: (len(kv[1]), kv[0]))
    assert count == "".join(f"@[{name}]: {len(v)}\n" for name, v in expected)
    sums = json.loads(daemon.ctl("sum", "pt", "a", "--by", "name", "--json").stdout)
    assert {r["key"][0]: r["value"] for r in sums["rows"]} == {name: sum(v) for name, v in by_name.items()}
    assert daemon.ctl("min", "pt", "b").stdout == "@: 4\n"
    assert daemon.ctl("max", "pt", "b").stdout == f"@: {3 * N + 1}\n"
    assert daemon.ctl("avg", "pt", "b").stdout == f"@: {sum(3 * n + 1 for n in ns) // N}\n"
    hist = daemon.ctl("hist", "pt", "a").stdout.splitlines()
    buckets = {}
    for n in ns:
        buckets[hist_label(n.bit_length())] = buckets.get(hist_label(n.bit_length()), 0) + 1
    assert hist[0] == "@:"
    assert [(row[:16].strip(), int(row[16:24])) for row in hist[1:-1]] == list(buckets.items())
    assert hist[-1] == "" and all(row.endswith("|") and len(row) == 16 + 8 + 2 + 52 + 1 for row in hist[1:-1])
    # Count by probe over every probe; a map made now starts from the ring buffer and agrees.
    assert daemon.ctl("count").stdout == f"@[pt]: {N}\n"
    assert daemon.ctl("count", "pt").stdout == f"@: {N}\n"
    maps = json.loads(daemon.ctl("maps", "--json").stdout)
    assert len(maps) == 8 and all(m["records"] == N for m in maps)
    listing = daemon.ctl("maps").stdout
    assert f"# count() over pt by name: {N} records\n" + count in listing
    assert f"# hist(a) over pt: {N} records\n@:\n" in listing
    assert daemon.ctl("count", "pt", "--clear").stdout.strip() == "cleared"
    assert len(json.loads(daemon.ctl("maps", "--json").stdout)) == 7
    # Removing a probe ends its maps.
    daemon.ctl("rm", "pt")
    assert [m["probe"] for m in json.loads(daemon.ctl("maps", "--json").stdout)] == [None]
    out = daemon.ctl("sum", "other", check=2)
    assert "FIELD" in out.stderr
    out = daemon.ctl("hist", "nothere", "a", check=1)
    assert "no probe 'nothere'" in out.stderr


def test_python_api_aggregate(guest_i386):
    import trio

    from probed.api import aggregate, attach

    async def main():
        async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
            probe = await engine.add_probe("probe_target", pre=["a=$arg1:s32"], condition="a <= 10")
            with aggregate(engine, "hist", probe=probe, field="a") as hist, \
                    aggregate(engine, "count", by=("probe",)) as count, engine.hub.subscribe(probe.id) as sub:
                await engine.resume()
                for _ in range(10):
                    await sub.receive()
                return format_map(hist.snapshot()), format_map(count.snapshot())

    hist, count = trio.run(main)
    assert count == "@[probe_target]: 10\n"
    assert [line.split("|")[0].split() for line in hist.splitlines()[1:-1]] == [
        ["[1]", "1"], ["[2,", "4)", "2"], ["[4,", "8)", "4"], ["[8,", "16)", "3"]]


def test_export_perfetto_reads_back(daemon, tmp_path):
    daemon.ctl("add", "-n", "pt", "probe_target", "a=$arg1:s32", "name=+0($arg3):string", "--if", "a <= 5")
    daemon.ctl("resume")
    records = daemon.records("pt", 5)
    out = daemon.ctl("export", "--perfetto", str(tmp_path / "hits.pftrace")).stdout
    assert out.startswith("5 records, ") and "ui.perfetto.dev" in out
    trace = Trace()
    trace.ParseFromString((tmp_path / "hits.pftrace").read_bytes())
    tracks = {p.track_descriptor.uuid: p.track_descriptor.name for p in trace.packet if p.HasField("track_descriptor")}
    events = [p for p in trace.packet if p.HasField("track_event")]
    assert sorted(tracks.values()) == ["cpu0", "probed"]
    assert [p.timestamp for p in events] == [r["time_ns"] for r in records]
    for p, rec in zip(events, records, strict=True):
        ev = p.track_event
        assert (ev.type, ev.name, tracks[ev.track_uuid]) == (TrackEvent.TYPE_INSTANT, "pt", "cpu0")
        args = {a.name: a for a in ev.debug_annotations}
        assert args["a"].int_value == rec["pre"]["a"] and args["name"].string_value == rec["pre"]["name"]
        assert args["seq"].int_value == rec["seq"]


def test_kprobe_events_on_the_linux_kernel(linux_guest, tmp_path):
    """The kernel documentation's example line, and a do_sys_openat2 probe seen in trace_pipe form."""

    class Kernel:  # what Daemon needs: the target and the symbol file
        target = linux_guest.target
        elf = linux_guest.kallsyms

    daemon = Daemon(Kernel, tmp_path)
    try:
        text = (
            "# Documentation/trace/kprobetrace.rst\n"
            "p:myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)\n"
            "p:opens do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring\n"
        )
        assert daemon.ctl("load", "-", input=text).stdout.splitlines() == ["1 myprobe", "2 opens"]
        assert daemon.ctl("save").stdout == (
            "p:kprobes/myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)\n"
            "p:kprobes/opens do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring\n"
        )
        # kprobetrace.rst's return probe: `r:myretprobe do_sys_open $retval`.
        assert daemon.ctl("load", "-", input="r:myretprobe do_sys_openat2 $retval\n").stdout.split() == ["3", "myretprobe"]
        # The guest's workload cats /etc/hostname every turn: its open shows in trace_pipe form.
        lines = daemon.ctl("events", "--probe", "opens", "--count", "40", "--format", "trace").stdout.splitlines()
        pattern = re.compile(r'^ +<\.\.\.>-0 +\[000\] \.\.\.\.\. +\d+\.\d{6}: opens: \(do_sys_openat2\) '
                             r'dfd=-?\d+ filename=".*"$')
        assert all(pattern.match(line) for line in lines), lines
        assert any(line.endswith('dfd=-100 filename="/etc/hostname"') for line in lines)
        snap = json.loads(daemon.ctl("count", "opens", "--by", "filename", "--json").stdout)
        rows = {row["key"][0]: row["value"] for row in snap["rows"]}
        assert rows["/etc/hostname"] >= 1 and sum(rows.values()) == snap["records"] >= 40
        daemon.ctl("load", "-", input="-:kprobes/myprobe\n-:opens\n-:myretprobe\n")
        assert daemon.ctl("list").stdout.strip() == "no probes"
    finally:
        assert daemon.stop() == 0


def test_loaded_probes_are_in_the_state_file(guest_i386, tmp_path):
    first = Daemon(guest_i386, tmp_path, "--stopped")
    try:
        first.ctl("load", "-", input="p:kept probe_target a=$arg1:s32\n")
    finally:
        assert first.stop() == 0
    second = Daemon(guest_i386, tmp_path)  # the same control socket, so the same state file
    try:
        assert [(p["name"], p["spec"]) for p in json.loads(second.ctl("list", "--json").stdout)] == [
            ("kept", "probe_target")]
        a = [r["pre"]["a"] for r in second.records("kept", 2)]
        assert a[1] == a[0] + 1
    finally:
        assert second.stop() == 0
