"""User-probe hits per second on the Debian guest, against a raw RSP loop making the same stops.

The guest runs `utarget N` (tests/linux/uprogs/utarget.c: N calls utarget(i, i * i)). Side by side, on one
booted guest:
- raw loop: a breakpoint at utarget's address in the static program; per stop `g`, `s`, `c`, as little as
  any debugger can do (it knows nothing of processes: it would stop in any program at that address);
- probed: a user probe on /bin/utarget:utarget (the file), with no fetch args, then with
  `$comm $pid a=$arg1 b=$arg2`. Each decides per stop whether the process maps the file there.
Return probes, the same way (a call is two stops: the entry and the return):
- raw loop: breakpoints at utarget's entry and at its return address (read from the stack at the first
  entry, then left armed); per entry `g`, `m` of the return address, `s`, `c`; per return `g`, `s`, `c`;
- probed: a return probe on /bin/utarget:utarget with `a=$arg1 ret=$retval` (the instance keyed by
  address space, task and sp, matched at the return). The rate is of calls (returns) per second.
Each variant checks every stop saw the right argument (utarget's first argument i = 1..N, in order; at
the returns, utarget's return value i + i * i too).
The rate is over the hits' own timestamps (first to last), so process start-up is left out; a second rate
takes the median gap between hits, which the other loads of a shared machine disturb less.

    python bench/uprobes.py [--calls N] [--cmdline "pti=on"] [--guest-memory gdbstub]

`--cmdline pti=on` boots the guest with page-table isolation: `$comm $pid` at a user hit are then read
through the kernel PGD (probed.guest.memory.kpti).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from probed.api import attach  # noqa: E402
from probed.guest.userfile import UserElf  # noqa: E402
from probed.testing.qemu import CACHE  # noqa: E402
from rsp.framing import NEED_DATA, Framer, Packet, encode_packet  # noqa: E402
from tests.linux.guest import LinuxGuest, fetch_linux  # noqa: E402
from tests.linux.uprogs import uprog_path  # noqa: E402

STATIC_BASE = 0x400000  # the static program's first segment: file offset 0 at this address
RAX, RDI, RSP, RIP = 0, 5, 7, 16  # x86_64 `g` order: rax rbx rcx rdx rsi rdi rbp rsp r8..r15 rip


class RawLoop:
    """Blocking socket, one packet at a time, acks as GDB sends them."""

    def __init__(self, target: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(target.split(":", 1)[1])
        self.framer = Framer()

    def packet(self) -> bytes:
        while True:
            ev = self.framer.next_event()
            if isinstance(ev, Packet):
                self.sock.sendall(b"+")
                return ev.payload
            if ev is NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError
                self.framer.receive_data(data)

    def ask(self, payload: bytes, stop: bool = False) -> bytes:
        """Send a request and return its reply (a stop reply only for `stop`: others skip stale stops)."""
        self.sock.sendall(encode_packet(payload))
        reply = self.packet()
        while not stop and reply.startswith(b"T"):
            reply = self.packet()  # the stop QEMU sends unasked when we connect to a running guest
        return reply

    def _start(self, guest: LinuxGuest, address: int, calls: int) -> threading.Thread:
        """Attach, set the breakpoint at `address`, let the guest run `utarget calls`; the shell's thread."""
        self.ask(b"qSupported:swbreak+")
        self.ask(b"?", stop=True)
        assert self.ask(b"Z0,%x,1" % address) == b"OK"
        self.sock.sendall(encode_packet(b"c"))
        shell = threading.Thread(target=guest.shell, args=(f"utarget {calls}", 600))
        shell.start()
        return shell

    def _finish(self, shell: threading.Thread, *addresses: int) -> None:
        """Stop the guest, remove the breakpoints, detach, wait for the shell."""
        self.sock.sendall(b"\x03")
        self.packet()
        for address in addresses:
            self.ask(b"z0,%x,1" % address)
        self.sock.sendall(encode_packet(b"D"))
        self.packet()
        self.sock.close()
        shell.join()

    def run(self, guest: LinuxGuest, address: int, calls: int) -> float:
        shell = self._start(guest, address, calls)
        stamps = []
        last = 0
        while len(stamps) < calls:
            self.packet()  # the stop at the breakpoint
            now = time.perf_counter()
            rdi = _reg(self.ask(b"g"), RDI)
            if rdi != last:  # else: the step before ran nothing (see QEMU-GDBSTUB.md) and this is that call again
                assert rdi == last + 1, (last, rdi)
                stamps.append(now)
                last = rdi
            self.ask(b"s", stop=True)
            self.sock.sendall(encode_packet(b"c"))
        self._finish(shell, address)
        return _rates(stamps)


    def run_returns(self, guest: LinuxGuest, entry: int, calls: int) -> tuple[float, float]:
        """utarget's returns: entry and return breakpoints, per entry g, m, s, c; per return g, s, c."""
        shell = self._start(guest, entry, calls)
        stamps: list[float] = []
        last, returning, ret_address = 0, False, None
        while len(stamps) < calls:
            self.packet()  # a stop at the entry or at the return address
            now = time.perf_counter()
            g = self.ask(b"g")
            pc = _reg(g, RIP)
            if pc == entry and _reg(g, RDI) != last:  # (the same rdi again: a step that ran nothing)
                assert not returning and _reg(g, RDI) == last + 1, (last, _reg(g, RDI))
                last, returning = last + 1, True
                address = int.from_bytes(bytes.fromhex(self.ask(b"m%x,8" % _reg(g, RSP)).decode()), "little")
                if ret_address is None:
                    ret_address = address
                    assert self.ask(b"Z0,%x,1" % address) == b"OK"
                assert address == ret_address
            elif pc == ret_address and returning:
                assert _reg(g, RAX) == last + last * last, (last, _reg(g, RAX))
                stamps.append(now)
                returning = False
            self.ask(b"s", stop=True)
            self.sock.sendall(encode_packet(b"c"))
        self._finish(shell, entry, ret_address)
        return _rates(stamps)


