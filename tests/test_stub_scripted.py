"""The stub's session (`GdbSession`) against a scripted GDB over memory streams, with a stand-in engine that
records what reaches it: what the stub answers itself, what it forwards, resends, refusals, hang-ups.
(The stub on real QEMU with the real engine: tests/test_stub.py, tests/test_stub_faults.py, tests/test_gdb.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from probed.engine.api import DebuggerAPI, protocol_mismatches
from rsp.framing import NEED_DATA, Framer, Packet, encode_packet
from rsp.stop import StopReply, ThreadId
from stub.server import GdbSession


class StandInEngine:
    """The engine as the stub sees it (`DebuggerAPI`), recording what reaches it; GDB resumes nothing here."""

    def __init__(self):
        self.forwarded: list[list[bytes]] = []
        self.monitor_commands: list[str] = []
        self.attached = self.detached = 0
        self.target = SimpleNamespace(threads=[ThreadId(1)], client=SimpleNamespace(monitor=self._monitor))
        self.arch = None

    async def _monitor(self, command: str) -> str:
        self.monitor_commands.append(command)
        return "done\n"

    async def debugger_attach(self, link) -> StopReply:
        self.attached += 1
        return StopReply(5, ThreadId(1))

    async def debugger_detach(self, link) -> None:
        self.detached += 1

    async def debugger_request(self, payloads):
        self.forwarded.append(list(payloads))
        return [b"OK" for _ in payloads]

    async def call_stopped(self, fn):
        return await fn()

    async def debugger_read_memory(self, address, length):
        raise AssertionError("not used here")

    def debugger_insert(self, ztype, address, kind):
        raise AssertionError("not used here")

    def debugger_remove(self, ztype, address, kind):
        raise AssertionError("not used here")

    async def debugger_resume(self, action, thread=None):
        raise AssertionError("not used here")

    async def debugger_interrupt(self, link):
        raise AssertionError("not used here")


def test_the_stand_in_has_the_engines_debugger_api():
    assert protocol_mismatches(DebuggerAPI, StandInEngine()) == []


class Gdb:
    """The scripted GDB: raw bytes out, packets in."""

    def __init__(self, stream):
        self.stream = stream
        self.framer = Framer()
        self.raw = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def packet(self) -> bytes:
        while True:
            event = self.framer.next_event()
            if type(event) is Packet:
                return event.payload
            if event is NEED_DATA:
                data = await self.stream.receive_some(65536)
                assert data, "the stub hung up"
                self.raw += data
                self.framer.receive_data(data)

    async def ask(self, payload: bytes) -> bytes:
        await self.send(b"+" + encode_packet(payload))
        return await self.packet()


async def session(script, **kw) -> StandInEngine:
    """Run a session with `script(gdb)` as GDB; returns the stand-in engine after the session ended."""
    engine = StandInEngine()
    ours, theirs = trio.testing.memory_stream_pair()
    gdb = Gdb(theirs)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(GdbSession(engine, ours, **kw).run)
            await script(gdb)
    return engine


async def test_gdb_asking_again_gets_the_same_packet():
    async def script(gdb):
        await gdb.send(encode_packet(b"?"))
        assert await gdb.packet() == b"T05thread:01;"
        await gdb.send(b"-")
        assert await gdb.packet() == b"T05thread:01;"
        assert gdb.raw == b"+" + encode_packet(b"T05thread:01;") * 2  # the ack rode with the first reply
        assert await gdb.ask(b"D") == b"OK"

    engine = await session(script)
    assert engine.detached == 1


async def test_a_garbled_packet_is_asked_for_again():
    async def script(gdb):
        await gdb.send(b"$qC#00")
        while b"-" not in gdb.raw:
            gdb.raw += await gdb.stream.receive_some(65536)
        assert await gdb.ask(b"qC") == b"QC01"
        assert await gdb.ask(b"D") == b"OK"

    await session(script)


async def test_only_what_qemu_answers_is_forwarded():
    unanswered = [b"q", b"v", b"Q", b"F-1,2", b"vFoo", b"qOffsets", b"X10,0:", b"qXfer:libraries:read::0,10", b"!"]

    async def script(gdb):
        for p in unanswered:
            assert await gdb.ask(p) == b"", p
        assert await gdb.ask(b"qqemu.sstepbits") == b"OK"
        assert await gdb.ask(b"Hg1") == b"OK"
        assert await gdb.ask(b"mzz") == b"E01"  # malformed: refused here
        assert await gdb.ask(b"D") == b"OK"

    engine = await session(script)
    assert engine.forwarded == [[b"qqemu.sstepbits"], [b"Hg1"]]


async def test_the_thread_list_comes_in_one_packet_and_in_parts_when_asked():
    """`qXfer:threads:read` (offered in qSupported) saves GDB the `qfThreadInfo`/`qsThreadInfo` pair at
    every stop; a short read gets `m` and the part, the last part `l`."""
    async def script(gdb):
        assert b"qXfer:threads:read+" in (await gdb.ask(b"qSupported:xmlRegisters=i386")).split(b";")
        whole = await gdb.ask(b"qXfer:threads:read::0,ffb")
        assert whole == b'l<?xml version="1.0"?>\n<threads><thread id="01"/></threads>\n'
        first = await gdb.ask(b"qXfer:threads:read::0,10")
        rest = await gdb.ask(b"qXfer:threads:read::10,ffb")
        assert (first[:1], rest[:1]) == (b"m", b"l")
        assert b"l" + first[1:] + rest[1:] == whole
        assert await gdb.ask(b"qXfer:threads:read::%x,10" % len(whole)) == b"l"
        assert await gdb.ask(b"D") == b"OK"

    await session(script)


async def test_monitor_commands_are_refused_unless_allowed():
    async def script(gdb):
        assert (await gdb.ask(b"qRcmd," + b"quit".hex().encode()))[:1] == b"O"
        assert await gdb.packet() == b"E01"
        await gdb.send(b"+" + encode_packet(b"qRcmd," + b"info status".hex().encode()))
        assert await gdb.packet() == b"O" + b"done\n".hex().encode()
        assert await gdb.packet() == b"OK"
        assert await gdb.ask(b"D") == b"OK"

    engine = await session(script)
    assert engine.monitor_commands == ["info status"]

    async def allowed(gdb):
        await gdb.send(b"+" + encode_packet(b"qRcmd," + b"system_reset".hex().encode()))
        assert await gdb.packet() == b"O" + b"done\n".hex().encode()
        assert await gdb.packet() == b"OK"
        assert await gdb.ask(b"D") == b"OK"

    engine = await session(allowed, allow_monitor=True)
    assert engine.monitor_commands == ["system_reset"]


async def test_a_gdb_that_hangs_up_mid_packet_ends_its_session_and_detaches():
    async def script(gdb):
        assert await gdb.ask(b"qC") == b"QC01"
        await gdb.send(b"$qSupported:multipro")
        await gdb.stream.aclose()

    engine = await session(script)
    assert (engine.attached, engine.detached) == (1, 1)


async def test_garbage_and_an_oversized_packet_are_skipped():
    async def script(gdb):
        await gdb.send(b"junk\xff" + b"$" + b"a" * 20000 + b"#00")
        assert await gdb.ask(b"qC") == b"QC01"
        assert await gdb.ask(b"D") == b"OK"

    engine = await session(script)
    assert engine.forwarded == []
