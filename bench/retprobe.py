"""Return-probe hits per second: probed against a minimal hand-written RSP loop, side by side.

Both make two stops per call of `probe_target` (returns a + b) on one CPU:
    entry:  stop at the function, read the registers (`g`) and the return address (`m` at sp), get past
            the breakpoint;
    return: stop at the return address, read the registers (`$retval`), get past the breakpoint.
The raw loop gets past each breakpoint with a single-step (`s`) and keeps the return breakpoint installed
after the first call; probed does what it does (a `return` probe with `r=$retval`). Each variant checks
that the guest advanced one call per return (the guest's own `calls` counter).

Rounds alternate the two on the same guest; the host is shared, so the median of the rounds is quoted.

    python bench/retprobe.py [--calls N] [--rounds R] [--arch i386|x86_64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hits import RawLoop, symbol_address  # noqa: E402
from probed.api import attach  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402
from rsp.framing import encode_packet  # noqa: E402


class RawReturnLoop(RawLoop):
    """Entry and return breakpoints by hand: c, g, m sp, s at the entry; c, g, s at the return."""

    def __init__(self, target: str, arch: str):
        super().__init__(target)
        self.word = 4 if arch == "i386" else 8
        self.sp_offset = 4 * 4 if arch == "i386" else 7 * 8  # esp / rsp in the `g` reply, in bytes

    def stop_and_ack(self) -> None:
        self.packet()
        self.sock.sendall(b"+")

    def resume(self, what: bytes) -> None:
        self.sock.sendall(encode_packet(what))
        self.stop_and_ack()

    def run(self, address: int, calls: int, n: int) -> tuple[float, int]:
        self.ask(b"qSupported:swbreak+")
        self.ask(b"?")
        assert self.ask(b"Z0,%x,1" % address) == b"OK"
        ret_armed: int | None = None
        t0 = time.perf_counter()
        first = None
        for _ in range(n):
            self.resume(b"c")  # the entry
            if first is None:
                first = self.calls(calls)
            g = bytes.fromhex(self.ask(b"g").decode())
            sp = int.from_bytes(g[self.sp_offset : self.sp_offset + self.word], "little")
            ret = int.from_bytes(bytes.fromhex(self.ask(b"m%x,%x" % (sp, self.word)).decode()), "little")
            if ret_armed != ret:
                assert self.ask(b"Z0,%x,1" % ret) == b"OK"
                ret_armed = ret
            self.resume(b"s")
            self.resume(b"c")  # the return
            self.ask(b"g")
            self.resume(b"s")
        elapsed = time.perf_counter() - t0
        advanced = self.calls(calls) - first  # every call counted returned
        self.ask(b"z0,%x,1" % address)
        self.ask(b"z0,%x,1" % ret_armed)
        self.sock.sendall(encode_packet(b"D"))
        self.packet()
        self.sock.close()
        return elapsed, advanced


async def probed_run(target: str, elf: Path, n: int, arch: str) -> tuple[float, int]:
    t = "s32" if arch == "i386" else "s64"
    async with attach(target, symbols=[str(elf)], stopped=True) as engine:
        calls = engine.symbols.lookup("calls").address
        client = engine.target.client
        # Through the engine task: it owns the connection (and watches it while the guest is held).
        before = int.from_bytes(await engine.call_stopped(lambda: client.read_memory(calls, 4)), "little")
        probe = await engine.add_probe("probe_target", retprobe=True, pre=[f"r=$retval:{t}"])
        with engine.hub.subscribe(probe.id, maxsize=n + 10) as sub:
            t0 = time.perf_counter()
            await engine.resume()
            for _ in range(n):
                record = await sub.receive()
            elapsed = time.perf_counter() - t0
        await engine.hold()
        after = await engine.call_stopped(lambda: client.read_memory(calls, 4))
        advanced = int.from_bytes(after, "little") - before
        assert record["kind"] == "return" and isinstance(record["pre"]["r"], int)
        # Held between an entry and its return, or not: one call either way.
        assert abs(advanced - probe.hits) <= 1, (advanced, probe.hits)
        await engine.remove_probe(probe.id)
        return elapsed * n / probe.hits, min(advanced, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", default="i386", choices=["i386", "x86_64"])
    args = ap.parse_args()
    n = args.calls
    results: dict[str, list[float]] = {"raw": [], "probed": []}
    with QemuGuest(args.arch, stopped=True) as guest:
        elf, target = guest.elf, guest.target
        addr = symbol_address(elf, "probe_target")
        calls = symbol_address(elf, "calls")

        def measure(name: str, fn) -> None:
            secs, advanced = fn()
            assert advanced in (n, n - 1), f"{name}: the guest advanced {advanced} calls for {n} returns"
            results[name].append(n / secs)
            print(f"  {name:<7} {n / secs:8.0f} returns/s  ({n} calls, {2 * n} stops, in {secs:.2f} s)", flush=True)

        for r in range(1, args.rounds + 1):
            print(f"round {r}")
            measure("raw", lambda: RawReturnLoop(target, args.arch).run(addr, calls, n))
            measure("probed", lambda: trio.run(probed_run, target, elf, n, args.arch))
    raw, probed = statistics.median(results["raw"]), statistics.median(results["probed"])
    ratios = [p / q for p, q in zip(results["probed"], results["raw"], strict=True)]
    print()
    print(f"median raw loop (c,g,m,s + c,g,s per call)  {raw:8.0f} returns/s")
    print(f"median probed return probe ($retval)         {probed:8.0f} returns/s")
    print(f"probed / raw: median {probed / raw:.2f}, per round {' '.join(f'{x:.2f}' for x in ratios)}  (target >= 0.9)")


if __name__ == "__main__":
    main()
