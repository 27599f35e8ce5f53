"""Hits per second: probed against a minimal hand-written RSP loop and against GDB, side by side.

All variants run one after the other against the same QEMU guest, each for the same number of hits on
`probe_target`, and each checks the guest really advanced one call per hit (the guest's own `calls`
counter). Printed: hits/s per variant and the ratios the issue names.

    python bench/hits.py [--hits N] [--arch i386|x86_64]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elftools.elf.elffile import ELFFile  # noqa: E402

from probed.api import attach  # noqa: E402
from probed.testing.qemu import QemuGuest  # noqa: E402
from rsp.framing import NEED_DATA, Framer, Packet, encode_packet  # noqa: E402


def symbol_address(elf: Path, name: str) -> int:
    with open(elf, "rb") as f:
        for sym in ELFFile(f).get_section_by_name(".symtab").iter_symbols():
            if sym.name == name:
                return sym["st_value"]
    raise KeyError(name)


class RawLoop:
    """The yardstick: blocking socket, one packet at a time, acks sent as GDB does."""

    def __init__(self, target: str):
        kind, _, where = target.partition(":")
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(where)
        else:
            host, _, port = where.rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.framer = Framer()

    def packet(self) -> bytes:
        while True:
            ev = self.framer.next_event()
            if isinstance(ev, Packet):
                return ev.payload
            if ev is NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError
                self.framer.receive_data(data)

    def ask(self, payload: bytes, ack: bool = True) -> bytes:
        self.sock.sendall(encode_packet(payload))
        reply = self.packet()
        while reply.startswith(b"T") and payload != b"?":
            reply = self.packet()  # the stop QEMU sends unasked when we connect to a running guest
        if ack:
            self.sock.sendall(b"+")
        return reply

    def calls(self, address: int) -> int:
        return int.from_bytes(bytes.fromhex(self.ask(b"m%x,4" % address).decode()), "little")

    def run(self, address: int, calls: int, hits: int, post: bool) -> tuple[float, int]:
        self.ask(b"qSupported:swbreak+")
        self.ask(b"?")
        assert self.ask(b"Z0,%x,1" % address) == b"OK"
        t0 = time.perf_counter()
        first = None
        for _ in range(hits):
            self.sock.sendall(encode_packet(b"c"))
            self.packet()  # stop at the breakpoint
            self.sock.sendall(b"+")
            if first is None:
                first = self.calls(calls)
            self.ask(b"g")
            self.sock.sendall(encode_packet(b"s"))
            self.packet()
            self.sock.sendall(b"+")
            if post:
                self.ask(b"g")
        elapsed = time.perf_counter() - t0
        # The last hit's call has run its increment by now (we stepped into its body).
        advanced = self.calls(calls) - first
        self.ask(b"z0,%x,1" % address)
        self.sock.sendall(encode_packet(b"D"))
        self.packet()
        self.sock.close()
        return elapsed, advanced


async def probed_run(target: str, elf: Path, hits: int, post: bool, arch: str) -> tuple[float, int]:
    reg = "eax" if arch == "i386" else "rax"
    async with attach(target, symbols=[str(elf)], stopped=True) as engine:
        calls = engine.symbols.lookup("calls").address
        client = engine.target.client
        # Through the engine task: it owns the connection (and watches it while the guest is held).
        before = int.from_bytes(await engine.call_stopped(lambda: client.read_memory(calls, 4)), "little")
        probe = await engine.add_probe("probe_target", pre=[f"v=%{reg}"], post=[f"v=%{reg}"] if post else None)
        with engine.hub.subscribe(probe.id, maxsize=hits + 10) as sub:
            t0 = time.perf_counter()
            await engine.resume()
            for _ in range(hits):
                await sub.receive()
            elapsed = time.perf_counter() - t0
        await engine.hold()
        after = await engine.call_stopped(lambda: client.read_memory(calls, 4))
        advanced = int.from_bytes(after, "little") - before
        # Held (at the start or the end) between a hit and its call's increment: one call either way.
        assert abs(advanced - probe.hits) <= 1, (advanced, probe.hits)
        await engine.remove_probe(probe.id)
        return elapsed * hits / probe.hits, min(advanced, hits)


def gdb_run(target: str, elf: Path, hits: int, arch: str) -> tuple[float, int]:
    reg = "$eax" if arch == "i386" else "$rax"
    where = target.split(":", 1)[1]
    script = textwrap.dedent(f"""
        import gdb, time
        class B(gdb.Breakpoint):
            n = 0
            first = None
            def stop(self):
                gdb.parse_and_eval("{reg}")
                B.n += 1
                if B.n == 1:
                    B.first = int(gdb.parse_and_eval("calls"))
                return B.n >= {hits}
        B("probe_target")
        t0 = time.perf_counter()
        gdb.execute("continue")
        print("ELAPSED", time.perf_counter() - t0, B.n, int(gdb.parse_and_eval("calls")) - B.first)
        gdb.execute("delete")
        gdb.execute("detach")
    """)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            ["gdb", "-batch", "-nx", str(elf), "-ex", f"target remote {where}", "-x", f.name],
            capture_output=True, text=True, timeout=600,
        ).stdout
    finally:
        os.unlink(f.name)
    for line in out.splitlines():
        if line.startswith("ELAPSED"):
            _, secs, n, advanced = line.split()
            assert int(n) == hits, out
            return float(secs), int(advanced) + 1
    raise RuntimeError("gdb run failed:\n" + out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hits", type=int, default=3000)
    ap.add_argument("--arch", default="i386", choices=["i386", "x86_64"])
    args = ap.parse_args()
    hits = args.hits
    with QemuGuest(args.arch, stopped=True) as guest:
        elf, target = guest.elf, guest.target
        addr = symbol_address(elf, "probe_target")
        calls = symbol_address(elf, "calls")
        results: dict[str, float] = {}

        def measure(name: str, fn) -> None:
            secs, advanced = fn()
            # The guest's own counter: one call per hit, no more, no fewer. A raw loop cannot tell when
            # QEMU's step ran nothing (probed steps again then; see SPURIOUS_RETRIES): the same call then
            # stops it twice, seen here up to 3 times in 3000 hits. Said, and allowed up to 1%.
            short = hits - 1 - advanced
            if name.startswith("raw") and 0 < short <= hits // 100:
                note = f"; QEMU's step ran nothing {short} time(s): one call stopped twice"
            else:
                assert advanced in (hits, hits - 1), f"{name}: guest advanced {advanced} calls for {hits} hits"
                note = ""
            results[name] = hits / secs
            print(f"{name:<34} {hits / secs:9.0f} hits/s  ({hits} hits in {secs:.2f} s{note})", flush=True)

        measure("raw loop c,g,s", lambda: RawLoop(target).run(addr, calls, hits, post=False))
        measure("probed pre (1 register)", lambda: trio.run(probed_run, target, elf, hits, False, args.arch))
        measure("raw loop c,g,s,g", lambda: RawLoop(target).run(addr, calls, hits, post=True))
        measure("probed pre+post (1 register)", lambda: trio.run(probed_run, target, elf, hits, True, args.arch))
        measure("gdb python Breakpoint.stop", lambda: gdb_run(target, elf, hits, args.arch))

    print()
    print(f"probed pre / raw c,g,s         {results['probed pre (1 register)'] / results['raw loop c,g,s']:.2f}  (target >= 0.8)")
    print(f"probed pre+post / raw c,g,s,g  {results['probed pre+post (1 register)'] / results['raw loop c,g,s,g']:.2f}  (target >= 0.8)")
    print(f"probed pre / gdb               {results['probed pre (1 register)'] / results['gdb python Breakpoint.stop']:.2f}  (target >= 1.5)")


if __name__ == "__main__":
    main()
