"""Soak: probed against the bundled guest for a long while; memory, hit rate, missed records, gaps in `seq`.

A probed process (with an events file) on a QEMU guest, three probes hit on every turn of the guest's
loop (fetch args with a string; a post-handler; a filter that holds for none), and a follower reading `probectl events --follow`
over the control socket. Every `--interval` seconds a row: the daemon's RSS, hits and hits/s since the last
row, records, missed (records a reader was too slow for), the ring buffer's fill, and the gaps in each
probe's `seq` seen by the follower. At the end the events file is checked for gaps too, and the daemon is
stopped with SIGTERM (exit 0, guest left running).

    python bench/soak.py [--duration 600] [--interval 30] [--arch i386|x86_64] [--buffer-bytes 64M]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probed.front.cli import Client, NoDaemon  # noqa: E402
from probed.testing.daemon import DaemonProcess, rss_bytes  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402

PROBES = [
    ["add", "-n", "args", "probe_target", "a=$arg1:u32", "b=$arg2:u32", "name=+0($arg3):string"],
    ["add", "-n", "twice", "elsewhere", "x=$arg1:u32", "--post", "ret=%ax:u32"],
    ["add", "-n", "filtered", "write_watched", "turn=$arg1:u32", "--if", "turn > 100000000"],
]


class Follower(threading.Thread):
    """`events --follow` on the control socket: counts records and the gaps in each probe's `seq`."""

    def __init__(self, control: Path):
        super().__init__(daemon=True)
        self.client = Client(control)
        self.received = 0
        self.gaps = 0
        self.last: dict[int, int] = {}
        self.missed_reported = None

    def run(self) -> None:
        self.client.send("events", {"follow": True})
        try:
            while True:
                msg = self.client.read()
                if msg.get("method") != "event":
                    self.missed_reported = msg.get("result", {}).get("missed")
                    return
                record = msg["params"]
                self.count(record)
        except (NoDaemon, OSError, ValueError):
            return

    def count(self, record: dict) -> None:
        self.received += 1
        previous = self.last.get(record["probe"])
        if previous is not None and record["seq"] != previous + 1:
            self.gaps += record["seq"] - previous - 1
        self.last[record["probe"]] = record["seq"]


def gaps_in_file(path: Path) -> tuple[int, int]:
    """(records, gaps in seq) in an events file."""
    last: dict[int, int] = {}
    records = gaps = 0
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            records += 1
            if r["probe"] in last and r["seq"] != last[r["probe"]] + 1:
                gaps += r["seq"] - last[r["probe"]] - 1
            last[r["probe"]] = r["seq"]
    return records, gaps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    ap.add_argument("--interval", type=float, default=30, help="seconds between rows (default 30)")
    ap.add_argument("--arch", default="i386", choices=["i386", "x86_64"])
    ap.add_argument("--buffer-bytes", default="64M")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak") as tmp, QemuGuest(args.arch) as guest:
        control = Path(tmp) / "ctl" / "control.sock"
        events = Path(tmp) / "hits.jsonl"
        daemon = DaemonProcess(guest.target, control, "--symbols", str(guest.elf), "--no-state", "--stopped",
                               "--events", str(events), "--buffer-bytes", args.buffer_bytes)
        try:
            for probe in PROBES:
                daemon.ctl(*probe)
            follower = Follower(control)
            follower.start()
            began = time.monotonic()
            daemon.ctl("resume")
            rows = []
            print(f"soak: {args.arch} guest, {len(PROBES)} probes, {args.duration:g} s, a row every {args.interval:g} s",
                  flush=True)
            header = (f"{'t (s)':>6} {'RSS MiB':>8} {'hits':>10} {'hits/s':>8} {'records':>10} {'missed':>7} "
                      f"{'ring MiB':>8} {'followed':>10} {'seq gaps':>8}")
            print(header, flush=True)
            last_hits, last_t = 0, began
            while True:
                now = time.monotonic()
                t = now - began
                stats = daemon.json("stats")
                row = dict(t=t, rss=rss_bytes(daemon.proc.pid) / 2**20, hits=stats["hits"],
                           rate=(stats["hits"] - last_hits) / max(now - last_t, 1e-9), records=stats["records"],
                           missed=stats["missed"], ring=stats.get("buffer_bytes", 0) / 2**20,
                           followed=follower.received, gaps=follower.gaps)
                rows.append(row)
                rate = f"{row['rate']:8.0f}" if len(rows) > 1 else f"{'-':>8}"
                print(f"{row['t']:6.0f} {row['rss']:8.1f} {row['hits']:10d} {rate} {row['records']:10d} "
                      f"{row['missed']:7d} {row['ring']:8.1f} {row['followed']:10d} {row['gaps']:8d}", flush=True)
                last_hits, last_t = stats["hits"], now
                if t >= args.duration:
                    break
                time.sleep(min(args.interval, args.duration - t) if t < args.duration else 0)
            follower.client.close()
            code = daemon.stop()
            records, file_gaps = gaps_in_file(events)
            steady = [r["rss"] for r in rows[1:]] or [rows[0]["rss"]]
            print(f"RSS from {rows[0]['rss']:.1f} MiB to {rows[-1]['rss']:.1f} MiB "
                  f"(after the first row: min {min(steady):.1f}, max {max(steady):.1f})")
            print(f"hits/s over the run: {rows[-1]['hits'] / rows[-1]['t']:.0f}; missed: {rows[-1]['missed']}; "
                  f"follower: {follower.received} records, {follower.gaps} seq gaps")
            print(f"events file: {records} records, {file_gaps} seq gaps; probed exit code {code}; "
                  f"guest alive: {guest.alive()}")
            return 0 if code == 0 and file_gaps == 0 else 1
        finally:
            daemon.kill()


if __name__ == "__main__":
    sys.exit(main())
