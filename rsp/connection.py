"""The trio client connection to a gdbstub: the only code in `rsp` that touches a socket.

`RSPClient` is a pump around `rsp.client.ClientProtocol`, which owns the protocol's state (acks, resends,
replies in order, write-behind requests, stop replies; see there for how QEMU 7.2's gdbstub needs them).
This module moves bytes: it writes what the protocol returns, reads what the socket has, and turns events
into return values, with time limits on the waits.

Speed matters (a probe hit is several exchanges): writes go out in one system call when the socket takes
them (`send_now`), and for a while after a resume the socket may be polled rather than slept on
(`poll_next`, when `rsp.polling.PollChooser` finds it pays on this host now).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import NoReturn

import trio

from . import packets
from .client import ClientProtocol, Closed, Output, Reply, Resend, Stopped
from .errors import ConnectionClosed, LocalProtocolError, RemoteError, TargetTimeout
from .framing import NEED_DATA
from .packets import raise_for_error
from .polling import PollChooser
from .stop import StopEvent

__all__ = ["RSPClient", "open_stream", "parse_target", "receive_from", "send_now", "stream_fd"]

MAX_MEMORY_READ = 2048
# QEMU's packet buffer is 4096 bytes: an `M` carries its data as hex, so at most ~2 KiB less the header.
MAX_MEMORY_WRITE = 2000
"""QEMU refuses `m` reads over 2048 bytes with E22; larger reads are split."""


def send_now(fd: int | None, data: bytes) -> int:
    """Write what the socket `fd` takes of `data` right now, without yielding to the scheduler.

    Packets are small and the socket's buffer is nearly always free, so this is the whole send in one
    system call, with none of the scheduling round trips of an awaited `send_all` (a probe hit makes
    several sends). Returns how many bytes went out (0 when the socket would block, or for `fd` None: a
    stream that is not a socket, which the caller then sends to as usual).

    Raises:
        OSError: the peer is gone.
    """
    if fd is None:
        return 0
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def stream_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor of a socket stream (None for another stream: tests' memory streams)."""
    sock = getattr(stream, "socket", None)
    return sock.fileno() if sock is not None else None


async def receive_from(fd: int, poll_until: float = 0.0, before_waiting: Callable[[], None] | None = None) -> bytes:
    """What a socket holds now, or, when nothing, the next bytes it gets (b"" at the peer's end).
    `before_waiting` is called once when nothing is there yet (a time limit that only waits need).

    Until `poll_until` (a `time.perf_counter` time) the socket is polled between scheduler passes (other
    tasks run, and their sockets are polled too), then slept on in epoll as usual: bytes expected within
    microseconds are seen without the wake-up from epoll, which costs about as long as a whole exchange
    on small VMs (`rsp.polling` chooses when that pays).

    What trio's `receive_some` does, for the hot paths, without its layers (a try, a context manager and
    a checkpoint per call), which cost about as much as the system calls here. It does not checkpoint
    when data is there: the callers' loops block often enough.

    Raises:
        OSError: the connection failed (a reset).
        trio.ClosedResourceError: another task closed the socket.
    """
    while True:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            if before_waiting is not None:
                before_waiting()
                before_waiting = None
            if perf_counter() < poll_until:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(fd)


def parse_target(target: str) -> tuple[str, str | tuple[str, int]]:
    """Split `tcp:HOST:PORT`, `HOST:PORT`, `:PORT` or `unix:PATH` into a kind and an address.

    Raises:
        ValueError: the target string has none of these forms.
    """
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        if not path:
            raise ValueError(f"empty unix socket path in {target!r}")
        return "unix", path
    rest = target[len("tcp:") :] if target.startswith("tcp:") else target
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad target {target!r}: expected tcp:HOST:PORT or unix:PATH")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


async def open_stream(target: str) -> trio.abc.Stream:
    """Open a byte stream to `target` (see `parse_target`).

    Raises:
        ConnectionClosed: nothing accepts connections there.
    """
    kind, address = parse_target(target)
    try:
        if kind == "unix":
            return await trio.open_unix_socket(address)
        host, port = address
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ConnectionClosed(f"cannot connect to {target}: {exc.strerror or exc}") from exc


