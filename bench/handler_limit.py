"""What a handler's time limit costs per hit: Python handlers with and without a limit, side by side.

Variants, one after the other on the same QEMU guest, each for the same number of hits on `probe_target`:
a sync handler inline (`timeout=0`: no limit, the baseline), a sync handler under a limit (it runs in a
worker thread), an async handler under a limit (a cancel scope). Printed: hits/s each and the ratio to the
baseline.

    python bench/handler_limit.py [--hits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probed.api import attach  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402


def sync_handler(ctx):
    return {"a": ctx.regs["eax"]}


async def async_handler(ctx):
    return {"a": ctx.regs["eax"]}


VARIANTS = {
    "sync, no limit (inline)": (sync_handler, 0),
    "sync, limit (thread)": (sync_handler, 5),
    "async, limit (cancel scope)": (async_handler, 5),
}


async def hits_per_second(engine, handler, timeout: float, hits: int) -> float:
    probe = await engine.add_probe("probe_target", pre=handler, timeout=timeout)
    with engine.hub.subscribe(probe.id, maxsize=hits + 10) as sub:
        began = time.perf_counter()
        await engine.resume()
        for _ in range(hits):
            record = await sub.receive()
            assert record["error"] is None, record["error"]
        took = time.perf_counter() - began
    await engine.hold()
    await engine.remove_probe(probe.id)
    return hits / took


async def main(hits: int, rounds: int) -> None:
    with QemuGuest("i386") as guest:
        async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
            results: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(rounds):
                for name, (handler, timeout) in VARIANTS.items():
                    results[name].append(await hits_per_second(engine, handler, timeout, hits))
    base = statistics.median(results["sync, no limit (inline)"])
    for name, values in results.items():
        rate = statistics.median(values)
        print(f"{name:30} {rate:8.0f} hits/s  ratio {rate / base:5.2f}  (median of {rounds} x {hits} hits)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hits", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trio.run(main, args.hits, args.rounds)
