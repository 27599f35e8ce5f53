"""Stop replies (`S`, `T`, `W`, `X`, `O`) and thread ids, sans-IO.

From the GDB manual, "Stop Reply Packets":
- `S AA`: signal AA.
- `T AA n1:r1;n2:r2;...`: signal AA, then pairs. A hex number `n` is an expedited register; `thread`,
  `core`, `watch`/`rwatch`/`awatch` (with an address), `swbreak`, `hwbreak`, `library`, `exec`... are
  stop reasons or facts. Unknown names are ignored, as GDB does.
- `W AA[;process:pid]`: the process exited with status AA; `X AA[;process:pid]`: it was killed by signal AA.
- `O XX...`: console output in hex (only while the target runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .errors import RemoteProtocolError
from .framing import is_hex

__all__ = [
    "ConsoleOutput",
    "Exited",
    "StopReply",
    "Terminated",
    "ThreadId",
    "WATCH_KINDS",
    "encode_stop_reply",
    "parse_stop_reply",
    "parse_stop_reply_cached",
    "parse_thread_id",
]

SIGINT = 2
SIGTRAP = 5

WATCH_KINDS = {"watch": "write", "rwatch": "read", "awatch": "access"}
"""Stop-reply watch reasons and the access each one means."""


@dataclass(frozen=True, slots=True)
class ThreadId:
    """A thread id: `tid` alone, or `pPID.TID` in the multiprocess form. -1 means all, 0 any."""

    tid: int
    pid: int | None = None

    def encode(self) -> bytes:
        """The wire form (`01`, `-1`, `p1.2`)."""
        t = b"-1" if self.tid == -1 else b"%x" % self.tid
        if self.pid is None:
            return t if self.tid == -1 else b"%02x" % self.tid
        p = b"-1" if self.pid == -1 else b"%x" % self.pid
        return b"p" + p + b"." + t


def _hex_id(text: bytes) -> int:
    return -1 if text == b"-1" else int(text, 16)


def parse_thread_id(text: bytes) -> ThreadId:
    """Parse `TID`, `-1`, `pPID`, or `pPID.TID`.

    Raises:
        RemoteProtocolError: not a thread id.
    """
    try:
        if text.startswith(b"p"):
            pid, _, tid = text[1:].partition(b".")
            return ThreadId(tid=_hex_id(tid) if tid else -1, pid=_hex_id(pid))
        return ThreadId(tid=_hex_id(text))
    except ValueError:
        raise RemoteProtocolError(f"bad thread id {text!r}") from None


@dataclass(frozen=True, slots=True)
class StopReply:
    """The target stopped (`S` or `T`).

    Attributes:
        signal: the signal number (5 for a breakpoint or step, 2 for an interrupt).
        thread: the thread that stopped, when the reply names one.
        core: the core it stopped on, when named.
        reason: `watch`, `rwatch`, `awatch`, `swbreak`, `hwbreak` or another named reason, else None.
        watch_address: the data address of a watchpoint stop.
        registers: expedited registers, by register number, as raw hex bytes (target byte order).
    """

    signal: int
    thread: ThreadId | None = None
    core: int | None = None
    reason: str | None = None
    watch_address: int | None = None
    registers: dict[int, bytes] = field(default_factory=dict)

    @property
    def is_watch(self) -> bool:
        """Whether a watchpoint caused this stop."""
        return self.reason in WATCH_KINDS


@dataclass(frozen=True, slots=True)
class Exited:
    """`W`: the process (for QEMU: the machine) exited with `status`."""

    status: int
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class Terminated:
    """`X`: the process was terminated by `signal`."""

    signal: int
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class ConsoleOutput:
    """`O`: text the target wants the debugger's console to show."""

    text: bytes


StopEvent = StopReply | Exited | Terminated | ConsoleOutput


def is_stop_payload(payload: bytes) -> bool:
    """Whether a reply payload has the shape of a stop reply or console output."""
    if len(payload) < 3:
        return False
    kind = payload[0]
    if kind in b"STWX":
        return is_hex(payload[1:3])
    return kind == 0x4F and payload != b"OK" and is_hex(payload[1:])


def parse_stop_reply(payload: bytes) -> StopEvent:
    """Parse a stop reply or `O` packet.

    Raises:
        RemoteProtocolError: the payload is not a stop reply.
    """
    try:
        kind = payload[:1]
        if kind == b"O" and payload != b"OK":
            return ConsoleOutput(bytes.fromhex(payload[1:].decode("ascii")))
        if kind == b"S":
            return StopReply(signal=int(payload[1:3], 16))
        if kind == b"T":
            return _parse_t(payload)
        if kind in (b"W", b"X"):
            value = int(payload[1:3], 16)
            pid = None
            rest = payload[3:]
            if rest.startswith(b";process:"):
                pid = int(rest[len(b";process:") :], 16)
            return Exited(value, pid) if kind == b"W" else Terminated(value, pid)
    except (ValueError, UnicodeDecodeError):
        pass
    raise RemoteProtocolError(f"bad stop reply {payload[:60]!r}")


def _parse_t(payload: bytes) -> StopReply:
    signal = int(payload[1:3], 16)
    thread = core = watch_address = None
    reason = None
    registers: dict[int, bytes] = {}
    for item in payload[3:].split(b";"):
        if not item:
            continue
        name, _, value = item.partition(b":")
        if name == b"thread":
            thread = parse_thread_id(value)
        elif name == b"core":
            core = int(value, 16)
        elif name in (b"watch", b"rwatch", b"awatch"):
            reason = name.decode()
            watch_address = int(value, 16)
        elif name in (b"swbreak", b"hwbreak", b"library", b"replaylog", b"exec", b"fork", b"vfork", b"create"):
            reason = name.decode()
        elif is_hex(name):
            registers[int(name, 16)] = value
        # Other names are ignored, as the manual asks of a debugger.
    return StopReply(signal, thread, core, reason, watch_address, registers)


def encode_stop_reply(event: StopEvent) -> bytes:
    """The wire payload of a stop event (what a stub sends to GDB)."""
    if isinstance(event, StopReply):
        parts = [b"T%02x" % event.signal]
        for regnum, value in sorted(event.registers.items()):
            parts.append(b"%02x:%s;" % (regnum, value))
        if event.thread is not None:
            parts.append(b"thread:" + event.thread.encode() + b";")
        if event.core is not None:
            parts.append(b"core:%x;" % event.core)
        if event.reason in WATCH_KINDS and event.watch_address is not None:
            parts.append(b"%s:%x;" % (event.reason.encode(), event.watch_address))
        elif event.reason is not None and event.reason not in WATCH_KINDS:
            parts.append(event.reason.encode() + b":;")
        return b"".join(parts)
    if isinstance(event, Exited):
        return b"W%02x" % event.status + (b";process:%x" % event.pid if event.pid is not None else b"")
    if isinstance(event, Terminated):
        return b"X%02x" % event.signal + (b";process:%x" % event.pid if event.pid is not None else b"")
    return b"O" + event.text.hex().encode()


@lru_cache(maxsize=256)
def _parsed(payload: bytes) -> StopEvent:
    return parse_stop_reply(payload)


def parse_stop_reply_cached(payload: bytes) -> StopEvent:
    """`parse_stop_reply`, remembered: a probe's stops repeat the same few replies, and the events are
    immutable (their `registers` are not to be changed)."""
    return _parsed(bytes(payload))
