"""GDB through probed's stub against GDB straight to QEMU, side by side on one guest.

Two jobs, each timed inside GDB (Python `time.perf_counter` around the loop):
- 2000 `stepi`;
- a `continue` loop to a breakpoint on `elsewhere` (one guest turn each), 500 times.
Printed: the rates and the ratio stub/direct (target >= 0.8).

    python bench/gdb_proxy.py [--steps N] [--continues N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probed.qemu import QemuGuest  # noqa: E402

SCRIPT = """
import gdb, time
gdb.execute("set pagination off")
t0 = time.perf_counter()
for _ in range({steps}):
    gdb.execute("stepi", to_string=True)
t1 = time.perf_counter()
gdb.execute("break elsewhere", to_string=True)
gdb.execute("continue", to_string=True)
before = int(gdb.parse_and_eval("turns"))
t2 = time.perf_counter()
for _ in range({continues}):
    gdb.execute("continue", to_string=True)
t3 = time.perf_counter()
turns = int(gdb.parse_and_eval("turns")) - before
print("RESULT", t1 - t0, t3 - t2, turns)
gdb.execute("delete")
gdb.execute("detach")
"""


def run_gdb(elf: Path, where: str, steps: int, continues: int) -> tuple[float, float, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(textwrap.dedent(SCRIPT.format(steps=steps, continues=continues)))
    try:
        out = subprocess.run(
            ["gdb", "-batch", "-nx", str(elf), "-ex", f"target remote {where}", "-x", f.name],
            capture_output=True, text=True, timeout=900,
        )
    finally:
        Path(f.name).unlink()
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            _, a, b, turns = line.split()
            return float(a), float(b), int(turns)
    raise RuntimeError(f"gdb failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--continues", type=int, default=500)
    args = ap.parse_args()
    rows = []
    with QemuGuest("i386", stopped=True) as guest:
        direct = run_gdb(guest.elf, guest.target.split(":", 1)[1], args.steps, args.continues)
        rows.append(("direct to QEMU", direct))
        with tempfile.TemporaryDirectory() as tmp:
            sock = Path(tmp) / "gdb.sock"
            daemon = subprocess.Popen(
                [sys.executable, "-m", "probed.daemon", "--target", guest.target, "--symbols", str(guest.elf),
                 "--control", str(Path(tmp) / "ctl.sock"), "--stopped", "--gdb-listen", f"unix:{sock}"],
                stderr=subprocess.PIPE, text=True,
            )
            try:
                for line in daemon.stderr:
                    if "ready" in line:
                        break
                stub = run_gdb(guest.elf, str(sock), args.steps, args.continues)
                rows.append(("through probed's stub", stub))
            finally:
                daemon.terminate()
                daemon.wait(timeout=30)
    for name, (steps_s, cont_s, turns) in rows:
        print(f"{name:<24} stepi {args.steps / steps_s:8.0f}/s   continue-to-breakpoint {args.continues / cont_s:7.0f}/s"
              f"   (guest advanced {turns} turns)")
        # One turn per continue: nothing skipped, nothing stopped twice.
        assert turns == args.continues, f"{name}: {turns} turns for {args.continues} continues"
    (_, (ds, dc, _)), (_, (ss, sc, _)) = rows
    print(f"\nstepi: stub / direct {ds / ss:.2f}   continue: stub / direct {dc / sc:.2f}   (target >= 0.8)")


if __name__ == "__main__":
    main()