def _reg(g: bytes, index: int) -> int:
    return int.from_bytes(bytes.fromhex(g[index * 16:(index + 1) * 16].decode()), "little")


async def probed_returns(guest: LinuxGuest, calls: int, memory: str = "auto") -> tuple[float, float]:
    async with attach(guest.target, symbols=[str(guest.kallsyms)], guest_memory=memory) as engine:
        probe = await engine.add_probe("/bin/utarget:utarget", file_copy=str(uprog_path(CACHE / "linux", "utarget")),
                                       retprobe=True, pre=["a=$arg1:s64", "ret=$retval:s64"])
        with engine.hub.subscribe(probe.id, maxsize=calls + 10) as sub:
            await trio.to_thread.run_sync(guest.shell, f"utarget {calls}", 600)
            records = [sub.receive_nowait() for _ in range(calls)]
    assert [(r["pre"]["a"], r["pre"]["ret"]) for r in records] == [(i, i + i * i) for i in range(1, calls + 1)]
    return _rates([r["time_ns"] / 1e9 for r in records])


async def probed_run(guest: LinuxGuest, calls: int, args: list[str], memory: str = "auto") -> float:
    async with attach(guest.target, symbols=[str(guest.kallsyms)], guest_memory=memory) as engine:
        probe = await engine.add_probe("/bin/utarget:utarget", file_copy=str(uprog_path(CACHE / "linux", "utarget")),
                                       pre=["a=$arg1:s64", *args])
        with engine.hub.subscribe(probe.id, maxsize=calls + 10) as sub:
            await trio.to_thread.run_sync(guest.shell, f"utarget {calls}", 600)
            records = [sub.receive_nowait() for _ in range(calls)]
    assert [r["pre"]["a"] for r in records] == list(range(1, calls + 1))
    return _rates([r["time_ns"] / 1e9 for r in records])


def _rates(stamps: list[float]) -> tuple[float, float]:
    """(hits/s over the whole run, hits/s at the median gap): this machine's other loads stall some gaps."""
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), 1 / gaps[len(gaps) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--cmdline", default="", help="more kernel arguments, e.g. pti=on")
    ap.add_argument("--guest-memory", default="auto", choices=["auto", "proc-mem", "gdbstub"])
    options = ap.parse_args()
    calls, memory = options.calls, options.guest_memory
    address = STATIC_BASE + UserElf(uprog_path(CACHE / "linux", "utarget")).resolve("utarget")
    guest = LinuxGuest(fetch_linux(), Path(tempfile.mkdtemp(prefix="bench-uprobes-")), cmdline=options.cmdline).start()
    print(f"guest: {options.cmdline or 'default kernel arguments'}; probed --guest-memory {memory}")
    results: dict[str, tuple[float, float]] = {}
    try:
        def measure(name: str, fn) -> None:
            results[name] = (rate, median) = fn()
            print(f"{name:<46} {rate:7.0f} hits/s  median gap: {median:7.0f} hits/s  ({calls} calls)", flush=True)

        measure("raw loop c,g,s (one address)", lambda: RawLoop(guest.target).run(guest, address, calls))
        measure("probed user probe, $arg1", lambda: trio.run(probed_run, guest, calls, [], memory))
        measure("probed user probe, $arg1 $comm $pid $arg2",
                lambda: trio.run(probed_run, guest, calls, ["$comm", "$pid", "b=$arg2:s64"], memory))
        measure("raw loop, returns (entry g,m,s; return g,s)", lambda: RawLoop(guest.target).run_returns(guest, address, calls))
        measure("probed user return probe, $arg1 $retval", lambda: trio.run(probed_returns, guest, calls, memory))
    finally:
        guest.close()
    print()
    for name, (rate, median) in results.items():
        if name.startswith("probed"):
            raw = results["raw loop, returns (entry g,m,s; return g,s)" if "return" in name else "raw loop c,g,s (one address)"]
            print(f"{name:<46} / raw  {rate / raw[0]:.2f}   median gap / raw  {median / raw[1]:.2f}")


if __name__ == "__main__":
    main()
