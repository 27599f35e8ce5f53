"""What following reboots costs (probed.guest.linux.reboot), side by side on one KASLR Debian guest (tests/linux).

1. `hits`: hits/s of a probe on `vfs_read` (`%di`) with the reset-vector breakpoint set (the watch on) and
   without it, in turn, over several rounds (order alternating); the guest runs `cat /dev/zero > /dev/null`,
   so the rate measures probed's cost per hit. Printed: each round's rates and the median ratio watch/none.
2. `boot`: the guest's reboot time (`reboot -f` to its workload running) with probed attached and following
   the reboot (stopping the guest every 0.2 s until the new kernel is up, then placing a probe on
   `kernel_restart`, which the boot does not call) and with no debugger attached, in turn; and how long
   after the reboot began probed had placed the probe.

    PROBED_CACHE=... python bench/reboot.py [--seconds S] [--rounds N] [--boots N]
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
from probed.guest.linux.kernel import LinuxKernel  # noqa: E402
from tests.linux.guest import LinuxGuest, fetch_linux  # noqa: E402


async def rate(engine, probe, seconds: float) -> float:
    await trio.sleep(0.5)
    h0, t0 = probe.hits, time.monotonic()
    await trio.sleep(seconds)
    return (probe.hits - h0) / (time.monotonic() - t0)


async def set_watch(engine, watcher, on: bool) -> None:
    async def apply() -> None:
        engine.reboot = watcher if on else None
        await engine.reconcile_now()

    await engine.call_stopped(apply)


async def hits(guest: LinuxGuest, symbols: str, seconds: float, rounds: int) -> None:
    rates: dict[str, list[float]] = {"watch": [], "none": []}
    async with attach(guest.target, symbols=[symbols], linux=LinuxKernel(modules=False)) as engine:
        watcher = engine.reboot
        probe = await engine.add_probe("vfs_read", pre=["%di"])
        for r in range(rounds):
            for variant in ("watch", "none") if r % 2 == 0 else ("none", "watch"):
                await set_watch(engine, watcher, variant == "watch")
                rates[variant].append(await rate(engine, probe, seconds))
            print(f"round {r + 1}: watch={rates['watch'][-1]:7.1f}/s  none={rates['none'][-1]:7.1f}/s", flush=True)
        await set_watch(engine, watcher, True)
    ratio = statistics.median(a / b for a, b in zip(rates["watch"], rates["none"], strict=True))
    print(f"vfs_read %di, {seconds:.0f} s per variant, {rounds} rounds: median watch "
          f"{statistics.median(rates['watch']):.1f}/s, none {statistics.median(rates['none']):.1f}/s, "
          f"median ratio watch/none {ratio:.3f}")


async def _time_placement(engine, probe, started: float, placed: list[float]) -> None:
    """Note how long after `started` the probe was placed in the rebooted kernel."""
    while not engine.reboot.reboots or probe.pending:
        await trio.sleep(0.02)  # (a bench's sampling, not a test's synchronisation)
    placed.append(time.monotonic() - started)


async def boots(guest: LinuxGuest, symbols: str, n: int) -> None:
    with_probed, without, placed = [], [], []
    for i in range(n):
        for variant in ("probed", "none") if i % 2 == 0 else ("none", "probed"):
            if variant == "none":
                await trio.to_thread.run_sync(guest.reboot)
                without.append(guest.boot_seconds)
                continue
            async with attach(guest.target, symbols=[symbols], linux=LinuxKernel()) as engine:
                # A function the boot does not call (the old kernel calls it once on its way down): what is
                # measured is following the reboot, not hits.
                probe = await engine.add_probe("kernel_restart", pre=["%di"])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_time_placement, engine, probe, time.monotonic(), placed)
                    await trio.to_thread.run_sync(guest.reboot)
                with_probed.append(guest.boot_seconds)
        print(f"boot {i + 1}: with probed {with_probed[-1]:.1f} s (probe placed {placed[-1]:.1f} s after "
              f"the reboot began), without {without[-1]:.1f} s", flush=True)
    print(f"{n} reboots each: median boot with probed {statistics.median(with_probed):.1f} s, without "
          f"{statistics.median(without):.1f} s (ratio {statistics.median(with_probed) / statistics.median(without):.2f}); "
          f"probe placed a median {statistics.median(placed):.1f} s after the reboot began")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--only", choices=("hits", "boot"))
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            LinuxGuest(fetch_linux(), Path(tmp), kaslr=True, reboot=True) as guest:
        symbols = Path(tmp) / "kallsyms-first-boot"
        symbols.write_text(guest.kallsyms.read_text())
        if opts.only != "boot":
            guest.shell("cat /dev/zero > /dev/null &")
            trio.run(hits, guest, str(symbols), opts.seconds, opts.rounds)
        if opts.only != "hits":
            trio.run(boots, guest, str(symbols), opts.boots)


if __name__ == "__main__":
    main()
