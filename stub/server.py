"""The GDB stub: probed serves GDB over RSP, in front of the one QEMU connection the engine owns.

GDB must not be able to tell, except that the guest runs a little slower:
- Packets that would break the daemon never reach QEMU: `?` (QEMU would delete every breakpoint), `k`/`vKill`
  (QEMU would exit: we detach instead and say so in the daemon's log), `D` (QEMU would drop every breakpoint
  and resume; we drop GDB's only). `Qqemu.PhyMemMode` is global in QEMU: the stub keeps GDB's setting and
  switches it around GDB's own memory accesses only, so the daemon's reads stay virtual.
- GDB's breakpoints and watchpoints are GDB's: the engine merges them with the probes', hides the stops
  only probes wanted, and hands GDB the stops GDB caused. Hardware kinds draw on the shared slot allocator.
- Everything else is forwarded while GDB holds the guest stopped, and QEMU's answer (including "not
  supported") goes back unchanged. QEMU's target description reaches GDB as it is.

One GDB at a time: a second connection is told so and closed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Any

import trio

from probed.engine.api import DebuggerAPI
from probed.errors import ProbedError, SlotsExhausted
from probed.gdbside.debugger import DebuggerLink
from rsp.commands import (
    Attached,
    Continue,
    Detach,
    ExtendedMode,
    HaltReason,
    InsertBreakpoint,
    Kill,
    Malformed,
    Monitor,
    MustReplyEmpty,
    QSupported,
    Query,
    ReadMemory,
    ReadRegisters,
    RemoveBreakpoint,
    SetThread,
    StartNoAck,
    Step,
    ThreadInfoFirst,
    ThreadInfoNext,
    VCont,
    VKill,
    WriteMemory,
    parse_command,
)
from rsp.connection import parse_target, send_now
from rsp.framing import NEED_DATA, BadChecksum, Framer, Interrupt, Nack, Packet, encode_packet
from rsp.stop import StopEvent, StopReply, ThreadId, encode_stop_reply

__all__ = ["GdbSession", "serve_gdb"]

log = logging.getLogger(__name__)

STUB_FEATURES = b"PacketSize=1000;qXfer:features:read+;vContSupported+;QStartNoAckMode+"
PHYS_MODE = b"Qqemu.PhyMemMode:"
HOT_SECONDS = 0.001


class GdbSession:
    """One attached GDB."""

    def __init__(self, engine: DebuggerAPI, stream: trio.abc.Stream):
        self.engine = engine
        self.stream = stream
        self.framer = Framer()
        self.ack = True
        self.phys = False
        self.last_stop: StopEvent = StopReply(5)
        self._send_lock = trio.Lock()
        # Stop replies are written at once from the engine's task; what the socket does not take goes out
        # from `_send_backlog`.
        self._backlog_send, self._backlog = trio.open_memory_channel[bytes](math.inf)
        self._backlogged = 0
        self.link = DebuggerLink(self._send_stop)
        self.closed = False
        self.waiting_stop = False  # GDB resumed the guest and waits for a stop reply
        self._hot_until = 0.0
        self._fd = stream.socket.fileno()

    async def send(self, data: bytes) -> None:
        if not self._send_lock.locked():
            sent = send_now(self.stream, data)
            if sent == len(data):
                return
            data = data[sent:]
        async with self._send_lock:
            await self.stream.send_all(data)

    async def reply(self, payload: bytes) -> None:
        await self.send(encode_packet(payload))

    # -- the session ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until GDB detaches or goes away; GDB's breakpoints never outlive the session."""
        self.last_stop = await self.engine.debugger_attach(self.link)
        log.info("GDB attached")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_backlog)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.engine.debugger_detach(self.link)
                except ProbedError as exc:
                    log.warning("could not detach GDB cleanly: %s", exc)
            log.info("GDB detached; its breakpoints are gone and the guest runs on")

    def _kick(self) -> None:
        self._hot_until = trio.current_time() + HOT_SECONDS

    async def _receive(self) -> bytes:
        """GDB's next bytes (b"" when it is gone).

        Why not just `receive_some`: GDB sends its next packet some tens of microseconds after our reply,
        and a process woken from epoll takes about as long again to run (measured here: a ping-pong over
        a socket costs 40-55 us asleep, 17-20 us polling). So for `HOT_SECONDS` after each packet this
        polls the socket between scheduler passes (other tasks run, and their sockets are polled too),
        and only then sleeps in epoll as usual.
        """
        while trio.current_time() < self._hot_until:
            try:
                return os.read(self._fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.checkpoint()
            except OSError:
                return b""
        return await self.stream.receive_some(65536)

    async def _read_loop(self) -> None:
        """Read GDB's bytes and answer each packet in turn.

        A resume returns at once: the stop reply is sent by `_send_stop` when the engine has it.
        """
        try:
            while True:
                data = await self._receive()
                if not data:
                    return  # GDB is gone (or killed): end the session
                self.framer.receive_data(data)
                while (event := self.framer.next_event()) is not NEED_DATA:
                    if isinstance(event, Packet):
                        self._kick()
                        if self.ack:
                            await self.send(b"+")
                        if await self.handle(event.payload):
                            return
                    elif isinstance(event, Interrupt) and self.waiting_stop:
                        await self.engine.debugger_interrupt(self.link)
                    elif isinstance(event, BadChecksum):
                        await self.send(b"-")
                    elif isinstance(event, Nack):
                        log.debug("GDB asked for a packet again")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _send_stop(self, event: StopEvent) -> None:
        """Give GDB a stop it waits for (called by the engine; must not block)."""
        self.waiting_stop = False
        self.last_stop = event
        data = encode_packet(self._stop_payload(event))
        if not self._backlogged and not self._send_lock.locked():
            try:
                data = data[send_now(self.stream, data) :]
            except OSError:
                return  # GDB is gone: the read loop sees it and ends the session
        if data:
            self._backlogged += 1
            self._backlog_send.send_nowait(data)

    async def _send_backlog(self) -> None:
        async for data in self._backlog:
            await self.send(data)
            self._backlogged -= 1

    def _current_thread(self) -> ThreadId | None:
        threads = self.engine.target.threads
        return self.link.current_thread or (threads[0] if threads else None)

    def _stop_payload(self, event: StopEvent) -> bytes:
        """The stop reply, with the general registers the engine read at the stop: GDB needs no `g`."""
        if isinstance(event, StopReply) and event.thread is not None and event.thread.pid is not None:
            event = replace(event, thread=_for_gdb(event.thread))
        payload = encode_stop_reply(event)
        if not isinstance(event, StopReply) or event.registers:
            return payload
        g = self.link.cached_registers(event.thread)
        if g is None:
            return payload
        # `T` and the signal, then the general registers (the manual has them come first), then the rest.
        # Only those: they are what GDB uses at a stop, and parsing all of them (x87, SSE, control
        # registers) cost GDB more than the `g` it then rarely needs.
        general = self.engine.arch.registers
        return payload[:3] + self.engine.target.layout.expedited_text(g, general) + payload[3:]

    # -- packets --------------------------------------------------------------------------------------

    async def handle(self, payload: bytes) -> bool:
        """Answer one packet; returns True when the session ends."""
        cmd = parse_command(payload)
        engine = self.engine
        try:
            if isinstance(cmd, QSupported):
                await self.reply(STUB_FEATURES)
            elif isinstance(cmd, StartNoAck):
                await self.reply(b"OK")
                self.ack = False
            elif isinstance(cmd, HaltReason):
                await self.reply(self._stop_payload(self.last_stop))
            elif isinstance(cmd, Detach):
                await self.reply(b"OK")
                return True
            elif isinstance(cmd, Kill):
                log.warning("GDB asked to kill the guest: probed detaches GDB instead; the guest runs on")
                if isinstance(cmd, VKill):
                    await self.reply(b"OK")
                return True
            elif isinstance(cmd, InsertBreakpoint | RemoveBreakpoint):
                await self._breakpoint(cmd)
            elif isinstance(cmd, Continue | Step | VCont):
                await self._resume(cmd)
            elif isinstance(cmd, Attached):
                await self.reply(b"1")  # attached to a running machine: GDB detaches on quit
            elif isinstance(cmd, Query) and cmd.name == "Qqemu.PhyMemMode":
                self.phys = cmd.args == b"1"
                await self.reply(b"OK")
            elif isinstance(cmd, Query) and cmd.name == "qqemu.PhyMemMode":
                await self.reply(b"1" if self.phys else b"0")
            elif isinstance(cmd, Monitor):
                await self._monitor(cmd)
            elif isinstance(cmd, ReadRegisters) and (cached := self.link.registers_for_gdb()) is not None:
                await self.reply(cached)  # read by the engine at this stop already
            elif isinstance(cmd, ThreadInfoFirst):
                # vCPUs do not come and go under QEMU: the list read at attach is the list.
                await self.reply(b"m" + b",".join(_for_gdb(t).encode() for t in engine.target.threads))
            elif payload == b"qC" and (current := self._current_thread()) is not None:
                await self.reply(b"QC" + _for_gdb(current).encode())
            elif isinstance(cmd, ThreadInfoNext):
                await self.reply(b"l")
            elif isinstance(cmd, ReadMemory) and not self.phys:
                self.link.note_read(cmd.address, cmd.length)
                cached = self.link.memory.get(cmd.address, cmd.length)
                if cached is None:
                    cached = await engine.debugger_read_memory(cmd.address, cmd.length)
                await self.reply(cached)
            elif isinstance(cmd, ReadMemory | WriteMemory) and self.phys:
                replies = await engine.debugger_request([PHYS_MODE + b"1", payload, PHYS_MODE + b"0"])
                await self.reply(replies[1])
            elif isinstance(cmd, Malformed):
                await self.reply(b"E01")
            elif isinstance(cmd, MustReplyEmpty | ExtendedMode) or payload.startswith((b"vRun", b"vAttach")):
                await self.reply(b"")  # not for a machine that is already running
            else:
                if isinstance(cmd, SetThread) and cmd.op == "g":
                    self.link.g_thread = cmd.thread
                (reply,) = await engine.debugger_request([payload])
                await self.reply(reply)
        except SlotsExhausted as exc:
            log.info("GDB's %r refused: %s", payload[:20], exc)
            await self.reply(b"E1c")  # ENOSPC: like a machine out of debug registers
        except ProbedError as exc:
            log.info("GDB's %r refused: %s", payload[:20], exc)
            await self.reply(b"E16")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:
            # A bug of ours: GDB gets an error reply and the session goes on; the log has the details.
            log.exception("GDB's %r failed inside probed", payload[:40])
            await self.reply(b"E.probed failed on this packet; see the daemon's log")
        return False

    async def _breakpoint(self, cmd: InsertBreakpoint | RemoveBreakpoint) -> None:
        if isinstance(cmd, InsertBreakpoint):
            self.engine.debugger_insert(int(cmd.type), cmd.address, cmd.kind)
        else:
            self.engine.debugger_remove(int(cmd.type), cmd.address, cmd.kind)
        await self.reply(b"OK")

    async def _resume(self, cmd: Continue | Step | VCont) -> None:
        if isinstance(cmd, VCont):
            step = cmd.steps
            thread = cmd.stepped_thread() if step else None
        else:
            step = isinstance(cmd, Step)
            thread = None
        # The stop reply comes later, from `_send_stop`; meanwhile GDB may only send a Ctrl-C.
        self.waiting_stop = True
        await self.engine.debugger_resume("s" if step else "c", thread)

    async def _monitor(self, cmd: Monitor) -> None:
        client = self.engine.target.client
        output = await self.engine.call_stopped(lambda: client.monitor(cmd.command))
        if output:
            await self.reply(b"O" + output.encode().hex().encode())
        await self.reply(b"OK")


def _for_gdb(thread: ThreadId) -> ThreadId:
    """A thread id as GDB expects it from this stub, which does not offer `multiprocess+`: no process
    part. (QEMU uses `pP.T` ids once any debugger negotiated them, for as long as it runs.)"""
    return ThreadId(thread.tid) if thread.pid is not None else thread


async def serve_gdb(engine: Any, listen: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve GDB at `tcp:HOST:PORT` (loopback unless said otherwise) or `unix:PATH`, one at a time."""
    kind, address = parse_target(listen)
    if kind == "unix":
        listeners = [trio.SocketListener(await _unix_listener(address))]
    else:
        host, port = address
        listeners = await trio.open_tcp_listeners(port, host=host or "127.0.0.1")
    busy = False

    async def handle(stream: trio.abc.Stream) -> None:
        nonlocal busy
        async with stream:
            if busy:
                await _refuse(stream)
                return
            busy = True
            try:
                await GdbSession(engine, stream).run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                busy = False

    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)


async def _unix_listener(path: str):

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(4)
    return sock


async def _refuse(stream: trio.abc.Stream) -> None:
    """Tell a second GDB why it cannot attach: its first packet gets an error reply."""
    framer = Framer()
    with trio.move_on_after(5):
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            framer.receive_data(data)
            while (event := framer.next_event()) is not NEED_DATA:
                if isinstance(event, Packet):
                    await stream.send_all(b"+" + encode_packet(b"E.probed serves one GDB at a time; another is attached"))
                    # Let GDB read it and hang up itself (closing first would only show it a broken pipe).
                    while await stream.receive_some(4096):
                        pass
                    return