class RSPClient:
    """A client connection to a gdbstub over a trio stream.

    One task drives requests and resumes; another may call `interrupt` while the first waits in
    `wait_stop`. Nothing else may use the connection at the same time.

    Attributes:
        protocol: the protocol state machine this pumps.
        console: text of `O` packets received outside a monitor command.
        poll_until: `time.perf_counter` time until which receiving polls the socket instead of sleeping
            (`receive_from`).
        poller: chooses whether the wait after `poll_next` polls (its `window` is 0, never, until the
            owner sets it).
    """

    def __init__(self, stream: trio.abc.Stream, *, timeout: float = 10.0):
        self._stream = stream
        self.protocol = ClientProtocol()
        self._timeout = timeout
        self._send_lock = trio.Lock()
        self._monitor_output: list[bytes] | None = None
        self._bounded = 0
        # The bound of `begin_bound`: its scope, time allowed, start (perf_counter), and whether the scope's
        # deadline is set (only once a wait blocks: see `_arm_bound`) or paused (`bound_paused`).
        self._bound_scope: trio.CancelScope | None = None
        self._bound_seconds = math.inf
        self._bound_began = 0.0
        self._bound_armed = False
        self._bound_paused = False
        self.watching = False  # `wait_hangup` waits for the socket's first byte
        self.wake_on_data = False  # and returns when it comes (see `wait_hangup`)
        self._begun = 0  # replies to `begin` not taken yet
        self.console: list[bytes] = []
        self.poll_until = 0.0
        self.poller = PollChooser(0.0)
        self._timed = False  # a wait begun by `poll_next` is being timed for `poller`
        # Called before every read (when set): whoever else waits on this socket must let go of it now
        # (the engine's hangup watch, while GDB's requests run in GDB's task).
        self.claim: Callable[[], None] | None = None
        self._fd = stream_fd(stream)

    @classmethod
    async def connect(cls, target: str, *, timeout: float = 10.0) -> RSPClient:
        """Connect to `tcp:HOST:PORT` or `unix:PATH`."""
        return cls(await open_stream(target), timeout=timeout)

    # -- the protocol's state, as attributes (the engine reads them) ------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds a request may wait for its reply, unless told otherwise."""
        return self._timeout

    @property
    def running(self) -> bool:
        """True between a resume command and the stop reply that ends it."""
        return self.protocol.running

    @property
    def pending_stops(self):
        """Stop replies that arrived when none was expected (e.g. on connect)."""
        return self.protocol.pending_stops

    @property
    def holds_memory_writes(self) -> bool:
        """Whether memory writes of `post` are still held here (not sent: the target's memory lacks them)."""
        return self.protocol.holds_memory_writes

    @property
    def deferred_errors(self) -> list[tuple[bytes, bytes]]:
        """(request, reply) of write-behind requests that were not answered `OK`."""
        return self.protocol.deferred_errors

    @property
    def retransmits(self) -> int:
        """How many times a packet was sent again on the peer's `-`."""
        return self.protocol.retransmits

    # -- sending ---------------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if not data:
            return
        if not self._send_lock.locked():
            try:
                sent = send_now(self._fd, data)
            except OSError as exc:
                self.protocol.close()
                raise ConnectionClosed(f"connection lost while sending: {exc!r}") from exc
            if sent == len(data):
                return
            data = data[sent:]
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                await self._write_all(data)

    async def _write_all(self, data: bytes) -> None:
        """Send all of `data`; the caller holds the send lock inside a shielded scope.

        A send is never cut short by cancellation: half a packet, or a `c` that the target never got
        while we believe it runs, would leave the two sides disagreeing about the target's state.
        """
        try:
            with trio.fail_after(self._timeout):
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
            self.protocol.close()
            raise ConnectionClosed(f"connection lost while sending: {exc!r}") from exc

    def _check_open(self) -> None:
        if self.protocol.closed:
            raise ConnectionClosed("connection is closed")

    # -- receiving -------------------------------------------------------------------------------------

    async def _next_event(self):
        """The protocol's next event that needs the caller (writes what it asks to have written)."""
        protocol = self.protocol
        while True:
            event = protocol.next_event()
            if event is NEED_DATA:
                protocol.receive_data(await self._receive())
                continue
            kind = type(event)
            if kind is Resend:
                await self._send(event.data)
                continue
            if kind is Output:
                if event.monitor and self._monitor_output is not None:
                    self._monitor_output.append(event.text)
                else:
                    self.console.append(event.text)
                continue
            if kind is Closed:
                what = f" in the middle of a packet ({event.unfinished} bytes)" if event.unfinished else ""
                raise ConnectionClosed(f"the target closed the connection{what}")
            return event

    def poll_next(self) -> None:
        """The next bytes are expected soon (a stop after a resume): wait for them the way `poller` finds
        cheaper now, polling for `poller.window` or sleeping."""
        self.poll_until = self.poller.begin(perf_counter())
        self._timed = True

    async def _receive(self) -> bytes:
        if self.claim is not None:
            self.claim()
        try:
            fd = self._fd
            if fd is not None:
                arm = self._arm_bound if self._bounded and not self._bound_armed else None
                data = await receive_from(fd, self.poll_until, arm)
            else:
                if self._bounded:
                    self._arm_bound()
                data = await self._stream.receive_some(65536)
            if self._timed:
                self._timed = False
                self.poll_until = 0.0
                self.poller.end(perf_counter())
            return data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.protocol.close()
            raise ConnectionClosed(f"connection lost: {exc}") from exc

    async def wait_hangup(self) -> str | None:
        """Return when the peer closes the connection (why, in words); for a caller that expects nothing
        from the peer meanwhile (the target is stopped). Data that does come is left for the next read,
        and this then waits for good, unless `wake_on_data` was set while it watched (`watching`): then it
        returns None (the caller let the target run meanwhile, and this is its stop coming)."""
        sock = getattr(self._stream, "socket", None)
        if sock is None:
            await trio.sleep_forever()
        self.watching = True
        try:
            data = await sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            return f"connection lost: {exc}"
        finally:
            self.watching = False
        if not data:
            return "the target closed the connection"
        if self.wake_on_data:
            return None
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def _reply(self) -> bytes:
        """The payload of the next `Reply` (unasked stops and write-behind replies are kept aside)."""
        while True:
            event = await self._next_event()
            if type(event) is Reply:
                return event.payload

    # -- requests --------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        t = self._timeout if timeout is None else timeout
        return trio.current_time() + t if t is not None and t != math.inf else math.inf

    async def request(self, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Send one packet and return the reply payload as it is (errors are not raised here).

        Raises:
            TargetTimeout: no reply in time.
            ConnectionClosed: the connection is gone.
        """
        return (await self.pipeline([payload], timeout=timeout))[0]

    async def pipeline(
        self,
        payloads: Sequence[bytes],
        resume: bytes | None = None,
        *,
        timeout: float | None = None,
        defer: bool = False,
    ) -> list[bytes]:
        """Send several requests (and optionally one resume command last) in a single write.

        The stub answers in order, so one round trip serves them all. With `resume`, the guest is running
        when this returns and the stop reply is collected by `wait_stop`.
        With `defer` (and `resume`), the replies are not awaited: `wait_stop` takes them on its way to the
        stop reply (they come first), and any that is not `OK` lands in `deferred_errors`.

        Returns:
            The reply payloads, one per request, in order (none with `defer`).

        Raises:
            LocalProtocolError: the target runs, or replies to `begin` are still to be taken.
        """
        self._check_open()
        if self._begun:
            raise LocalProtocolError("replies to earlier requests (`begin`) are still to be taken")
        deferred = defer and resume is not None
        await self._send(self.protocol.send_requests(payloads, resume, check=deferred))
        replies: list[bytes] = []
        if deferred:
            return replies
        if self._bounded and timeout is None:
            await self._collect(len(payloads), replies)
            return replies
        with trio.move_on_at(self._deadline(timeout)):
            await self._collect(len(payloads), replies)
            return replies
        self.protocol.abandon()
        raise TargetTimeout(f"no reply to {payloads[len(replies)][:40]!r} within the time allowed")

    async def _collect(self, count: int, replies: list[bytes]) -> None:
        next_event = self._next_event  # the loop of `_reply`, inlined: a coroutine call less per reply
        while len(replies) < count:
            event = await next_event()
            if type(event) is Reply:
                replies.append(event.payload)

    async def begin(self, payloads: Sequence[bytes]) -> None:
        """Send requests in one write and take their replies later, in order, with `next_reply`
        (to act on the first reply while the others are still on their way)."""
        self._check_open()
        await self._send(self.protocol.send_requests(payloads))
        self._begun += len(payloads)

    async def next_reply(self, *, timeout: float | None = None) -> bytes:
        """The reply to the oldest request sent with `begin`.

        Raises:
            TargetTimeout: no reply in time.
            LocalProtocolError: no request of `begin` waits for its reply.
        """
        if not self._begun:
            raise LocalProtocolError("no request sent with `begin` waits for a reply")
        self._begun -= 1
        if self._bounded and timeout is None:
            return await self._reply()
        with trio.move_on_at(self._deadline(timeout)):
            return await self._reply()
        self._begun = 0
        self.protocol.abandon()
        raise TargetTimeout("no reply within the time allowed")

    async def post(self, payloads: Sequence[bytes]) -> None:
        """Requests whose replies must be `OK`, sent with the next write (write-behind).

        They go out in front of whatever is sent next (a request, a resume, a detach), so the stub
        handles them before anything later, and no write or wake-up of the stub is spent on them now. Their
        replies are taken on the way to the next reply or stop reply read; any that is not `OK` lands in
        `deferred_errors`.
        """
        self._check_open()
        self.protocol.post(payloads)

    def begin_bound(self, scope: trio.CancelScope, seconds: float) -> None:
        """One time limit for a whole exchange of several requests (cheaper than one scope each), in a
        scope the caller keeps across exchanges (a loop's): from now on, requests with no time limit of
        their own must be answered within `seconds` from now (plus any time in `bound_paused`), or `scope`
        is cancelled. `end_bound` ends it; when the scope is cancelled, the caller calls `timed_out`.

        The scope's deadline is set only when a wait for the target blocks: most exchanges find their
        reply already there (the target answers on the writer's core), and setting a deadline is not free.
        """
        self._bound_scope = scope
        self._bound_seconds = seconds
        self._bound_began = perf_counter()
        self._bounded += 1

    def end_bound(self, scope: trio.CancelScope) -> None:
        self._bounded -= 1
        self._bound_scope = None
        if self._bound_armed:
            self._bound_armed = False
            scope.deadline = math.inf

    def _arm_bound(self) -> None:
        """A wait in a bounded exchange is about to block: the bound's deadline goes on its scope."""
        scope = self._bound_scope
        if scope is None or self._bound_paused:
            return
        self._bound_armed = True
        scope.deadline = trio.current_time() + self._bound_seconds - (perf_counter() - self._bound_began)

    @contextmanager
    def bound_paused(self) -> Iterator[None]:
        """Time spent in this block (a Python handler, which has a time limit of its own) does not count
        against the bound of `begin_bound`; nor is a wait in it limited by that bound."""
        scope = self._bound_scope
        if scope is None or self._bound_paused:
            yield
            return
        if self._bound_armed:
            self._bound_armed = False
            scope.deadline = math.inf
        self._bound_paused = True
        began = perf_counter()
        try:
            yield
        finally:
            self._bound_paused = False
            self._bound_began += perf_counter() - began

    def timed_out(self, seconds: float) -> NoReturn:
        """The exchange begun with `begin_bound` did not finish in time.

        Raises:
            TargetTimeout: always.
        """
        self.protocol.abandon()
        raise TargetTimeout(f"the target did not answer within {seconds} s")

    async def checked(self, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Like `request`, but raise for the error reply and the empty (unsupported) reply.

        Raises:
            RemoteError: `E NN` or `E.text`.
            UnsupportedPacket: the empty reply.
        """
        reply = await self.request(payload, timeout=timeout)
        raise_for_reply(payload, reply)
        return reply

    async def resume(self, payload: bytes) -> None:
        """Send a resume command (`c`, `s`, `vCont;...`); `wait_stop` collects the stop."""
        self._check_open()
        await self._send(self.protocol.send_resume(payload))

    async def wait_stop(self, *, timeout: float | None = math.inf) -> StopEvent:
        """Wait for the stop reply that ends a resume (or return one that came unasked).

        Console output (`O`) while running goes to `console`.

        Raises:
            TargetTimeout: no stop within `timeout` (the target is still running).
        """
        pending = self.protocol.take_pending_stop()
        if pending is not None:
            return pending
        if timeout == math.inf or (self._bounded and timeout is None):
            return await self._next_stop()
        with trio.move_on_at(self._deadline(timeout)):
            return await self._next_stop()
        raise TargetTimeout("the target did not stop within the time allowed")

    async def _next_stop(self) -> StopEvent:
        while True:
            event = await self._next_event()
            if type(event) is Stopped:
                if event.queued:
                    return self.protocol.take_pending_stop()
                return event.event
            # Else a write-behind reply (checked by the protocol), or a stray one: not what we wait for.

    async def interrupt(self) -> None:
        """Ask a running target to stop (0x03). The stop arrives through `wait_stop`.

        Safe to call from another task while one waits in `wait_stop`; does nothing when the target is
        stopped or an interrupt is already on its way.
        """
        if not self.protocol.running:
            return
        with trio.CancelScope(shield=True):  # as in `_send`: all of it, or nothing
            async with self._send_lock:
                # Asked under the lock: the stop may have arrived while we waited for it.
                data = self.protocol.send_interrupt()
                if data:
                    await self._write_all(data)

    async def halt(self, *, timeout: float | None = None) -> StopEvent:
        """Interrupt a running target and wait until it has stopped."""
        await self.interrupt()
        return await self.wait_stop(timeout=self._timeout if timeout is None else timeout)

    # -- conveniences over requests --------------------------------------------------------------------

    async def read_memory(self, address: int, length: int) -> bytes:
        """Read guest memory, split into reads QEMU accepts.

        Raises:
            RemoteError: the target refused (an unmapped address, say).
        """
        reqs = [
            packets.read_memory(a, min(MAX_MEMORY_READ, address + length - a))
            for a in range(address, address + length, MAX_MEMORY_READ)
        ]
        replies = await self.pipeline(reqs)
        out = bytearray()
        for req, reply in zip(reqs, replies, strict=True):
            out += packets.parse_hex_data(reply, req)
        return bytes(out)

    async def write_memory(self, address: int, data: bytes) -> None:
        """Write guest memory with `M` (QEMU has no `X`)."""
        for off in range(0, len(data), MAX_MEMORY_WRITE):
            await self.checked(packets.write_memory(address + off, data[off : off + MAX_MEMORY_WRITE]))

    async def read_xfer(self, obj: str, annex: str, *, chunk: int = 0xF00) -> bytes:
        """Read a whole `qXfer:OBJECT:read:ANNEX` object in chunks (`m` more, `l` last)."""
        out = bytearray()
        while True:
            req = packets.xfer_read(obj, annex, len(out), chunk)
            reply = await self.checked(req)
            if reply[:1] not in (b"m", b"l"):
                raise RemoteError(None, f"bad qXfer reply {reply[:20]!r}", req)
            out += reply[1:]
            if reply[:1] == b"l":
                return bytes(out)

    async def monitor(self, command: str) -> str:
        """Run a monitor command (`qRcmd`) and return its output text."""
        self._monitor_output = []
        try:
            await self.checked(packets.monitor(command))
            return b"".join(self._monitor_output).decode(errors="replace")
        finally:
            self._monitor_output = None

    async def aclose(self) -> None:
        """Close the stream (does not detach: call `D` first if that is wanted)."""
        self.protocol.close()
        await self._stream.aclose()


def raise_for_reply(request: bytes, reply: bytes) -> None:
    """Raise the typed error an error or empty reply stands for (the rule of `rsp.packets`).

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply (`E NN` as the whole reply, or `E.text`).
    """
    raise_for_error(reply, request)
