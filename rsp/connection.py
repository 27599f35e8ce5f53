"""The trio client connection to a gdbstub: the only code in `rsp` that touches a socket.

It speaks to a stub the way QEMU 7.2's gdbstub needs (see "QEMU facts" in docs/architecture.md):

- QEMU answers `QStartNoAckMode` with the empty reply, so acks stay on. We acknowledge every packet we
  receive, but lazily: the `+` travels in front of the next bytes we send. While the guest runs, *any* byte
  but 0x03 pauses it, and a `+` sent after a pipelined `s` would land while the step runs. QEMU (system
  mode) never retransmits, and a `$` clears its pending reply just as a `+` does, so a late ack is safe.
- Requests can be pipelined: QEMU answers in order, so `g` and `s` can go in one write. Nothing may follow a
  resume command in the same write, since those bytes would arrive while the guest runs.
- A stop reply may arrive unasked (QEMU sends `T02` when a debugger connects to a running guest); one that
  arrives while we wait for another reply is kept in `pending_stops`.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import trio

from .errors import ConnectionClosed, RemoteError, TargetTimeout
from .framing import (
    INTERRUPT,
    NACK,
    NEED_DATA,
    BadChecksum,
    Framer,
    Nack,
    Notification,
    Packet,
    encode_packet,
)
from .packets import raise_for_error
from .stop import ConsoleOutput, StopEvent, is_stop_payload, parse_stop_reply

__all__ = ["RSPClient", "open_stream", "parse_target", "send_now"]

MAX_MEMORY_READ = 2048
"""QEMU refuses `m` reads over 2048 bytes with E22; larger reads are split."""


def send_now(stream: trio.abc.Stream, data: bytes) -> int:
    """Write what the socket takes of `data` right now, without yielding to the scheduler.

    Packets are small and the socket's buffer is nearly always free, so this is the whole send in one
    system call, with none of the scheduling round trips of an awaited `send_all` (a probe hit makes
    several sends). Returns how many bytes went out (0 when the socket would block or is not a socket).

    Raises:
        OSError: the peer is gone.
    """
    sock = getattr(stream, "socket", None)
    if sock is None:
        return 0
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0


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
        running: True between a resume command and the stop reply that ends it.
        pending_stops: stop replies that arrived when none was expected (e.g. on connect).
        console: text of `O` packets received outside a monitor command.
        retransmits: how many times we sent a packet again on the peer's `-`.
    """

    def __init__(self, stream: trio.abc.Stream, *, timeout: float = 10.0):
        self._stream = stream
        self._framer = Framer()
        self._timeout = timeout
        self._ack_owed = False
        self._last_sent = b""
        self._send_lock = trio.Lock()
        self._interrupting = False
        self._closed = False
        self._monitor_output: list[bytes] | None = None
        self.running = False
        self.pending_stops: deque[StopEvent] = deque()
        self.console: list[bytes] = []
        self.retransmits = 0
        self._bounded = 0
        self.deferred: deque[bytes] = deque()  # requests whose replies `wait_stop` will take
        self._outstanding: deque[bytes] = deque()  # sent with `begin`, replies not taken yet
        self._held: list[bytes] = []  # frames of `post`, sent in front of the next write
        self.poll_until = 0.0  # trio time until which receiving polls instead of sleeping (`_poll_receive`)
        self.deferred_errors: list[tuple[bytes, bytes]] = []

    @classmethod
    async def connect(cls, target: str, *, timeout: float = 10.0) -> RSPClient:
        """Connect to `tcp:HOST:PORT` or `unix:PATH`."""
        return cls(await open_stream(target), timeout=timeout)

    # -- sending ---------------------------------------------------------------------------------------

    async def _send(self, frames: bytes) -> None:
        if self._closed:
            raise ConnectionClosed("connection is closed")
        if self._held:
            frames = b"".join(self._held) + frames
            self._held.clear()
        if self._ack_owed:
            frames = b"+" + frames
            self._ack_owed = False
        if not self._send_lock.locked():
            try:
                sent = send_now(self._stream, frames)
            except OSError as exc:
                self._closed = True
                raise ConnectionClosed(f"connection lost while sending: {exc!r}") from exc
            if sent == len(frames):
                return
            frames = frames[sent:]
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                await self._write_all(frames)

    async def _write_all(self, data: bytes) -> None:
        """Send all of `data`; the caller holds the send lock inside a shielded scope.

        A send is never cut short by cancellation: half a packet, or a `c` that the target never got
        while we believe it runs, would leave the two sides disagreeing about the target's state.
        """
        try:
            with trio.fail_after(self._timeout):
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
            self._closed = True
            raise ConnectionClosed(f"connection lost while sending: {exc!r}") from exc

    # -- receiving -------------------------------------------------------------------------------------

    async def _receive_packet(self) -> bytes:
        """The payload of the next good packet; handles acks, nacks and bad checksums."""
        framer = self._framer
        while True:
            event = framer.next_event()
            if type(event) is Packet:
                self._ack_owed = True
                return event.payload
            if type(event) is BadChecksum:
                # Ask again at once: the peer is stopped, since it just sent us something.
                await self._send(NACK)
                continue
            if type(event) is Nack:
                if self._last_sent:
                    self.retransmits += 1
                    await self._send(self._last_sent)
                continue
            if type(event) is Notification:
                continue
            if event is not NEED_DATA:
                continue  # an ack of ours, or a stray interrupt byte: nothing to do
            try:
                if self.poll_until and trio.current_time() < self.poll_until:
                    data = await self._poll_receive()
                else:
                    data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._closed = True
                raise ConnectionClosed(f"connection lost: {exc}") from exc
            if not data:
                self._closed = True
                raise ConnectionClosed("the target closed the connection")
            framer.receive_data(data)

    async def _poll_receive(self) -> bytes:
        """What the peer sent, polling the socket between scheduler passes until `poll_until`, then
        waiting as usual: a reply or stop expected within microseconds is seen without the wake-up from
        epoll, which costs about as long as the exchange itself on small VMs."""
        fd = self._stream.socket.fileno()
        while trio.current_time() < self.poll_until:
            try:
                return os.read(fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.checkpoint()
        return await self._stream.receive_some(65536)

    async def _receive_reply(self, request: bytes) -> bytes:
        """The reply to `request`, keeping unasked stop replies and console output aside."""
        expects_stop = request == b"?"
        while True:
            payload = await self._receive_packet()
            if self.deferred and not is_stop_payload(payload):
                self._take_deferred(payload)
                continue
            if not expects_stop and payload[:1] in b"STWXO" and is_stop_payload(payload):
                event = parse_stop_reply(payload)
                if isinstance(event, ConsoleOutput):
                    (self._monitor_output if self._monitor_output is not None else self.console).append(
                        event.text
                    )
                else:
                    self.pending_stops.append(event)
                continue
            return payload

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
            The reply payloads, one per request, in order.
        """
        if self.running:
            raise RuntimeError("cannot send requests while the target runs")
        if self._outstanding:
            raise RuntimeError("replies to earlier requests (`begin`) are still to be taken")
        frames = b"".join(encode_packet(p) for p in payloads)
        if resume is not None:
            frames += encode_packet(resume)
            self.pending_stops.clear()
            self._interrupting = False
        self._last_sent = frames
        replies: list[bytes] = []
        if defer and resume is not None:
            await self._send(frames)
            self.running = True
            self.deferred.extend(payloads)
            return replies
        if self._bounded and timeout is None:
            await self._exchange(frames, payloads, resume, replies)
            return replies
        with trio.move_on_at(self._deadline(timeout)):
            await self._exchange(frames, payloads, resume, replies)
            return replies
        raise TargetTimeout(f"no reply to {payloads[len(replies)][:40]!r} within the time allowed")

    async def begin(self, payloads: Sequence[bytes]) -> None:
        """Send requests in one write and take their replies later, in order, with `next_reply`
        (to act on the first reply while the others are still on their way)."""
        if self.running:
            raise RuntimeError("cannot send requests while the target runs")
        frames = b"".join(encode_packet(p) for p in payloads)
        self._last_sent = frames
        await self._send(frames)
        self._outstanding.extend(payloads)

    async def next_reply(self, *, timeout: float | None = None) -> bytes:
        """The reply to the oldest request sent with `begin`.

        Raises:
            TargetTimeout: no reply in time.
        """
        request = self._outstanding.popleft()
        if self._bounded and timeout is None:
            return await self._receive_reply(request)
        with trio.move_on_at(self._deadline(timeout)):
            return await self._receive_reply(request)
        self._outstanding.clear()
        raise TargetTimeout(f"no reply to {request[:40]!r} within the time allowed")

    async def post(self, payloads: Sequence[bytes]) -> None:
        """Requests whose replies must be `OK`, sent with the next write (write-behind).

        They go out in front of whatever is sent next (a request, a resume, a detach), so the stub
        handles them before anything later, and no write or wake-up of the stub is spent on them now. Their
        replies are taken on the way to the next reply or stop reply read; any that is not `OK` lands in
        `deferred_errors`.
        """
        if self.running:
            raise RuntimeError("cannot send requests while the target runs")
        self._held.append(b"".join(encode_packet(p) for p in payloads))
        self.deferred.extend(payloads)

    async def _exchange(
        self, frames: bytes, payloads: Sequence[bytes], resume: bytes | None, replies: list[bytes]
    ) -> None:
        await self._send(frames)
        if resume is not None:
            self.running = True
        for p in payloads:
            replies.append(await self._receive_reply(p))

    @contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """One time limit for a whole exchange of several requests (cheaper than one scope each).

        Raises:
            TargetTimeout: the exchange did not finish in time.
        """
        with trio.move_on_after(seconds) as scope:
            self._bounded += 1
            try:
                yield
            finally:
                self._bounded -= 1
        if scope.cancelled_caught:
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
        if self.running:
            raise RuntimeError("the target already runs")
        frame = encode_packet(payload)
        self._last_sent = frame
        # A stop that came unasked before this resume describes a stop that is over now.
        self.pending_stops.clear()
        self.running = True
        self._interrupting = False
        await self._send(frame)

    async def wait_stop(self, *, timeout: float | None = math.inf) -> StopEvent:
        """Wait for the stop reply that ends a resume (or return one that came unasked).

        Console output (`O`) while running goes to `console`.

        Raises:
            TargetTimeout: no stop within `timeout` (the target is still running).
        """
        if self.pending_stops:
            self.running = False
            self._interrupting = False
            return self.pending_stops.popleft()
        if timeout == math.inf or (self._bounded and timeout is None):
            return await self._next_stop()
        with trio.move_on_at(self._deadline(timeout)):
            return await self._next_stop()
        raise TargetTimeout("the target did not stop within the time allowed")

    async def _next_stop(self) -> StopEvent:
        while True:
            payload = await self._receive_packet()
            event = parse_stop_reply(payload) if is_stop_payload(payload) else None
            if isinstance(event, ConsoleOutput):
                self.console.append(event.text)
                continue
            if event is None:
                if self.deferred:
                    self._take_deferred(payload)
                # Else a stray reply (say, to a request that timed out): not ours to wait for.
                continue
            self.running = False
            self._interrupting = False
            return event

    def _take_deferred(self, payload: bytes) -> None:
        request = self.deferred.popleft()
        if payload != b"OK":
            self.deferred_errors.append((request, payload))

    async def interrupt(self) -> None:
        """Ask a running target to stop (0x03). The stop arrives through `wait_stop`.

        Safe to call from another task while one waits in `wait_stop`; does nothing when the target is
        stopped or an interrupt is already on its way.
        """
        if not self.running or self._interrupting:
            return
        with trio.CancelScope(shield=True):  # as in `_send`: all of it, or nothing
            async with self._send_lock:
                # Re-check under the lock: the stop may have arrived while we waited for it.
                if not self.running or self._interrupting or self._closed:
                    return
                self._interrupting = True
                await self._write_all(INTERRUPT)

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
            b"m%x,%x" % (a, min(MAX_MEMORY_READ, address + length - a))
            for a in range(address, address + length, MAX_MEMORY_READ)
        ]
        replies = await self.pipeline(reqs)
        out = bytearray()
        for req, reply in zip(reqs, replies, strict=True):
            raise_for_reply(req, reply)
            out += bytes.fromhex(reply.decode("ascii"))
        return bytes(out)

    async def write_memory(self, address: int, data: bytes) -> None:
        """Write guest memory with `M` (QEMU has no `X`)."""
        for off in range(0, len(data), MAX_MEMORY_READ):
            chunk = data[off : off + MAX_MEMORY_READ]
            await self.checked(b"M%x,%x:%s" % (address + off, len(chunk), chunk.hex().encode()))

    async def read_xfer(self, obj: str, annex: str, *, chunk: int = 0xF00) -> bytes:
        """Read a whole `qXfer:OBJECT:read:ANNEX` object in chunks (`m` more, `l` last)."""
        out = bytearray()
        while True:
            req = b"qXfer:%s:read:%s:%x,%x" % (obj.encode(), annex.encode(), len(out), chunk)
            reply = await self.checked(req)
            out += reply[1:]
            if reply[:1] == b"l":
                return bytes(out)
            if reply[:1] != b"m":
                raise RemoteError(None, f"bad qXfer reply {reply[:20]!r}", req)

    async def monitor(self, command: str) -> str:
        """Run a monitor command (`qRcmd`) and return its output text."""
        self._monitor_output = []
        try:
            req = b"qRcmd," + command.encode().hex().encode()
            await self.checked(req)
            return b"".join(self._monitor_output).decode(errors="replace")
        finally:
            self._monitor_output = None

    async def aclose(self) -> None:
        """Close the stream (does not detach: call `D` first if that is wanted)."""
        self._closed = True
        await self._stream.aclose()


def raise_for_reply(request: bytes, reply: bytes) -> None:
    """Raise the typed error an error or empty reply stands for (the rule of `rsp.packets`).

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply (`E NN` as the whole reply, or `E.text`).
    """
    raise_for_error(reply, request)
