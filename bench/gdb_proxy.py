"""GDB through probed's stub against GDB straight to QEMU, side by side, in interleaved batches.

Two guests boot at once: one GDB attaches to the first straight, another to the second through probed's
stub. Both GDBs then wait on a pipe for orders, and the bench makes them take turns, batch by batch:
- `stepi` batches (`--steps` each) from `cpu0_main` on (the guest's code: the same instructions each time);
- `continue` batches (`--continues` each) to a breakpoint on `elsewhere` (one guest turn each).
Each batch is timed inside GDB (`time.perf_counter` around the loop); a round is one batch of each GDB,
who goes first alternating. Batches this short (a fraction of a second) keep both sides under the same
load even on a host whose load swings from second to second: the ratio of a round's two batches is
the measure, and the median over rounds is printed (target >= 0.85). Raw rates on a loaded host are noise.

Two conditions, each with fresh guests and GDBs:
- idle: nothing else of ours runs (others may load the host: the load average is printed);
- contended: more bundled guests (one per core by default) run freely on the same cores, each keeping
  a TCG thread busy, as on a host full of VMs.

With `--floors`, two more guests and GDBs take their turns in each round, through `bench/stub_floor.py`:
the least a stub in GDB's path must do, with the hops and local answers of probed's stub and nothing else,
once in Python and once in C (`bench/stub_floor.c`, built with `cc`). Their ratios tell what probed's own
code costs (probed against the Python floor) from what a Python process in GDB's path costs on this host
(the Python floor against the C one).

    python bench/gdb_proxy.py [--steps N] [--continues N] [--rounds N] [--transport unix|tcp]
                              [--conditions idle,contended] [--others N] [--floors]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probed.testing.qemu import QemuGuest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stub_floor  # noqa: E402

SCRIPT = """
import gdb, time
gdb.execute("set pagination off")
orders = open({orders!r})
answers = open({answers!r}, "w", buffering=1)
# Step the guest's own code, not the firmware's (which waits on timers, and so is not the same twice).
gdb.execute("tbreak cpu0_main", to_string=True)
gdb.execute("continue", to_string=True)
answers.write("ready\\n")
breaking = False
for line in orders:
    what, count = line.split()
    count = int(count)
    if what == "quit":
        break
    if what == "continue" and not breaking:
        gdb.execute("break elsewhere", to_string=True)
        gdb.execute("continue", to_string=True)
        breaking = True
    before = int(gdb.parse_and_eval("turns"))
    command = "stepi" if what == "stepi" else "continue"
    t0 = time.perf_counter()
    for _ in range(count):
        gdb.execute(command, to_string=True)
    t1 = time.perf_counter()
    answers.write(f"{{t1 - t0}} {{int(gdb.parse_and_eval('turns')) - before}}\\n")
