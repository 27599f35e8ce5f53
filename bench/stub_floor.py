"""The floor under any stub in GDB's path: the least a stub between GDB and QEMU must do, nothing else.

`bench/gdb_proxy.py --floors` runs GDB through this beside probed's stub, to tell what probed's code costs
from what being a process in between costs on this host. It keeps the hops of probed's stub and its local
answers, and drops everything else (no engine, no probes, no trio, no checks, one GDB, i386 or x86_64):
- GDB's `Z0`/`z0` are kept here and go to QEMU in the write of the next continue (GDB removes and inserts
  its breakpoints at every stop: the same set goes nowhere);
- a stop after a continue reads `g` (what any stub must do to know whose stop it is) and GDB's reads at its
  last stop, in one write, and carries every register; after a step, sp, fp and pc; GDB's `g` and those
  reads are answered from what was read;
- threads (`qXfer:threads:read`, `qfThreadInfo`) are answered from the list read at start;
- steps go to QEMU (probed simulates most), everything else is forwarded.

Two builds of the same loop: this file's, in Python with blocking sockets; and `stub_floor.c`'s (`--native
BINARY`), to which this file hands its two sockets once it has read QEMU's target description.

    python bench/stub_floor.py --target unix:QEMU_SOCKET --listen unix:PATH [--native BINARY]

It prints "ready" on stderr when GDB may connect.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rsp.framing import NEED_DATA, Framer, Interrupt, Packet, encode_packet  # noqa: E402
from rsp.registers import RegisterLayout  # noqa: E402
from rsp.tdesc import includes_of, parse_target_description  # noqa: E402

FEATURES = b"PacketSize=1000;qXfer:features:read+;qXfer:threads:read+;vContSupported+;QStartNoAckMode+"
FRAME_REGISTERS = ("esp", "ebp", "eip", "rsp", "rbp", "rip")  # what a step's stop carries (as probed's)


class Peer:
    """One end: a socket and the packets read from it."""

    def __init__(self, sock: socket.socket):
        self.sock, self.framer = sock, Framer()

    def next(self) -> Packet | Interrupt:
        while True:
            event = self.framer.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError
                self.framer.receive_data(data)
            elif isinstance(event, Packet | Interrupt):
                return event

    def buffered(self) -> bool:
        return self.framer.buffered > 0


class Qemu(Peer):
    """QEMU's gdbstub. QEMU 7.2 keeps acks on: each packet it sends is acked by a `+` in front of our next
    write (never alone: while the guest runs, any byte but 0x03 would pause it)."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock)
        self.owed = False

    def send(self, *payloads: bytes) -> None:
        self.sock.sendall((b"+" if self.owed else b"") + b"".join(encode_packet(p) for p in payloads))
        self.owed = False

    def reply(self) -> bytes:
        event = self.next()
        self.owed = True
        return event.payload if isinstance(event, Packet) else b""

    def request(self, *payloads: bytes) -> list[bytes]:
        self.send(*payloads)
        return [self.reply() for _ in payloads]

    def read_document(self, annex: str) -> str:
        text, offset = b"", 0
        while True:
            (part,) = self.request(b"qXfer:features:read:%s:%x,%x" % (annex.encode(), offset, 0xF00))
            text += part[1:]
            offset += len(part) - 1
            if part[:1] != b"m":
                return text.decode()


