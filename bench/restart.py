"""Restart: how long a guest stays stopped when probed is killed outright (kill -9) and started again.

A probed with a state file and two probes on the bundled guest is SIGKILLed (the guest then stops at its next
breakpoint and stays stopped: QMP says so), and a new probed is started on the same state. Measured from the
new process's spawn: its "ready" line, the guest's CPUs running again (QMP `query-status`, polled every
5 ms), and the first hit record of a re-added probe (read over the control socket). The issue's goal: guest
running and probes back within 2 s. Also printed, for scale: the same daemon's start with no state at all.

    python bench/restart.py [--rounds 5] [--arch i386|x86_64]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probed.front.cli import Client  # noqa: E402
from probed.testing.daemon import DaemonProcess, qmp_args, qmp_status, wait_for  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402


def first_record(control: Path) -> dict:
    client = Client(control)
    try:
        client.send("events", {"count": 1})
        while True:
            msg = client.read()
            if msg.get("method") == "event":
                return msg["params"]
    finally:
        client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", default="i386", choices=["i386", "x86_64"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rst") as tmp:
        qmp = Path(tmp) / "qmp.sock"
        control = Path(tmp) / "ctl" / "control.sock"
        with QemuGuest(args.arch, extra_args=qmp_args(qmp)) as guest:
            extra = ("--symbols", str(guest.elf))
            daemon = DaemonProcess(guest.target, control, *extra)
            daemon.ctl("add", "-n", "calls", "probe_target", "c=@calls:u32")
            daemon.ctl("add", "-n", "twice", "elsewhere", "x=$arg1:u32", "--post", "ret=%ax:u32")
            rows = []
            for _ in range(args.rounds):
                first_record(control)
                daemon.kill()
                assert qmp_status(qmp)["running"] is False
                daemon = DaemonProcess(guest.target, control, *extra)
                spawned = daemon.started
                running = wait_for(lambda: qmp_status(qmp)["running"] and time.monotonic(), timeout=30, interval=0.005)
                record = first_record(control)
                probe_back = time.monotonic()
                assert record["seq"] == 1
                inside = float(re.search(r"\(([0-9.]+) s after start\)", daemon.text()).group(1))
                rows.append((daemon.ready_at - spawned, running - spawned, probe_back - spawned, inside))
            assert daemon.stop() == 0
            plain = DaemonProcess(guest.target, Path(tmp) / "c2" / "control.sock", "--no-state", *extra)
            plain_ready = plain.ready_at - plain.started
            assert plain.stop() == 0
    print(f"restart after kill -9 ({args.arch}, 2 probes, {args.rounds} rounds), seconds from the new probed's spawn:")
    print("(attach+re-add: from probed's run() to its ready line, i.e. without the interpreter's start)")
    print(f"{'round':>5} {'ready':>7} {'running':>8} {'1st hit':>8} {'attach+re-add':>14}")
    for n, (ready, running, hit, inside) in enumerate(rows, 1):
        print(f"{n:5d} {ready:7.3f} {running:8.3f} {hit:8.3f} {inside:14.3f}")
    for label, i in (("ready", 0), ("running", 1), ("1st hit", 2), ("attach+re-add", 3)):
        values = [r[i] for r in rows]
        print(f"{label:>8}: median {statistics.median(values):.3f} s, max {max(values):.3f} s")
    print(f"for scale: probed with no state, spawn to ready: {plain_ready:.3f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    worst = max(r[2] for r in rows)
    print(f"goal (guest running and probes back within 2 s): {'met' if worst < 2 else 'NOT met'} (worst {worst:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
