"""Fetch-heavy probes: probed with guest RAM read directly, probed through the stub only, and a naive loop
doing the same reads over raw RSP one packet at a time, side by side on the same guest.

1. The bundled i386 guest, a probe on `probe_target` fetching its three stack args, the return address, the
   code it points at, and a global: hits per second (the guest calls it back to back, so the probe's cost
   sets the pace). Every record is checked against the guest's contract (b == 3a + 1, turns == a - 1).
2. The Debian Linux guest (tests/linux), a probe on `do_sys_openat2` fetching the file name (a user
   string), `how->flags`, the task's comm (`current->comm`, as `$comm` does) and its parent's comm (a field
   two pointers away: `current->real_parent->comm`). The guest opens files at its own pace (a shell loop
   with a sleep), so the yardstick is the time the guest stays stopped per hit, from the stop reply to the
   `c` that resumes it, measured the same way for all of them.

Each variant's first WARMUP hits are not counted, the raw loop's neither: they pay for attaching (the
first reads are all checked against `m`, translations are learnt, code is loaded), which a running daemon
has done long before; what is compared is what a hit costs.

Both guests' RAM is a memfd QEMU maps shared (`memory-backend-memfd,share=on`, as virtiofs needs), so
probed's guest RAM is measured both ways: mapped into probed (`--guest-memory auto`) and read with `pread`
on `/proc/PID/mem` (`--guest-memory proc-mem`, what anonymous RAM, QEMU's default, gets). `--anon-ram`
runs QEMU with its default RAM instead (then only the second way exists).

    python bench/fetch.py [--hits N] [--linux-hits N] [--rounds N] [--no-linux] [--anon-ram]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hits import RawLoop, symbol_address  # noqa: E402

from probed.api import attach  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402
from rsp.framing import encode_packet  # noqa: E402

I386_FIELDS = ["ret=+0(%sp):x32", "a=+4(%sp):s32", "b=+8(%sp):s32", "name=+12(%sp):x32",
               "code=+0(+0(%sp)):x64", "turns=@turns:u32"]
STRING = 256  # what a string fetch reads first (up to the page's end)
CONTINUE = encode_packet(b"c")
POLL: float | None = None
RAW_WRITES = 9.0  # g, 6 m, s, c
SHARED_RAM = True  # the guests' RAM is a shared memfd (see the module's docstring)
WARMUP = 20  # hits of each variant not counted: the first ones pay for set-up (what a running daemon has done)


class StopClock:
    """Time the guest spends stopped per hit: from the first stop reply after a `c` to the next `c`.

    Wraps one RSPClient's `wait_stop` and `_send` (bench instrumentation only).
    """

    def __init__(self, client):
        self.total = 0.0
        self.count = 0
        self.writes = 0  # writes carrying packets (each a wake-up of QEMU; most wait for a reply)
        self._since: float | None = None
        wait_stop, send = client.wait_stop, client._send

        async def timed_wait_stop(*a, **k):
            event = await wait_stop(*a, **k)
            if self._since is None:
                self._since = time.perf_counter()
            return event

        async def timed_send(frames: bytes):
            self.writes += b"$" in frames
            if frames.endswith(CONTINUE) and self._since is not None:
                self.total += time.perf_counter() - self._since
                self.count += 1
                self._since = None
            await send(frames)

        client.wait_stop, client._send = timed_wait_stop, timed_send

    def reset(self) -> None:
        """Count from the next stop on (the warm-up hits are over)."""
        self.total, self.count, self.writes, self._since = 0.0, 0, 0, None

    @property
    def per_hit_us(self) -> float:
        return 1e6 * self.total / max(self.count, 1)

    @property
    def writes_per_hit(self) -> float:
        return self.writes / max(self.count, 1)


class RawFetchLoop(RawLoop):
    """The yardstick: c, then `g` and each read as its own packet, then `s`; times the stopped part."""

    def read(self, address: int, length: int) -> bytes:
        reply = self.ask(b"m%x,%x" % (address, length))
        return bytes.fromhex(reply.decode()) if not reply.startswith(b"E") else b""

    def run_reads(self, address: int, hits: int, reads, *, attached: bool = False, qemu_pid: int = 0) -> tuple[float, float, list]:
        if not attached:
            self.ask(b"qSupported:swbreak+")
            self.ask(b"?")
        assert self.ask(b"Z0,%x,1" % address) == b"OK"
        stopped = 0.0
        got = []
        for i in range(WARMUP + hits):
            if i == WARMUP:  # (the warm-up hits are not counted, as for probed)
                stopped, got = 0.0, []
                self.cpu = -cpu_now(qemu_pid)
                t0 = time.perf_counter()
            self.sock.sendall(CONTINUE)
            self.packet()  # the stop at the breakpoint
            since = time.perf_counter()
            self.sock.sendall(b"+")
            g = self.ask(b"g")
            got.append(reads(self, bytes.fromhex(g.decode())))
            self.sock.sendall(encode_packet(b"s"))
            self.packet()
            self.sock.sendall(b"+")
            stopped += time.perf_counter() - since
        elapsed = time.perf_counter() - t0
        self.cpu = 1e6 * (self.cpu + cpu_now(qemu_pid)) / hits
        self.ask(b"z0,%x,1" % address)
        self.sock.sendall(encode_packet(b"D"))
        self.packet()
        self.sock.close()
        return elapsed, 1e6 * stopped / hits, got


def cpu_now(qemu_pid: int) -> float:
    """CPU seconds used so far by this process (the tracer: probed's engine, or the raw loop) and QEMU."""
    total = time.process_time()
    if qemu_pid:
        for tid in os.listdir(f"/proc/{qemu_pid}/task"):
            try:
                with open(f"/proc/{qemu_pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
            except (OSError, ValueError):
                continue
    return total


def _u(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _page_rest(address: int) -> int:
    return min(STRING, 4096 - address % 4096)


def i386_raw_reads(turns: int):
    def reads(loop: RawFetchLoop, g: bytes) -> dict:
        sp = _u(g[16:20])
        ret, a, b, name = (_u(loop.read(sp + 4 * i, 4)) for i in range(4))
        code = _u(loop.read(ret, 8))
        return {"ret": ret, "a": a, "b": b, "name": name, "code": code, "turns": _u(loop.read(turns, 4))}

    return reads


def check_i386(records: list[dict]) -> None:
    for r in records:
        a, b, t = r["a"], r["b"], r["turns"]
        assert b == 3 * a + 1 and t == a - 1, r


async def probed_i386(target: str, elf: Path, hits: int, mode: str, qemu_pid: int) -> tuple[float, float, float, float, str]:
    async with attach(target, symbols=[str(elf)], stopped=True, guest_memory=mode) as engine:
        clock = StopClock(engine.target.client)
        if POLL is not None:
            engine.poll_seconds = POLL
        probe = await engine.add_probe("probe_target", pre=I386_FIELDS)
        with engine.hub.subscribe(probe.id, maxsize=WARMUP + hits + 10) as sub:
            await engine.resume()
            for _ in range(WARMUP):
                await sub.receive()
            clock.reset()
            t0, cpu = time.perf_counter(), cpu_now(qemu_pid)
            records = [(await sub.receive())["pre"] for _ in range(hits)]
            elapsed, cpu = time.perf_counter() - t0, 1e6 * (cpu_now(qemu_pid) - cpu) / hits
        check_i386(records)
        await engine.remove_probe(probe.id)
        return elapsed, clock.per_hit_us, clock.writes_per_hit, cpu, engine.target.memory.describe()


async def linux_offsets(target: str, kallsyms: str) -> dict[str, int]:
    """task_struct's comm and real_parent offsets, found in init_task ("swapper/0", its own parent)."""
    async with attach(target, symbols=[kallsyms]) as engine:
        syms = engine.symbols
        init = syms.lookup("init_task").address

        async def read():
            (task, per_cpu) = await engine.target.read_many([(init, 12288), (syms.lookup("__per_cpu_offset").address, 8)])
            return task, per_cpu

        task, per_cpu = await engine.call_stopped(read)
    comm = task.find(b"swapper/0\0")
    parent = next(o for o in range(0, comm, 8) if _u(task[o : o + 8]) == init)
    return {"comm": comm, "parent": parent, "current": _u(per_cpu) + syms.lookup("current_task").address}


def linux_fields(off: dict[str, int]) -> list[str]:
    cur = f"@{off['current']:#x}"  # (`@ADDR` is already the word at ADDR: `current`)
    return ["filename=+0(%si):ustring", "flags=+0(%dx):x64", f"comm=+{off['comm']}({cur}):string",
            f"parent=+{off['comm']}(+{off['parent']}({cur})):string"]


def linux_raw_reads(off: dict[str, int]):
    def string(loop: RawFetchLoop, address: int) -> str:
        return loop.read(address, _page_rest(address)).split(b"\0")[0].decode(errors="replace")

    def reads(loop: RawFetchLoop, g: bytes) -> dict:
        rsi, rdx = _u(g[32:40]), _u(g[24:32])
        filename = string(loop, rsi)
        flags = _u(loop.read(rdx, 8))
        cur = _u(loop.read(off["current"], 8))
        comm = string(loop, cur + off["comm"])
        parent = _u(loop.read(cur + off["parent"], 8))
        return {"filename": filename, "flags": flags, "comm": comm, "parent": string(loop, parent + off["comm"])}

    return reads


async def probed_linux(target: str, kallsyms: str, hits: int, mode: str, fields: list[str]) -> tuple[float, float, str, list]:
    # (as `probed --linux` runs: the kernel model knows the boot's direct map and image, see
    # GuestMemory.keep_translations)
    async with attach(target, symbols=[kallsyms], guest_memory=mode, linux=True) as engine:
        clock = StopClock(engine.target.client)
        if POLL is not None:
            engine.poll_seconds = POLL
        probe = await engine.add_probe("do_sys_openat2", pre=fields)
        with engine.hub.subscribe(probe.id, maxsize=WARMUP + hits + 10) as sub:
            for _ in range(WARMUP):
                await sub.receive()
            clock.reset()
            records = [(await sub.receive())["pre"] for _ in range(hits)]
        await engine.remove_probe(probe.id)
        return clock.per_hit_us, clock.writes_per_hit, engine.target.memory.describe(), records


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hits", type=int, default=1000, help="hits per variant and round (i386)")
    ap.add_argument("--linux-hits", type=int, default=100, help="hits per variant and round (Linux)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all variants, one after the other")
    ap.add_argument("--no-linux", action="store_true")
    ap.add_argument("--no-i386", action="store_true")
    ap.add_argument("--anon-ram", action="store_true", help="QEMU's default (anonymous) RAM, not a shared memfd")
    ap.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                    help="the engine's busy-poll after a hit (default: the engine's own, 1 ms with 2+ cores)")
    args = ap.parse_args()
    global POLL
    POLL = args.poll
    hits, rounds = args.hits, args.rounds
    global SHARED_RAM
    SHARED_RAM = not args.anon_ram
    modes = ((("auto", "probed, guest RAM mapped"),) if SHARED_RAM else ()) + (
        ("proc-mem", "probed, guest RAM by pread"), ("gdbstub", "probed, stub only"))
    rate: dict[str, list[float]] = {"raw": [], **{m: [] for m, _ in modes}}
    stopped: dict[str, list[float]] = {"raw": [], **{m: [] for m, _ in modes}}
    writes: dict[str, float] = {"raw": RAW_WRITES}
    cpu: dict[str, list[float]] = {"raw": [], **{m: [] for m, _ in modes}}
    if not args.no_i386:
        _i386(hits, rounds, modes, rate, stopped, writes, cpu)
    if args.no_linux:
        return
    _linux(args.linux_hits, rounds, modes, writes)


def _i386(hits, rounds, modes, rate, stopped, writes, cpu) -> None:
    with QemuGuest("i386", stopped=True, shared_ram=SHARED_RAM) as guest:
        addr, turns = symbol_address(guest.elf, "probe_target"), symbol_address(guest.elf, "turns")
        print(f"i386 guest, probe_target with {' '.join(I386_FIELDS)}; {rounds} rounds of {hits} hits, medians")
        for _ in range(rounds):
            raw = RawFetchLoop(guest.target)
            secs, us, got = raw.run_reads(addr, hits, i386_raw_reads(turns), qemu_pid=guest.pid)
            check_i386(got)
            cpu["raw"].append(raw.cpu)
            rate["raw"].append(hits / secs)
            stopped["raw"].append(us)
            for mode, _label in modes:
                secs, us, writes[mode], used, how = trio.run(probed_i386, guest.target, guest.elf, hits, mode, guest.pid)
                cpu[mode].append(used)
                rate[mode].append(hits / secs)
                stopped[mode].append(us)
        for mode, label in (("raw", "raw loop (g, 6 m, s; one at a time)"), *modes):
            print(f"  {label:<38} {_median(rate[mode]):7.0f} hits/s  {_median(stopped[mode]):6.0f} us stopped/hit  "
                  f"{writes[mode]:4.1f} writes/hit  {_median(cpu[mode]):6.0f} us CPU/hit")
    for mode, label in modes:
        r = _median([p / q for p, q in zip(rate[mode], rate["raw"], strict=True)])
        s_ = _median([q / p for p, q in zip(stopped[mode], stopped["raw"], strict=True)])
        c_ = _median([q / p for p, q in zip(cpu[mode], cpu["raw"], strict=True)])
        print(f"  ratio {label} / raw loop: {r:.2f} in hits/s, {s_:.2f} in stopped time, {c_:.2f} in CPU  (target >= 1.5)")


def _linux(n, rounds, modes, writes) -> None:
    from tests.linux.guest import LinuxGuest, fetch_linux

    per: dict[str, list[float]] = {"raw": [], **{m: [] for m, _ in modes}}
    with tempfile.TemporaryDirectory() as work, LinuxGuest(fetch_linux(), Path(work), shared_ram=SHARED_RAM) as linux:
        off = trio.run(linux_offsets, linux.target, str(linux.kallsyms))
        fields = linux_fields(off)
        addr = trio.run(_address_of, linux.target, str(linux.kallsyms), "do_sys_openat2")
        print(f"\nLinux guest, do_sys_openat2 with {' '.join(fields)}; {rounds} rounds of {n} hits, medians")
        examples = {}
        for _ in range(rounds):
            _, raw_us, got = RawFetchLoop(linux.target).run_reads(addr, n, linux_raw_reads(off))
            per["raw"].append(raw_us)
            examples["raw"] = got[-1]
            for mode, _label in modes:
                us, writes[mode], how, records = trio.run(probed_linux, linux.target, str(linux.kallsyms), n, mode, fields)
                bad = [r for r in records if any(str(v).startswith("<fault") for v in r.values())]
                assert not bad, bad[:3]
                per[mode].append(us)
                examples[mode] = records[-1]
        for mode, label in (("raw", "raw loop (g, 6 m, s; one at a time)"), *modes):
            print(f"  {label:<38} {_median(per[mode]):6.0f} us stopped/hit  {writes[mode]:4.1f} writes/hit  "
                  f"e.g. {examples[mode]}")
        for mode, label in modes:
            r = _median([q / p for p, q in zip(per[mode], per["raw"], strict=True)])
            print(f"  ratio {label} / raw loop: {r:.2f} in stopped time  (target >= 1.5)")
        print(f"\nLinux guest, bulk read of the kernel's BTF ({BULK >> 20} MiB from __start_BTF), one Target.read_many")
        speeds = {mode: trio.run(bulk_read, linux.target, str(linux.kallsyms), mode) for mode, _ in modes}
        for mode, label in modes:
            print(f"  {label:<38} {speeds[mode]:8.1f} MiB/s")
        for mode, label in modes[:-1]:
            print(f"  ratio {label} / stub only: {speeds[mode] / speeds['gdbstub']:.0f}")


BULK = 4 << 20


async def bulk_read(target: str, kallsyms: str, mode: str) -> float:
    """MiB/s reading BULK bytes of the BTF blob at one stop (both ways must give the same bytes)."""
    async with attach(target, symbols=[kallsyms], guest_memory=mode) as engine:
        start = engine.symbols.lookup("__start_BTF").address

        async def read():
            t0 = time.perf_counter()
            (data,) = await engine.target.read_many([(start, BULK)])
            return time.perf_counter() - t0, data

        secs, data = await engine.call_stopped(read)
        assert isinstance(data, bytes) and data[:2] == b"\x9f\xeb", data[:8]  # BTF magic 0xeb9f
        return BULK / secs / (1 << 20)


async def _address_of(target: str, kallsyms: str, name: str) -> int:
    async with attach(target, symbols=[kallsyms]) as engine:
        return engine.symbols.lookup(name).address


if __name__ == "__main__":
    main()
