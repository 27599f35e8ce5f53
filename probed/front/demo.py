"""`make demo`: the bundled guest in QEMU, the daemon, two probes on one hook point, hits printed live.

Everything it starts it stops: QEMU, the daemon and the event reader, even on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from probed.testing.qemu import QemuGuest

SECONDS = 4.0


def _ctl(control: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "probed.front.cli", "--control", str(control), *args]
    print("$ probectl " + " ".join(_quote(a) for a in args), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"probectl {args[0]} failed ({out.returncode}): {out.stderr.strip()}")
    if out.stdout.strip():
        print(out.stdout.rstrip(), flush=True)
    return out.stdout


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " %$()|&<>") else arg


def _wait_for_socket(daemon: subprocess.Popen, control: Path) -> None:
    # The daemon prints "ready" on stderr once its control socket listens; read until then.
    assert daemon.stderr is not None
    for line in daemon.stderr:
        sys.stderr.write("  [probed] " + line)
        if "ready" in line:
            return
    raise SystemExit(f"probed exited before it was ready (exit {daemon.wait()})")


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="probed-demo-"))
    control = workdir / "control.sock"
    daemon = follower = None
    print("Booting the bundled i386 guest in QEMU (TCG) ...", flush=True)
    with QemuGuest("i386", stopped=False) as guest:
        try:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "probed.front.daemon", "--target", guest.target, "--symbols", str(guest.elf),
                 "--control", str(control), "--events", str(workdir / "hits.jsonl")],
                stderr=subprocess.PIPE, text=True,
            )
            _wait_for_socket(daemon, control)
            _ctl(control, "add", "-n", "args", "probe_target", "a=$arg1:s32", "b=$arg2:s32",
                 "name=+0($arg3):string", "sp=%sp:x32", "--post", "sp=%sp:x32")
            _ctl(control, "add", "-n", "calls", "probe_target", "calls=@calls:u32", "--if", "calls < 1000000")
            _ctl(control, "hooks", "probe_*")
            print(f"\nHits, live, for {SECONDS:.0f} seconds:", flush=True)
            follower = subprocess.Popen(
                [sys.executable, "-m", "probed.front.cli", "--control", str(control), "events", "--follow"],
                text=True,
            )
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline and follower.poll() is None:
                try:
                    follower.wait(timeout=deadline - time.monotonic())
                except subprocess.TimeoutExpired:
                    break
            follower.terminate()
            follower.wait(timeout=10)
            print(flush=True)
            _ctl(control, "list")
            _ctl(control, "stats")
        finally:
            for proc in (follower, daemon):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if daemon is not None:
                print(f"probed exited with {daemon.returncode}; the guest ran on until QEMU was stopped.")
    hits = workdir / "hits.jsonl"
    if hits.exists():
        print(f"{sum(1 for _ in hits.open())} hit records were written to the events file.")
    shutil.rmtree(workdir, ignore_errors=True)
    os.environ.pop("PROBED_DEMO", None)


if __name__ == "__main__":
    main()
