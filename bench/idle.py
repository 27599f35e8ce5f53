"""What idle probes cost the guest: its own loop's speed (turns per second, read from its memory while it
runs) with no probe, and with 10 and 100 probes that are never hit, on the page of the hot loop and on
other pages, armed as software or hardware breakpoints, or disabled.

Why the page matters (QEMU 7.2, TCG): before running a translation block QEMU checks the breakpoints, and
a breakpoint anywhere on the block's page makes QEMU translate that page one instruction per block, without
chaining blocks; every breakpoint is looked at on those checks. The bundled i386 guest's whole program is
one page (0x100000-0x100243), so "hot page" probes sit on code of that page that the loop never runs
(the second CPU's code, the boot code), and "cold page" probes on a page of RAM nothing executes.

`turns` is read straight from guest RAM (`/proc/PID/mem`, as probed's direct reads do), so measuring does
not stop the guest. Printed per configuration: turns per second of wall time, and turns per second of QEMU's
CPU time (its threads' schedstat), which a busy host does not skew. Rounds of every configuration, one after
the other; medians.

    python bench/idle.py [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probed.api import attach  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402

COLD = 0x200000  # RAM that holds no code
IDLE_FUNCTIONS = ("start_ap", "ap_main", "send_ipi", "depth_sum")  # code CPU 0's loop never runs (one CPU)
CONFIGS = [
    ("no probe", 0, "hot", "sw"),
    ("10 on other pages", 10, "cold", "sw"),
    ("100 on other pages", 100, "cold", "sw"),
    ("10 on the hot page", 10, "hot", "sw"),
    ("100 on the hot page", 100, "hot", "sw"),
    ("100 on the hot page, disabled", 100, "hot", "off"),
    ("4 on the hot page", 4, "hot", "sw"),
    ("4 on the hot page, hardware", 4, "hot", "hw"),
]


def idle_addresses(symbols, count: int, where: str) -> list[int]:
    """`count` addresses never executed: on a page of no code, or inside code of the hot page the loop
    does not run (any byte of it: QEMU compares addresses, the instruction boundary does not matter)."""
    if where == "cold":
        return [COLD + 16 * i for i in range(count)]
    pool = []
    for name in IDLE_FUNCTIONS:
        try:
            sym = symbols.lookup(name)
        except Exception:  # noqa: BLE001  (an older guest without it)
            continue
        pool += range(sym.address, sym.address + sym.size)
    assert len(pool) >= count, f"only {len(pool)} idle code bytes"
    return pool[:count]


def cpu_seconds(pid: int) -> float:
    """CPU time QEMU's threads have had (schedstat: nanoseconds on a CPU)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            continue
    return total / 1e9


async def turns_per_second(engine, turns_phys: int, seconds: float) -> tuple[float, float]:
    """Turns per second of wall time, and per second of QEMU's CPU time (what the host's load does not
    change: on a busy host QEMU gets less CPU, but the CPU a turn costs is the same)."""
    ram = engine.target.memory.ram

    def turns() -> int:
        return int.from_bytes(ram.read(turns_phys, 4), "little")

    t0, c0, n0 = time.perf_counter(), cpu_seconds(ram.pid), turns()
    await trio.sleep(seconds)
    t1, c1, n1 = time.perf_counter(), cpu_seconds(ram.pid), turns()
    return (n1 - n0) / (t1 - t0), (n1 - n0) / (c1 - c0)


async def run(seconds: float, rounds: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in CONFIGS}
    with QemuGuest("i386", stopped=True) as guest:
        async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
            if not engine.target.memory.direct:
                raise SystemExit(f"needs guest RAM read directly: {engine.target.memory.reason}")
            turns = engine.symbols.lookup("turns").address  # no paging: physical == virtual
            await engine.resume()
            await trio.sleep(0.5)  # past the boot code
            for _ in range(rounds):
                for label, count, where, how in CONFIGS:
                    if count and where == "hot":
                        hot = {a // 4096 for a in idle_addresses(engine.symbols, count, where)}
                        assert hot == {engine.symbols.lookup("probe_target").address // 4096}, "not the loop's page"
                    probes = [await engine.add_probe(f"{a:#x}", hw=how == "hw") for a in idle_addresses(engine.symbols, count, where)]
                    for p in probes if how == "off" else []:
                        await engine.disable_probe(p.id)
                    await trio.sleep(0.2)  # QEMU retranslates after the change
                    results[label].append(await turns_per_second(engine, turns, seconds))
                    for p in probes:
                        assert p.hits == 0, f"{label}: an idle probe was hit"
                        await engine.remove_probe(p.id)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results = trio.run(run, args.seconds, args.rounds)
    wall0 = statistics.median(w for w, _ in results["no probe"])
    cpu0 = statistics.median(c for _, c in results["no probe"])
    print(f"guest loop speed (i386 guest; medians of {args.rounds} rounds of {args.seconds:g} s)")
    print(f"  {'':<32} {'turns/s':>10} {'of none':>8}   {'turns/CPU-s':>12} {'of none':>8}")
    for label, values in results.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"  {label:<32} {wall:10.0f} {wall / wall0:8.2f}   {cpu:12.0f} {cpu / cpu0:8.2f}")


if __name__ == "__main__":
    main()
