"""The cost of knowing the task: hits/s of a Linux probe with and without `$comm`, side by side on one guest.

One two-CPU Debian guest (tests/linux) runs its workload plus `cat /dev/zero > /dev/null` (started through
the guest's shell channel), which calls `vfs_read` far more often than probed can serve, so the rate measures
probed's cost per hit, not the guest's pace. A probe on it is added in turn with each variant of fetch args,
for the same time each, over several rounds (variant order alternating). Variants:
- `regs`: `%di` (registers only: the `g` packet every hit reads anyway);
- `comm`: `%di $comm` (plus the current task pointer at %gs_base+off, then its comm: two reads in two rounds);
- `task`: `%di $comm $pid $tid` (the same two rounds: the three fields are read in one batch).
Printed: each round's hits/s, the medians, and the median of the rounds' ratios to `regs`.

    PROBED_CACHE=... python bench/comm.py [--function NAME] [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probed.api import attach  # noqa: E402
from tests.linux.guest import LinuxGuest, fetch_linux  # noqa: E402

VARIANTS = {"regs": ["%di"], "comm": ["%di", "$comm"], "task": ["%di", "$comm", "$pid", "$tid"]}


async def measure(engine, function: str, args: list[str], seconds: float) -> float:
    probe = await engine.add_probe(function, pre=args)
    try:
        await trio.sleep(0.5)  # warm up: the first hits pay for the types (cached) and first reads
        h0, t0 = probe.hits, time.monotonic()
        await trio.sleep(seconds)
        h1, t1 = probe.hits, time.monotonic()
    finally:
        await engine.remove_probe(probe.id)
    return (h1 - h0) / (t1 - t0)


async def run(guest: LinuxGuest, function: str, seconds: float, rounds: int) -> None:
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    async with attach(guest.target, symbols=[str(guest.kallsyms)]) as engine:
        await engine.add_probe(function, pre=["$comm"])  # load the kernel's types once, outside the timing
        await engine.remove_all()
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                rates[variant].append(await measure(engine, function, VARIANTS[variant], seconds))
            print(f"round {r + 1}: " + "  ".join(f"{v}={rates[v][-1]:7.1f}/s" for v in VARIANTS), flush=True)
    print(f"\n{function}, {seconds:.0f} s per variant, {rounds} rounds: median hits/s, and the median of each "
          "round's ratio to regs (the variants of a round ran back to back)")
    for variant, args in VARIANTS.items():
        ratio = statistics.median(a / b for a, b in zip(rates[variant], rates["regs"], strict=True))
        print(f"  {variant:5} {statistics.median(rates[variant]):8.1f}/s  ratio {ratio:5.3f}   ({' '.join(args)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--function", default="vfs_read")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LinuxGuest(fetch_linux(), Path(tmp), smp=2) as guest:
        guest.shell("cat /dev/zero > /dev/null &")  # a reader that never waits: vfs_read as often as it can be
        trio.run(run, guest, opts.function, opts.seconds, opts.rounds)


if __name__ == "__main__":
    main()
