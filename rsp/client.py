"""The client side of RSP as a state machine, sans-IO (h11's `Connection` is the model).

`ClientProtocol` is fed the stub's bytes (`receive_data`) and hands out typed events (`next_event`); the
methods that send (`send_requests`, `send_resume`, `send_interrupt`, `post`) return the bytes to write and
update the state. Nothing here opens a socket, awaits or reads a clock: `rsp.connection.RSPClient` is the
trio pump around it, and tests feed it bytes directly.

What it owns, the way QEMU 7.2's gdbstub needs it:

- Acks. QEMU answers `QStartNoAckMode` with the empty reply, so acks stay on. Every packet received is
  acknowledged, lazily: the `+` travels in front of the next bytes written. While the guest runs, any byte
  but 0x03 pauses it, so an ack must never go out alone or behind a resume. QEMU (system mode) never
  retransmits, and a `$` clears its pending reply just as a `+` does, so a late ack is safe.
- Resends. Every packet written waits for the peer's `+` or `-` (in order); on `-` the oldest one not yet
  acknowledged is written again (`Resend`), and its reply is expected after those of the packets written
  behind it, which the peer has handled by then. A packet of the peer's with a bad checksum gets `-`.
- Replies in order. Requests can be pipelined: the stub answers in order, so each reply goes to the oldest
  request still waiting for one (`Reply`). Nothing may follow a resume in the same write.
- Write-behind. `post` holds frames whose replies must be `OK`; they go out in front of the next write, and
  their replies are checked on the way (`DeferredReply`; the refused ones land in `deferred_errors`).
- Stop replies. The one that ends a resume is `Stopped(queued=False)`; one that comes while the target is
  not running (QEMU sends `T02` when a debugger connects to a running guest), or while replies are still
  awaited, is kept in `pending_stops` (`Stopped(queued=True)`). `O` packets are `Output` (during a `qRcmd`, `Output.monitor` is True).

Illegal moves of ours raise `LocalProtocolError`; a peer that breaks the protocol gives events (`Stray`,
`Closed`) or, where nothing sensible is left to do, `RemoteProtocolError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import LocalProtocolError
from .framing import (
    INTERRUPT,
    NACK,
    NEED_DATA,
    Ack,
    BadChecksum,
    Framer,
    Nack,
    Packet,
    encode_packet,
)
from .stop import ConsoleOutput, StopEvent, is_stop_payload, parse_stop_reply_cached

__all__ = [
    "ClientProtocol",
    "Closed",
    "DeferredReply",
    "Output",
    "Reply",
    "Resend",
    "Stopped",
    "Stray",
]

# -- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """The reply to `request`, sent with `send_requests` (error replies are replies too)."""

    request: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class DeferredReply:
    """The reply to a request sent with `post` or `send_requests(check=True)`; `ok` when it was `OK`."""

    request: bytes
    payload: bytes
    ok: bool


@dataclass(frozen=True, slots=True)
class Stopped:
    """A stop reply. `queued` when it was kept in `pending_stops` (it came while the target was not
    running, or while replies were still awaited); else it ended the resume and `running` is False."""

    event: StopEvent
    queued: bool


@dataclass(frozen=True, slots=True)
class Output:
    """Console text (`O` packet); `monitor` when it is the output of a `qRcmd` being answered."""

    text: bytes
    monitor: bool


@dataclass(frozen=True, slots=True)
class Resend:
    """Bytes the protocol needs written now: a packet again on the peer's `-` (`garbled` is None), or our
    `-` for a packet of the peer's with a bad checksum or encoding (`garbled` is its raw text)."""

    data: bytes
    garbled: bytes | None = None


@dataclass(frozen=True, slots=True)
class Stray:
    """A reply nobody waits for (to a request given up on, or a peer's mistake); it is dropped."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the connection; `unfinished` bytes of a packet were left (0: a clean close)."""

    unfinished: int


Event = Reply | DeferredReply | Stopped | Output | Resend | Stray | Closed

