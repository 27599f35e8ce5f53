"""What a debugger sends to a stub, parsed into typed commands (sans-IO, the server side of `rsp`).

One small parser per packet, registered in one table grouped by feature; everything else is `Unknown`, and
a known packet that does not parse is `Malformed` (never an exception). Every command can `encode()` back
to its payload, so a proxy can forward what it parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import RSPError
from .stop import ThreadId, parse_thread_id

__all__ = [
    "Command",
    "Continue",
    "Detach",
    "HaltReason",
    "InsertBreakpoint",
    "Kill",
    "Malformed",
    "Monitor",
    "ReadMemory",
    "RemoveBreakpoint",
    "SetThread",
    "StartNoAck",
    "Step",
    "Unknown",
    "VCont",
    "VContAction",
    "WriteMemory",
    "parse_command",
]


class Command:
    """Base of every parsed command."""

    payload: bytes

    def encode(self) -> bytes:
        return self.payload


@dataclass(frozen=True)
class Unknown(Command):
    payload: bytes


@dataclass(frozen=True)
class Malformed(Command):
    payload: bytes
    reason: str


@dataclass(frozen=True)
class HaltReason(Command):
    payload: bytes = b"?"


@dataclass(frozen=True)
class ReadMemory(Command):
    payload: bytes
    address: int
    length: int


@dataclass(frozen=True)
class WriteMemory(Command):
    payload: bytes
    address: int
    data: bytes


@dataclass(frozen=True)
class InsertBreakpoint(Command):
    payload: bytes
    type: int
    address: int
    kind: int


@dataclass(frozen=True)
class RemoveBreakpoint(Command):
    payload: bytes
    type: int
    address: int
    kind: int


@dataclass(frozen=True)
class Continue(Command):
    payload: bytes
    address: int | None = None
    signal: int | None = None


@dataclass(frozen=True)
class Step(Command):
    payload: bytes
    address: int | None = None
    signal: int | None = None


@dataclass(frozen=True)
class VContAction:
    action: str  # c C s S t r
    thread: ThreadId | None


@dataclass(frozen=True)
class VCont(Command):
    payload: bytes
    actions: tuple[VContAction, ...]

    def stepped_thread(self) -> ThreadId | None:
        """The thread a step action names (-1/None: the current one), if any action steps."""
        for a in self.actions:
            if a.action in "sS":
                return a.thread if a.thread is None or a.thread.tid > 0 else None
        return None

    @property
    def steps(self) -> bool:
        return any(a.action in "sS" for a in self.actions)


@dataclass(frozen=True)
class SetThread(Command):
    payload: bytes
    op: str  # "g" or "c"
    thread: ThreadId


@dataclass(frozen=True)
class Detach(Command):
    payload: bytes


@dataclass(frozen=True)
class Kill(Command):
    payload: bytes


@dataclass(frozen=True)
class StartNoAck(Command):
    payload: bytes = b"QStartNoAckMode"


@dataclass(frozen=True)
class Monitor(Command):
    payload: bytes
    command: str


@dataclass(frozen=True)
class Query(Command):
    """`qName[:args]` and `QName[:args]` that have no parser of their own."""

    payload: bytes
    name: str


def _hex(text: bytes) -> int:
    return int(text, 16)


def _memory_read(p: bytes) -> Command:
    addr, length = p[1:].split(b",")
    return ReadMemory(p, _hex(addr), _hex(length))


def _memory_write(p: bytes) -> Command:
    head, _, data = p[1:].partition(b":")
    addr, length = head.split(b",")
    raw = bytes.fromhex(data.decode())
    if len(raw) != _hex(length):
        return Malformed(p, "length does not match the data")
    return WriteMemory(p, _hex(addr), raw)


def _breakpoint(p: bytes) -> Command:
    fields = p[1:].split(b";")[0].split(b",")
    ztype, addr, kind = int(fields[0]), _hex(fields[1]), _hex(fields[2])
    if not 0 <= ztype <= 4:
        return Malformed(p, "breakpoint type must be 0..4")
    cls = InsertBreakpoint if p[:1] == b"Z" else RemoveBreakpoint
    return cls(p, ztype, addr, kind)


def _resume(p: bytes) -> Command:
    kind, rest = p[:1], p[1:]
    signal = addr = None
    if kind in (b"C", b"S"):
        sig, _, a = rest.partition(b";")
        signal, addr = _hex(sig), (_hex(a) if a else None)
    elif rest:
        addr = _hex(rest)
    return (Continue if kind in (b"c", b"C") else Step)(p, addr, signal)


def _vcont(p: bytes) -> Command:
    if p == b"vCont?":
        return Query(p, "vCont?")
    actions = []
    for item in p[len(b"vCont;") :].split(b";"):
        if not item:
            continue
        act, _, thread = item.partition(b":")
        action = act[:1].decode()
        if action not in "cCsStr":
            return Malformed(p, f"unknown vCont action {action!r}")
        actions.append(VContAction(action, parse_thread_id(thread) if thread else None))
    return VCont(p, tuple(actions))


def _set_thread(p: bytes) -> Command:
    op = p[1:2].decode()
    if op not in "gc" or len(p) < 3:
        return Malformed(p, "H needs g or c and a thread")
    return SetThread(p, op, parse_thread_id(p[2:]))


def _monitor(p: bytes) -> Command:
    return Monitor(p, bytes.fromhex(p[len(b"qRcmd,") :].decode()).decode(errors="replace"))


def _query(p: bytes) -> Command:
    name = p[1:].split(b":")[0].split(b",")[0].split(b";")[0].decode(errors="replace")
    return Query(p, p[:1].decode() + name)


# One table, grouped by feature: (prefix, parser). Longer prefixes first where they overlap.
_TABLE: list[tuple[bytes, Callable[[bytes], Command]]] = [
    # base
    (b"?", lambda p: HaltReason(p)),
    (b"m", _memory_read),
    (b"M", _memory_write),
    # breakpoints
    (b"Z", _breakpoint),
    (b"z", _breakpoint),
    # resume
    (b"vCont", _vcont),
    (b"c", _resume),
    (b"C", _resume),
    (b"s", _resume),
    (b"S", _resume),
    # threads
    (b"H", _set_thread),
    # session
    (b"D", lambda p: Detach(p)),
    (b"k", lambda p: Kill(p)),
    (b"vKill", lambda p: Kill(p)),
    (b"QStartNoAckMode", lambda p: StartNoAck(p)),
    # queries
    (b"qRcmd,", _monitor),
    (b"q", _query),
    (b"Q", _query),
]


def parse_command(payload: bytes) -> Command:
    """The typed command for a packet payload (`Unknown` or `Malformed` rather than an exception)."""
    for prefix, parser in _TABLE:
        if payload.startswith(prefix):
            try:
                return parser(payload)
            except (ValueError, IndexError, UnicodeDecodeError, RSPError) as exc:
                return Malformed(payload, str(exc) or type(exc).__name__)
    return Unknown(payload)