class Floor:
    """GDB's session, served with QEMU behind."""

    def __init__(self, qemu: Qemu, layout: RegisterLayout, frame: tuple[str, ...], threads: list[bytes]):
        self.qemu, self.layout, self.frame, self.threads = qemu, layout, frame, threads
        ids = b"".join(b'<thread id="%s"/>' % t for t in threads)
        self.threads_document = b'<?xml version="1.0"?><threads>' + ids + b"</threads>"
        self.ack = True
        self.wanted: set[tuple[int, int]] = set()
        self.installed: set[tuple[int, int]] = set()
        self.registers: bytes | None = None
        self.reads: list[tuple[int, int]] = []  # GDB's reads at this stop
        self.snapshot: dict[tuple[int, int], bytes] = {}

    def serve(self, gdb: socket.socket) -> None:
        self.gdb = Peer(gdb)
        while True:
            try:
                event = self.gdb.next()
            except EOFError:
                return
            if isinstance(event, Packet) and self.answer(event.payload):
                return

    def reply(self, payload: bytes) -> None:
        self.gdb.sock.sendall((b"+" if self.ack else b"") + encode_packet(payload))

    def answer(self, p: bytes) -> bool:
        """Answer one packet of GDB's; True when GDB detached."""
        if p.startswith(b"qSupported"):
            self.reply(FEATURES)
        elif p == b"QStartNoAckMode":
            self.reply(b"OK")
            self.ack = False
        elif p[:3] in (b"Z0,", b"z0,"):
            address, kind = (int(x, 16) for x in p[3:].split(b",")[:2])
            (self.wanted.add if p[:1] == b"Z" else self.wanted.discard)((address, kind))
            self.reply(b"OK")
        elif p.startswith(b"vCont;") or p in (b"c", b"s"):
            self.resume(p, step=b";s" in p or p == b"s")
        elif p == b"g" and self.registers is not None:
            self.reply(self.registers)
        elif p.startswith(b"qXfer:threads:read::"):
            offset, length = (int(x, 16) for x in p.split(b"::")[1].split(b","))
            part = self.threads_document[offset : offset + length]
            self.reply((b"l" if offset + length >= len(self.threads_document) else b"m") + part)
        elif p == b"qfThreadInfo":
            self.reply(b"m" + b",".join(self.threads))
        elif p == b"qsThreadInfo":
            self.reply(b"l")
        elif p[:1] == b"m" and b":" not in p:
            key = tuple(int(x, 16) for x in p[1:].split(b","))
            if key not in self.reads:
                self.reads.append(key)
            data = self.snapshot.get(key)
            if data is None:
                (data,) = self.qemu.request(p)
                if self.registers is not None:
                    self.snapshot[key] = data
            self.reply(data)
        elif p == b"D":
            self.qemu.request(*(b"z0,%x,%x" % z for z in self.installed))
            self.reply(b"OK")
            self.qemu.request(b"D")
            return True
        else:
            if p[:1] in b"GPMX":
                self.registers, self.snapshot = None, {}
            (answer,) = self.qemu.request(p)
            self.reply(answer)
        return False

    def resume(self, payload: bytes, *, step: bool) -> None:
        changes = []
        if not step:
            changes = [b"Z0,%x,%x" % z for z in self.wanted - self.installed]
            changes += [b"z0,%x,%x" % z for z in self.installed - self.wanted]
            self.installed = set(self.wanted)
        prefetch, self.reads = self.reads[-8:], []
        self.registers, self.snapshot = None, {}
        self.qemu.send(*changes, payload)
        for _ in changes:
            self.qemu.reply()
        if self.ack:
            self.gdb.sock.sendall(b"+")
        while not self.qemu.buffered():
            ready, _, _ = select.select([self.qemu.sock, self.gdb.sock], [], [])
            if self.gdb.sock in ready and isinstance(self.gdb.next(), Interrupt):
                self.qemu.sock.sendall(b"\x03")
            if self.qemu.sock in ready:
                break
        stop = self.qemu.reply()
        if stop[:1] != b"T":
            self.reply(stop)
            return
        replies = self.qemu.request(b"g", *(b"m%x,%x" % r for r in prefetch))
        self.registers = replies[0]
        self.snapshot = dict(zip(prefetch, replies[1:], strict=True))
        text = self.layout.expedited_text(self.registers, self.frame if step else None)
        self.reply(stop[:3] + text + stop[3:])


def build_native(workdir: Path) -> Path | None:
    """`stub_floor.c` built into `workdir` with `cc -O2`; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary = workdir / "stub_floor"
    subprocess.run([cc, "-O2", "-o", str(binary), str(Path(__file__).with_name("stub_floor.c"))], check=True)
    return binary


@contextlib.contextmanager
def serving(target: str, workdir: Path, native: Path | None = None) -> Iterator[str]:
    """This floor in front of QEMU's gdbstub at `target` (its C build when `native`), in a process of its
    own; yields the socket where GDB connects."""
    listen = workdir / ("floor-c.sock" if native else "floor-py.sock")
    argv = [sys.executable, __file__, "--target", target, "--listen", f"unix:{listen}"]
    floor = subprocess.Popen(argv + (["--native", str(native)] if native else []), stderr=subprocess.PIPE, text=True)
    try:
        if floor.stderr.readline().strip() != "ready":
            raise RuntimeError(f"the floor stub did not start: {floor.stderr.read()[-2000:]}")
        yield str(listen)
    finally:
        floor.kill()
        floor.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="QEMU's gdbstub, unix:PATH")
    ap.add_argument("--listen", required=True, help="where GDB connects, unix:PATH")
    ap.add_argument("--native", help="the build of stub_floor.c to hand the sockets to")
    args = ap.parse_args()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.target.split(":", 1)[1])
    qemu = Qemu(sock)
    documents = {"target.xml": qemu.read_document("target.xml")}
    todo = includes_of(documents["target.xml"])
    while todo:
        name = todo.pop()
        if name not in documents:
            documents[name] = qemu.read_document(name)
            todo += includes_of(documents[name])
    tdesc = parse_target_description(documents)
    frame = tuple(r.name for r in tdesc.registers if r.name in FRAME_REGISTERS)
    (threads,) = qemu.request(b"qfThreadInfo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.listen.split(":", 1)[1])
    listener.listen(1)
    print("ready", file=sys.stderr, flush=True)
    if args.native:
        # fd 3: QEMU, fd 4: the listener; then what the loop needs to know, as arguments.
        in_g = [r for r in tdesc.registers if r.offset is not None]
        spec = lambda registers: ",".join(f"{r.regnum}:{r.offset}:{r.size}" for r in registers)  # noqa: E731
        for fd, target in ((os.dup(sock.fileno()), 3), (os.dup(listener.fileno()), 4)):
            os.dup2(fd, target)
            os.set_inheritable(target, True)
        os.execv(args.native, [args.native, "1" if qemu.owed else "0", spec(in_g),
                               spec(r for r in in_g if r.name in frame), threads[1:].decode()])
    gdb, _ = listener.accept()
    Floor(qemu, RegisterLayout(tdesc), frame, threads[1:].split(b",")).serve(gdb)


if __name__ == "__main__":
    main()
