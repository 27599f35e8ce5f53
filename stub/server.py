"""The GDB stub: probed serves GDB over RSP, in front of the one QEMU connection the engine owns.

GDB must not be able to tell, except that the guest runs a little slower:
- Packets that would break the daemon never reach QEMU: `?` (QEMU would delete every breakpoint), `k`/`vKill`
  (QEMU would exit: we detach instead and say so in the daemon's log), `D` (QEMU would drop every breakpoint
  and resume; we drop GDB's only). `Qqemu.PhyMemMode` is global in QEMU: the stub keeps GDB's setting and
  switches it around GDB's own memory accesses only, so the daemon's reads stay virtual.
- GDB's breakpoints and watchpoints are GDB's: the engine merges them with the probes', hides the stops
  only probes wanted, and hands GDB the stops GDB caused. Hardware kinds draw on the shared slot allocator.
- Packets QEMU answers (`stub.policy.FORWARDED`) are forwarded while GDB holds the guest stopped, and
  QEMU's answer goes back unchanged; QEMU's target description reaches GDB as it is. Every other packet
  gets the empty reply ("not supported") here: QEMU would answer it the same way, or not at all (a bare
  `q`, `v`, `Q`, `F...`), which would stall GDB and the engine until the request timed out.
- `monitor` commands that end, reset, pause or resume the VM behind the engine's back, or move its gdbstub
  (`stub.policy.REFUSED_MONITOR`), are refused with an `E` reply and a message saying why, unless the stub
  was made with `allow_monitor=True` (the daemon's `--gdb-allow-monitor`).
- A GDB that misbehaves or goes away (a hang-up, a reset, a packet too long, garbage) ends its own session
  only: GDB's breakpoints go, and the engine and its probes go on. A packet GDB asks for again (`-`) is sent
  again.

One GDB at a time: a second connection is told so and closed.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import replace
from time import perf_counter
from typing import Any

import trio

from probed.engine.api import DebuggerAPI
from probed.errors import ProbedError, SlotsExhausted
from probed.gdbside.debugger import DebuggerLink
from rsp import packets
from rsp import replies as reply
from rsp.command_parser import parse_command
from rsp.commands import (
    Attached,
    Command,
    Continue,
    CurrentThread,
    Detach,
    HaltReason,
    InsertBreakpoint,
    Kill,
    Malformed,
    Monitor,
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
    XferRead,
)
from rsp.connection import parse_target, receive_from, send_now, stream_fd
from rsp.features import build_qsupported_reply
from rsp.framing import ACK, NACK, NEED_DATA, BadChecksum, Framer, Interrupt, Nack, Packet, encode_packet
from rsp.hostcores import FreeCores
from rsp.polling import PollChooser
from rsp.stop import StopEvent, StopReply, ThreadId
from stub.policy import forwarded, monitor_refusal

__all__ = ["GdbSession", "serve_gdb"]


log = logging.getLogger(__name__)

PACKET_SIZE = 0x1000
STUB_FEATURES = build_qsupported_reply(
    {
        "PacketSize": f"{PACKET_SIZE:x}",
        "qXfer:features:read": True,
        # GDB then lists threads at each stop with one packet, not `qfThreadInfo` and `qsThreadInfo`.
        "qXfer:threads:read": True,
        "vContSupported": True,
        "QStartNoAckMode": True,
    }
)
MAX_PACKET = 4 * PACKET_SIZE
"""Bytes a packet from GDB may span (escapes included); GDB keeps to `PacketSize`, a longer one is dropped."""
HOT_SECONDS = 0.001
"""How long the stub may poll for GDB's next packet (when `rsp.polling.PollChooser` finds it pays)."""

def expedited(arch: Any, *, step: bool = True) -> tuple[str, ...] | None:
    """The registers a stop reply carries (None: all of them).

    After a step, the stack pointer, frame pointer and pc: what GDB reads at every stop to know where it is
    and in which frame (`stepi` compares frames); it parses three faster than more, and its `g` for the
    others is answered from what the engine read at the stop. After a continue, all: GDB shows the frame
    it stopped in and reads every register for that, which then takes no `g`. Measured with
    `bench/gdb_proxy.py`: see docs/gdb.md, "Fewer round trips for GDB".
    """
    if not step:
        return None
    return tuple(name for name in (arch.sp, arch.fp, arch.pc) if name)