gdb.execute("delete")
gdb.execute("detach")
"""


class Gdb:
    """A GDB attached to `where`, running `SCRIPT`: it does one batch per order and answers its time."""

    def __init__(self, elf: Path, where: str, workdir: Path, name: str):
        self.orders_path, answers = workdir / f"{name}.orders", workdir / f"{name}.answers"
        os.mkfifo(self.orders_path)
        os.mkfifo(answers)
        script = workdir / f"{name}.py"
        script.write_text(textwrap.dedent(SCRIPT.format(orders=str(self.orders_path), answers=str(answers))))
        # GDB's output goes to a file: a pipe nobody reads while GDB works would fill and stall it.
        self.log = workdir / f"{name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["gdb", "-batch", "-nx", str(elf), "-ex", f"target remote {where}", "-x", str(script)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        self.orders = open(self.orders_path, "w", buffering=1)  # noqa: SIM115 (open as long as GDB runs)
        self.answers = open(answers)  # noqa: SIM115
        if self.answers.readline().strip() != "ready":
            raise RuntimeError(f"{name}: GDB did not get ready:\n{self.output()}")

    def batch(self, what: str, count: int) -> tuple[float, int]:
        """Run one batch; returns (seconds, guest turns advanced)."""
        self.orders.write(f"{what} {count}\n")
        line = self.answers.readline()
        if not line:
            raise RuntimeError(f"GDB failed:\n{self.output()}")
        seconds, turns = line.split()
        return float(seconds), int(turns)

    def output(self) -> str:
        """The end of what GDB printed."""
        return self.log.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.orders.write("quit 0\n")
            self.orders.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.answers.close()


@contextlib.contextmanager
def probed_stub(guest: QemuGuest, transport: str, workdir: Path) -> Iterator[str]:
    """probed attached to `guest`, serving GDB the way GDB reaches QEMU (same transport); yields where."""
    listen = f"unix:{workdir / 'gdb.sock'}" if transport == "unix" else "tcp:127.0.0.1:0"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "probed.front.daemon", "--target", guest.target, "--symbols", str(guest.elf),
         "--control", str(workdir / "ctl.sock"), "--stopped", "--gdb-listen", listen],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        where = None
        for line in daemon.stderr:
            if "serving GDB on " in line:
                where = line.rsplit("serving GDB on ", 1)[1].strip().split(":", 1)[1]
            if "ready" in line:
                break
        assert where, "probed did not say where it serves GDB"
        yield where
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


@contextlib.contextmanager
def others_running(count: int) -> Iterator[None]:
    """`count` more bundled guests running freely (each keeps one host thread busy) while in the block."""
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(QemuGuest("i386", stopped=False))
        yield


def run_condition(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Batches of each GDB in turn; returns the median ratio to direct per job, for the stub (and floors)."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        direct_guest = stack.enter_context(QemuGuest("i386", stopped=True, gdb=args.transport))
        stub_guest = stack.enter_context(QemuGuest("i386", stopped=True, gdb=args.transport))
        where = stack.enter_context(probed_stub(stub_guest, args.transport, workdir))
        gdbs = {
            "direct": Gdb(direct_guest.elf, direct_guest.target.split(":", 1)[1], workdir, "direct"),
            "stub": Gdb(stub_guest.elf, where, workdir, "stub"),
        }
        stack.callback(gdbs["direct"].close)
        stack.callback(gdbs["stub"].close)
        if args.floors:
            floors: dict[str, Path | None] = {"python floor": None}
            native = stub_floor.build_native(workdir)
            if native is None:
                print("no C compiler: the C floor is left out")
            else:
                floors["C floor"] = native
            for name, native in floors.items():
                guest = stack.enter_context(QemuGuest("i386", stopped=True, gdb="unix"))
                floor_at = stack.enter_context(stub_floor.serving(guest.target, workdir, native))
                gdbs[name] = Gdb(guest.elf, floor_at, workdir, name.replace(" ", "-"))
                stack.callback(gdbs[name].close)
        others = [name for name in gdbs if name != "direct"]
        medians: dict[str, dict[str, float]] = {name: {} for name in others}
        for job, count in (("stepi", args.steps), ("continue", args.continues)):
            ratios: dict[str, list[float]] = {name: [] for name in others}
            rates: dict[str, list[float]] = {name: [] for name in gdbs}
            names = list(gdbs)
            for n in range(args.rounds):
                # Who goes first turns round by round.
                order = names[n % len(names):] + names[:n % len(names)]
                took = {}
                for name in order:
                    seconds, turns = gdbs[name].batch(job, count)
                    took[name] = seconds
                    rates[name].append(count / seconds)
                    # One turn per continue through the stub: nothing skipped, nothing stopped twice. (GDB
                    # straight to QEMU may fall short now and then: QEMU's step over the breakpoint
                    # sometimes runs nothing; probed steps again then. See docs/gdb.md.)
                    if job == "continue" and name == "stub":
                        assert turns == count, f"through the stub: {turns} turns for {count} continues"
                for name in others:
                    ratios[name].append(took["direct"] / took[name])
            for name in others:
                medians[name][job] = statistics.median(ratios[name])
                print(f"  {job:<9} direct {statistics.median(rates['direct']):6.0f}/s   "
                      f"{name} {statistics.median(rates[name]):6.0f}/s   (medians)   "
                      f"ratio per round: {' '.join(f'{r:.2f}' for r in ratios[name])}   "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
        return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="stepi per batch")
    ap.add_argument("--continues", type=int, default=50, help="continues per batch")
    ap.add_argument("--rounds", type=int, default=15, help="batches of each GDB, alternating (median ratio)")
    ap.add_argument("--transport", choices=["unix", "tcp"], default="unix", help="how GDB reaches QEMU and the stub")
    ap.add_argument("--conditions", default="idle,contended",
                    help="comma-separated: idle, contended (other guests busy on the same cores)")
    ap.add_argument("--others", type=int, default=len(os.sched_getaffinity(0)),
                    help="guests running freely in the contended condition (default: one per core)")
    ap.add_argument("--floors", action="store_true",
                    help="also GDB through bench/stub_floor.py, in Python and in C (unix transport only)")
    args = ap.parse_args()
    if args.floors and args.transport != "unix":
        ap.error("--floors serves GDB on unix sockets: use --transport unix")
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(conditions) - {"idle", "contended"}
    if unknown:
        ap.error(f"unknown condition(s) {sorted(unknown)}: choose from idle, contended")
    print(f"{len(os.sched_getaffinity(0))} cores; load average at start {os.getloadavg()[0]:.1f}; "
          f"batches of {args.steps} stepi / {args.continues} continues, {args.rounds} rounds")
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for condition in conditions:
        others = args.others if condition == "contended" else 0
        print(f"\n== {condition}" + (f": {others} other guests running freely" if others else ""), flush=True)
        with others_running(others):
            medians[condition] = run_condition(args)
    print()
    for condition, by_stub in medians.items():
        for name, m in by_stub.items():
            print(f"{condition:<10} median of {args.rounds} rounds: stepi: {name} / direct {m['stepi']:.2f}   "
                  f"continue: {name} / direct {m['continue']:.2f}" + ("   (target >= 0.85)" if name == "stub" else ""))


if __name__ == "__main__":
    main()