# What an expected reply is for.
_REPLY = 0  # a `Reply` event
_CHECK = 1  # a `DeferredReply` event; not OK -> deferred_errors
_ABANDONED = 2  # given up on: a `Stray` event


_MAX_UNACKED = 256


class _Expected:
    __slots__ = ("kind", "request")

    def __init__(self, request: bytes, kind: int):
        self.request = request
        self.kind = kind


class ClientProtocol:
    """The client's half of one RSP connection (see the module docstring).

    Attributes:
        running: True between a resume and the stop reply that ends it.
        pending_stops: stop replies that came while the target was not running.
        deferred_errors: (request, reply) of write-behind requests not answered `OK`.
        retransmits: packets written again on the peer's `-`.
        closed: the peer closed the connection, or `close` was called.
    """

    def __init__(self, *, max_packet: int | None = None) -> None:
        self._framer = Framer() if max_packet is None else Framer(max_packet=max_packet)
        self._ack_owed = False
        self._held: list[bytes] = []  # frames of `post`, written in front of the next write
        self._held_memory = False  # some of them write memory
        # Written, no `+`/`-` yet. Bounded: a peer that stopped acknowledging (no-ack mode) must not make it
        # grow for ever; a `-` is about one of the last packets written, never one of thousands ago.
        self._unacked: deque[tuple[bytes, _Expected | None]] = deque(maxlen=_MAX_UNACKED)
        self._expected: deque[_Expected] = deque()  # replies still to come, oldest first
        self._interrupting = False
        self._eof = False
        self.running = False
        self.pending_stops: deque[StopEvent] = deque()
        self.deferred_errors: list[tuple[bytes, bytes]] = []
        self.retransmits = 0
        self.closed = False

    # -- state ---------------------------------------------------------------------------------------

    @property
    def awaiting(self) -> int:
        """Replies still to come (abandoned ones included)."""
        return len(self._expected)

    @property
    def garbage(self) -> int:
        """Bytes from the peer that were part of no packet."""
        return self._framer.garbage

    # -- sending -------------------------------------------------------------------------------------

    def _check_can_send(self) -> None:
        if self.closed:
            raise LocalProtocolError("the connection is closed")
        if self.running:
            raise LocalProtocolError("cannot send requests while the target runs (only an interrupt)")

    def _frames(self, payloads: Sequence[bytes], kind: int) -> bytes:
        unacked = self._unacked
        expected = self._expected
        out = []
        for p in payloads:
            frame = encode_packet(p)
            exp = _Expected(p, kind)
            expected.append(exp)
            unacked.append((frame, exp))
            out.append(frame)
        return b"".join(out)

    def _write(self, frames: bytes) -> bytes:
        """`frames` with what must go in front of them: the ack we owe, then the held write-behind."""
        if self._held:
            frames = b"".join(self._held) + frames
            self._held.clear()
            self._held_memory = False
        if self._ack_owed:
            self._ack_owed = False
            return b"+" + frames
        return frames

    def send_requests(
        self, payloads: Sequence[bytes], resume: bytes | None = None, *, check: bool = False
    ) -> bytes:
        """Requests (and optionally one resume last) to write in one go; their replies come as events.

        With `check`, the replies are `DeferredReply` events (not `OK` -> `deferred_errors`).

        Returns:
            The bytes to write.

        Raises:
            LocalProtocolError: the target runs, or the connection is closed.
        """
        self._check_can_send()
        frames = self._frames(payloads, _CHECK if check else _REPLY)
        if resume is not None:
            frames += self._resume_frame(resume)
        return self._write(frames)

    def send_resume(self, payload: bytes) -> bytes:
        """A resume command (`c`, `s`, `vCont;...`); the stop that ends it is a `Stopped` event.

        Raises:
            LocalProtocolError: the target runs already, or the connection is closed.
        """
        self._check_can_send()
        return self._write(self._resume_frame(payload))

    def _resume_frame(self, payload: bytes) -> bytes:
        frame = encode_packet(payload)
        self._unacked.append((frame, None))
        # A stop that came unasked before this resume describes a stop that is over now.
        self.pending_stops.clear()
        self.running = True
        self._interrupting = False
        return frame

    @property
    def holds_memory_writes(self) -> bool:
        """Whether memory writes (`M`, `X`) of `post` wait to go out with the next write: until then the
        target's memory does not have them."""
        return self._held_memory

    def post(self, payloads: Sequence[bytes]) -> None:
        """Hold requests whose replies must be `OK`: they go out in front of the next write.

        Raises:
            LocalProtocolError: the target runs, or the connection is closed.
        """
        self._check_can_send()
        self._held.append(self._frames(payloads, _CHECK))
        self._held_memory = self._held_memory or any(p[:1] in (b"M", b"X") for p in payloads)

    def send_interrupt(self) -> bytes:
        """The bytes that ask a running target to stop (0x03 alone: never an ack with it), or b"" when
        the target is not running or an interrupt is on its way already."""
        if not self.running or self._interrupting or self.closed:
            return b""
        self._interrupting = True
        return INTERRUPT

    def abandon(self) -> None:
        """Give up on every reply still to come (the caller timed out): they will come as `Stray`."""
        for exp in self._expected:
            exp.kind = _ABANDONED

    def take_pending_stop(self) -> StopEvent | None:
        """The oldest stop that came unasked (the target is stopped then), or None."""
        if not self.pending_stops:
            return None
        self.running = False
        self._interrupting = False
        return self.pending_stops.popleft()

    def close(self) -> None:
        """Mark the connection closed by us: sending is refused from now on."""
        self.closed = True

    # -- receiving -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means it closed the connection."""
        if data:
            self._framer.receive_data(data)
        else:
            self._eof = True

    def next_event(self) -> Event | object:
        """The next event, or NEED_DATA when more bytes are needed.

        Raises:
            RemoteProtocolError: a stop reply that does not parse.
        """
        framer = self._framer
        while True:
            event = framer.next_event()
            kind = type(event)
            if kind is Packet:
                self._ack_owed = True
                return self._packet(event.payload)
            if event is NEED_DATA:
                if self._eof:
                    self.closed = True
                    return Closed(framer.buffered)
                return NEED_DATA
            if kind is Ack:
                if self._unacked:
                    self._unacked.popleft()
                continue
            if kind is Nack:
                resend = self._on_nack()
                if resend is not None:
                    return resend
                continue
            if kind is BadChecksum:
                # Ask again at once: the peer is stopped, since it just sent us something.
                if self._eof:
                    continue  # nobody left to ask
                return Resend(self._write(NACK), event.raw)
            # A notification or a stray interrupt byte: nothing for a client to do.

    def _on_nack(self) -> Resend | None:
        if not self._unacked:
            return None  # a `-` for nothing of ours: ignore it
        frame, exp = self._unacked.popleft()
        self._unacked.append((frame, exp))
        if exp is not None and exp in self._expected:
            # The peer handled what we wrote behind this packet already: its reply now comes last.
            self._expected.remove(exp)
            self._expected.append(exp)
        self.retransmits += 1
        return Resend(self._write(frame))

    def _packet(self, payload: bytes) -> Event:
        expected = self._expected
        head = expected[0] if expected else None
        if payload[:1] in b"STWXO" and is_stop_payload(payload) and (head is None or head.request != b"?"):
            stop = parse_stop_reply_cached(payload)
            if type(stop) is ConsoleOutput:
                return Output(stop.text, head is not None and head.request.startswith(b"qRcmd,"))
            if self.running and head is None:
                self.running = False
                self._interrupting = False
                return Stopped(stop, False)
            self.pending_stops.append(stop)  # `take_pending_stop` hands it out (and ends the run)
            return Stopped(stop, True)
        if head is None:
            return Stray(payload)
        expected.popleft()
        if head.kind == _REPLY:
            return Reply(head.request, payload)
        if head.kind == _CHECK:
            ok = payload == b"OK"
            if not ok:
                self.deferred_errors.append((head.request, payload))
            return DeferredReply(head.request, payload, ok)
        return Stray(payload)