class GdbSession:
    """One attached GDB."""

    def __init__(self, engine: DebuggerAPI, stream: trio.abc.Stream, *, allow_monitor: bool = False):
        self.engine = engine
        self.stream = stream
        self.allow_monitor = allow_monitor
        self.framer = Framer(max_packet=MAX_PACKET)
        self.ack = True
        self._ack_owed = False  # the `+` for GDB's last packet, sent in front of the reply when it is quick
        self._last_frame = b""  # our last packet, for GDB's `-`
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
        # Waits for GDB's next packet after a reply (GDB answers in microseconds) and after a resume (the
        # guest runs first; meanwhile polling keeps the engine's wait for QEMU's stop hot too) cost
        # differently: each kind has its own measure.
        window = HOT_SECONDS if len(os.sched_getaffinity(0)) > 1 else 0.0
        cores = FreeCores()
        self.pollers = {False: PollChooser(window, free_cores=cores.free), True: PollChooser(window, free_cores=cores.free)}
        self._fd = stream_fd(stream)
        self._parsed: dict[bytes, Command] = {}
        self._stepped = True  # GDB's last resume was a step (see `_stop_payload`)

    async def send(self, data: bytes) -> None:
        """Write to GDB.

        Raises:
            trio.BrokenResourceError: GDB is gone (a reset or a hang-up shows as this, never as OSError).
        """
        if not self._send_lock.locked():
            try:
                sent = send_now(self._fd, data)
            except OSError as exc:
                raise trio.BrokenResourceError(f"GDB is gone: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except OSError as exc:
                raise trio.BrokenResourceError(f"GDB is gone: {exc}") from exc

    def _parse(self, payload: bytes) -> Command:
        """`parse_command`, remembered for short packets: GDB sends the same few again at every stop
        (commands are immutable)."""
        if len(payload) > 64:
            return parse_command(payload)
        cmd = self._parsed.get(payload)
        if cmd is None:
            if len(self._parsed) >= 256:
                self._parsed.clear()
            cmd = self._parsed[payload] = parse_command(payload)
        return cmd

    async def reply(self, payload: bytes) -> None:
        """Send one packet (with the ack GDB is owed in front of it)."""
        frame = encode_packet(payload)
        self._last_frame = frame
        await self.send(self._take_ack() + frame)

    def _take_ack(self) -> bytes:
        if self._ack_owed:
            self._ack_owed = False
            return ACK
        return b""

    async def flush_ack(self) -> None:
        """Acknowledge GDB's packet now: what follows takes a while (GDB waits ~2 s for an ack, then
        sends the packet again)."""
        if self._ack_owed:
            self._ack_owed = False
            await self.send(ACK)

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

    async def _receive(self) -> bytes:
        """GDB's next bytes (b"" when it is gone).

        Why not just `receive_some`: GDB sends its next packet some tens of microseconds after our reply,
        and a process woken from epoll takes about as long again to run (measured here: a ping-pong over
        a socket costs 40-55 us asleep, 17-20 us polling). So for `HOT_SECONDS` after each packet this
        polls the socket between scheduler passes (other tasks run, and their sockets are polled too),
        and only then sleeps in epoll as usual. When no core is free for GDB (a busy host), polling takes
        the core GDB needs and costs a time slice a packet: `pollers` measure which way pays, and it is taken.
        """
        if self._fd is None:
            return await self.stream.receive_some(65536)
        poller = self.pollers[self.waiting_stop]
        try:
            data = await receive_from(self._fd, poller.begin(perf_counter()))
        except OSError:
            return b""
        poller.end(perf_counter())
        return data

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
                        self._ack_owed = self.ack
                        if await self.handle(event.payload):
                            return
                    elif isinstance(event, Interrupt) and self.waiting_stop:
                        await self.engine.debugger_interrupt(self.link)
                    elif isinstance(event, BadChecksum):
                        if self.ack:
                            await self.send(NACK)
                    elif isinstance(event, Nack) and self.ack and self._last_frame:
                        log.debug("GDB asked for our last packet again")
                        await self.send(self._last_frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _send_stop(self, event: StopEvent) -> None:
        """Give GDB a stop it waits for (called by the engine; must not block)."""
        self.waiting_stop = False
        self.last_stop = event
        data = encode_packet(self._stop_payload(event))
        self._last_frame = data
        if not self._backlogged and not self._send_lock.locked():
            try:
                data = data[send_now(self._fd, data) :]
            except OSError:
                return  # GDB is gone: the read loop sees it and ends the session
        if data:
            self._backlogged += 1
            self._backlog_send.send_nowait(data)

    async def _send_backlog(self) -> None:
        async for data in self._backlog:
            try:
                await self.send(data)
            except trio.BrokenResourceError:
                return  # GDB is gone: the read loop sees it and ends the session
            self._backlogged -= 1

    def _current_thread(self) -> ThreadId | None:
        threads = self.engine.target.threads
        return self.link.current_thread or (threads[0] if threads else None)

    def _stop_payload(self, event: StopEvent) -> bytes:
        """The stop reply, with the registers `expedited` names for GDB's last resume, as the engine read
        them at the stop."""
        if isinstance(event, StopReply) and event.thread is not None and event.thread.pid is not None:
            event = replace(event, thread=_for_gdb(event.thread))
        payload = reply.stop_reply(event)
        if not isinstance(event, StopReply) or event.registers:
            return payload
        g = self.link.cached_registers(event.thread)
        if g is None:
            return payload
        # `T` and the signal, then the registers (the manual has them come first), then the rest.
        names = expedited(self.engine.arch, step=self._stepped)
        return payload[:3] + self.engine.target.layout.expedited_text(g, names) + payload[3:]

    # -- packets --------------------------------------------------------------------------------------

    async def handle(self, payload: bytes) -> bool:
        """Answer one packet; returns True when the session ends."""
        cmd = self._parse(payload)
        engine = self.engine
        try:
            if isinstance(cmd, QSupported):
                await self.reply(STUB_FEATURES)
            elif isinstance(cmd, StartNoAck):
                await self.reply(reply.ok())
                self.ack = False
            elif isinstance(cmd, HaltReason):
                await self.reply(self._stop_payload(self.last_stop))
            elif isinstance(cmd, Detach):
                await self.reply(reply.ok())
                return True
            elif isinstance(cmd, Kill):
                log.warning("GDB asked to kill the guest: probed detaches GDB instead; the guest runs on")
                if isinstance(cmd, VKill):
                    await self.reply(reply.ok())
                else:
                    await self.flush_ack()
                return True
            elif isinstance(cmd, InsertBreakpoint | RemoveBreakpoint):
                await self._breakpoint(cmd)
            elif isinstance(cmd, Continue | Step | VCont):
                await self._resume(cmd)
            elif isinstance(cmd, Attached):
                await self.reply(reply.flag(True))  # attached to a running machine: GDB detaches on quit
            elif isinstance(cmd, Query) and cmd.name == "Qqemu.PhyMemMode":
                self.phys = cmd.args == b"1"
                await self.reply(reply.ok())
            elif isinstance(cmd, Query) and cmd.name == "qqemu.PhyMemMode":
                await self.reply(reply.flag(self.phys))
            elif isinstance(cmd, Monitor):
                await self._monitor(cmd)
            elif isinstance(cmd, ReadRegisters) and (cached := self.link.registers_for_gdb()) is not None:
                await self.reply(cached)  # read by the engine at this stop already
            elif isinstance(cmd, ThreadInfoFirst):
                # vCPUs do not come and go under QEMU: the list read at attach is the list.
                await self.reply(reply.thread_list(_for_gdb(t) for t in engine.target.threads))
            elif isinstance(cmd, CurrentThread) and (current := self._current_thread()) is not None:
                await self.reply(reply.current_thread_reply(_for_gdb(current)))
            elif isinstance(cmd, XferRead) and cmd.object == "threads" and not cmd.annex:
                document = reply.threads_document(_for_gdb(t) for t in engine.target.threads)
                await self.reply(reply.xfer_part(document, cmd.offset, cmd.length))
            elif isinstance(cmd, ThreadInfoNext):
                await self.reply(reply.thread_list(()))
            elif isinstance(cmd, ReadMemory) and not self.phys:
                self.link.note_read(cmd.address, cmd.length)
                cached = self.link.memory.get(cmd.address, cmd.length)
                if cached is None:
                    await self.flush_ack()
                    cached = await engine.debugger_read_memory(cmd.address, cmd.length)
                await self.reply(cached)
            elif isinstance(cmd, ReadMemory | WriteMemory) and self.phys:
                await self.flush_ack()
                replies = await engine.debugger_request(
                    [packets.qemu_phys_mem_mode(True), payload, packets.qemu_phys_mem_mode(False)]
                )
                await self.reply(replies[1])
            elif isinstance(cmd, Malformed):
                await self.reply(reply.error(1))
            elif forwarded(cmd):
                if isinstance(cmd, SetThread) and cmd.op == "g":
                    self.link.g_thread = cmd.thread
                await self.flush_ack()
                (answer,) = await engine.debugger_request([payload])
                await self.reply(answer)
            else:
                # Not for a machine that runs already (`vRun`, `!`...), or not a packet QEMU answers: "not
                # supported", as QEMU says, or would not say at all.
                await self.reply(reply.unsupported())
        except SlotsExhausted as exc:
            log.info("GDB's %r refused: %s", payload[:20], exc)
            await self.reply(reply.error(0x1C))  # ENOSPC: like a machine out of debug registers
        except ProbedError as exc:
            log.info("GDB's %r refused: %s", payload[:20], exc)
            await self.reply(reply.error(0x16))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:
            # A bug of ours: GDB gets an error reply and the session goes on; the log has the details.
            log.exception("GDB's %r failed inside probed", payload[:40])
            await self.reply(reply.error_text("probed failed on this packet; see the daemon's log"))
        return False

    async def _breakpoint(self, cmd: InsertBreakpoint | RemoveBreakpoint) -> None:
        if isinstance(cmd, InsertBreakpoint):
            self.engine.debugger_insert(int(cmd.type), cmd.address, cmd.kind)
        else:
            self.engine.debugger_remove(int(cmd.type), cmd.address, cmd.kind)
        await self.reply(reply.ok())

    async def _resume(self, cmd: Continue | Step | VCont) -> None:
        if isinstance(cmd, VCont):
            step = cmd.steps
            thread = cmd.stepped_thread() if step else None
        else:
            step = isinstance(cmd, Step)
            thread = None
        # The stop reply comes later, from `_send_stop`; meanwhile GDB may only send a Ctrl-C.
        self._stepped = bool(step)
        await self.flush_ack()
        self.waiting_stop = True
        await self.engine.debugger_resume("s" if step else "c", thread)

    async def _monitor(self, cmd: Monitor) -> None:
        refusal = None if self.allow_monitor else monitor_refusal(cmd.command)
        if refusal is not None:
            log.warning("GDB's 'monitor %s' refused", cmd.command[:60])
            # GDB shows `O` text as it comes, and takes only `E NN` as an error here (`E.text` would be
            # read as hex output).
            await self.reply(reply.console_output(refusal.encode() + b"\n"))
            await self.reply(reply.error(1))
            return
        await self.flush_ack()
        client = self.engine.target.client
        output = await self.engine.call_stopped(lambda: client.monitor(cmd.command))
        if output:
            await self.reply(reply.console_output(output.encode()))
        await self.reply(reply.ok())


def _for_gdb(thread: ThreadId) -> ThreadId:
    """A thread id as GDB expects it from this stub, which does not offer `multiprocess+`: no process
    part. (QEMU uses `pP.T` ids once any debugger negotiated them, for as long as it runs.)"""
    return ThreadId(thread.tid) if thread.pid is not None else thread


async def serve_gdb(
    engine: Any, listen: str, *, allow_monitor: bool = False, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Serve GDB at `tcp:HOST:PORT` (loopback unless said otherwise) or `unix:PATH`, one at a time.

    A session's failure, whatever it is, ends that session only (and is logged): the engine goes on.

    Args:
        allow_monitor: let GDB run every monitor command, `REFUSED_MONITOR` ones included.
    """
    kind, address = parse_target(listen)
    if kind == "unix":
        listeners = [trio.SocketListener(await _unix_listener(address))]
    else:
        host, port = address
        listeners = await trio.open_tcp_listeners(port, host=host or "127.0.0.1")
    busy = False

    async def handle(stream: trio.abc.Stream) -> None:
        nonlocal busy
        try:
            async with stream:
                if busy:
                    await _refuse(stream)
                    return
                busy = True
                try:
                    await GdbSession(engine, stream, allow_monitor=allow_monitor).run()
                finally:
                    busy = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("a GDB connection ended: %s", exc)
        except Exception:
            log.exception("a GDB session failed; the engine goes on")

    task_status.started(listeners)
    await trio.serve_listeners(handle, listeners)


async def _unix_listener(path: str):
    """A listening unix socket at `path`, mode 0600; a stale socket there is replaced, anything else is not.

    Raises:
        FileExistsError: something that is not a socket is at `path`.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket: probed will not replace it")
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(4)
    return sock


async def _refuse(stream: trio.abc.Stream) -> None:
    """Tell a second GDB why it cannot attach: its first packet gets an error reply."""
    framer = Framer(max_packet=MAX_PACKET)
    with trio.move_on_after(5):
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            framer.receive_data(data)
            while (event := framer.next_event()) is not NEED_DATA:
                if isinstance(event, Packet):
                    message = reply.error_text("probed serves one GDB at a time; another is attached")
                    await stream.send_all(ACK + encode_packet(message))
                    # Let GDB read it and hang up itself (closing first would only show it a broken pipe).
                    while await stream.receive_some(4096):
                        pass
                    return
