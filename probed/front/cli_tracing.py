"""probectl's verbs for tracefs, bpftrace and Perfetto habits: load, save, count/sum/min/max/avg/stats/hist,
maps, export, top (the parsers and what each does over a `Client`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from probed.records.maps_text import format_map

__all__ = ["add_parsers", "collect_records", "run_tracing"]

AGGREGATIONS = ("count", "sum", "min", "max", "avg", "hist")  # bpftrace's stats(): the API (probectl stats is taken)
VERBS = ("load", "save", *AGGREGATIONS, "maps", "export", "top")


def add_parsers(sub: Any) -> None:
    """Add the verbs to probectl's subparsers."""
    load = sub.add_parser("load", help="apply a kprobe_events/uprobe_events file (all its lines, or none)")
    load.add_argument("file", metavar="FILE|-", help="the file, or - for stdin")
    save = sub.add_parser("save", help="write the probes as kprobe_events lines (to stdout, or FILE)")
    save.add_argument("file", nargs="?", type=Path, metavar="FILE")

    for func in AGGREGATIONS:
        value = func != "count"
        p = sub.add_parser(func, help=f"bpftrace's {func}() over hit records, kept in the daemon")
        p.add_argument("probe", nargs=None if value else "?", metavar="PROBE",
                       help="probe id or name" + ("" if value else " (none: count every probe's records, by probe)"))
        if value:
            p.add_argument("field", metavar="FIELD", help="the value: a fetched field, or duration_ns, cpu, ...")
        p.add_argument("--by", action="append", default=[], metavar="KEY",
                       help="a key: a fetched field, probe, cpu, comm, pid (repeatable)")
        p.add_argument("--follow", "-f", action="store_true", help="print the map again as it changes")
        p.add_argument("--interval", type=float, default=1.0, metavar="S", help="with --follow (default 1 s)")
        p.add_argument("--clear", action="store_true", help="stop this map and forget its counts")
        p.add_argument("--name", default="", help="the map's name after @ when printed")
        p.add_argument("--json", action="store_true")

    maps = sub.add_parser("maps", help="the aggregations the daemon keeps")
    maps.add_argument("--json", action="store_true")

    export = sub.add_parser("export", help="write the buffered hit records as a trace file")
    export.add_argument("--perfetto", type=Path, required=True, metavar="FILE",
                        help="a Perfetto trace (open it at https://ui.perfetto.dev)")
    export.add_argument("--probe", metavar="ID|NAME")

    top = sub.add_parser("top", help="live per-probe hits/s, missed, faults, filtered, slots (q quits)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S")


def run_tracing(args: argparse.Namespace, client: Any) -> int:
    """Carry out one of `VERBS`; returns the exit code."""
    cmd = args.command
    if cmd == "load":
        return _load(args, client)
    if cmd == "save":
        text = client.call("save")["text"]
        if args.file is None:
            sys.stdout.write(text)
        else:
            args.file.write_text(text)
        return 0
    if cmd in AGGREGATIONS:
        return _aggregate(args, client)
    if cmd == "maps":
        maps = client.call("aggregations")
        if args.json:
            print(json.dumps(maps))
        for snap in [] if args.json else maps:
            print(f"# {_describe(snap)}: {snap['records']} records")
            sys.stdout.write(format_map(snap) or "(empty)\n")
        return 0
    if cmd == "export":
        from probed.records.perfetto_export import write_perfetto

        records = collect_records(client, args.probe)
        size = write_perfetto(records, str(args.perfetto))
        print(f"{len(records)} records, {size} bytes in {args.perfetto} (open it at https://ui.perfetto.dev)")
        return 0
    if cmd == "top":
        from probed.front.top import run_top

        return run_top(client, args.interval)
    raise AssertionError(cmd)


def _load(args: argparse.Namespace, client: Any) -> int:
    if args.file == "-":
        text, source = sys.stdin.read(), "-"
    else:
        try:
            text, source = Path(args.file).read_text(), args.file
        except OSError as exc:
            print(f"probectl: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    result = client.call("load", {"text": text, "source": source})
    for info in result["added"]:
        print(f"{info['id']} {info['name']}")
    for name in result["removed"]:
        print(f"- {name}")
    return 0


def _params(args: argparse.Namespace) -> dict[str, Any]:
    by = list(args.by)
    if args.command == "count" and args.probe is None and not by:
        by = ["probe"]
    return {"func": args.command, "probe": args.probe, "field": getattr(args, "field", None), "by": by}


def _describe(snap: dict[str, Any]) -> str:
    what = f"{snap['func']}({snap['field'] or ''})"
    where = snap.get("probe_name") or "every probe"
    by = f" by {', '.join(snap['by'])}" if snap["by"] else ""
    return f"{what} over {where}{by}"


def _aggregate(args: argparse.Namespace, client: Any) -> int:
    params = _params(args)
    if args.clear:
        cleared = client.call("aggregate", {**params, "clear": True})["cleared"]
        print("cleared" if cleared else "no such map")
        return 0
    last = None
    while True:
        snap = client.call("aggregate", params)
        if last is None or snap["records"] != last["records"] or snap["skipped"] != last["skipped"]:
            if args.json:
                print(json.dumps(snap))
            else:
                if args.follow:
                    print(time.strftime("%H:%M:%S"))
                sys.stdout.write(format_map(snap, args.name))
                if args.follow:
                    print()
            sys.stdout.flush()
            last = snap
        if not args.follow:
            if snap["skipped"] and not args.json:
                print(f"probectl: {snap['skipped']} records lacked a key or an integer value", file=sys.stderr)
            return 0
        time.sleep(args.interval)  # a refresh period for a person watching, not synchronisation


def collect_records(client: Any, probe: str | None = None) -> list[dict[str, Any]]:
    """The records in the daemon's ring buffer (of one probe, or all), oldest first."""
    params: dict[str, Any] = {"follow": False}
    if probe is not None:
        params["probe"] = int(probe) if probe.isdigit() else probe
    client.send("events", params)
    records = []
    while True:
        msg = client.read()
        if msg.get("method") == "event":
            records.append(msg["params"])
            continue
        if "error" in msg:
            from probed.front.cli import DaemonError

            raise DaemonError(msg["error"])
        return records
