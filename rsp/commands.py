"""What a debugger sends to a stub, parsed into typed commands (sans-IO, the server side of `rsp`).

`parse_command(payload)` looks the packet's name up in one table, grouped by feature, of small parsers.
A packet nobody registered is `Unknown`; a `q`/`Q` query without a parser of its own is a generic `Query`;
a known packet that does not parse is `Malformed`. None of them raises. Every command can `encode()` itself
back into a payload, so a proxy can forward what it parsed: `parse_command(c.encode()) == c` always, and
`parse_command(p).encode() == p` for a payload in the canonical spelling (lower-case hex without leading
zeros, thread ids as `ThreadId.encode` writes them; GDB's `Hg1` comes back as the equivalent `Hg01`).

A packet's name (GDB manual, "Packets"): the first byte for the one-letter packets; for `q`/`Q` packets
everything up to the first `:`, `,` or `;`; for `v` packets everything up to the first `;` or `:`.

Below the commands are the replies a stub sends back (`ok`, `error`, `stop_reply`, `console_output`...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .errors import RSPError
from .features import FeatureValue, build_qsupported, parse_qsupported_request
from .framing import is_hex
from .packets import BreakpointType, VContAction
from .stop import StopEvent, ThreadId, encode_stop_reply, parse_thread_id

__all__ = [
    "Attached",
    "Command",
    "Continue",
    "CurrentThread",
    "Detach",
    "ExtendedMode",
    "HaltReason",
    "InsertBreakpoint",
    "Kill",
    "Malformed",
    "Monitor",
    "MustReplyEmpty",
    "QSupported",
    "Query",
    "ReadMemory",
    "ReadRegister",
    "ReadRegisters",
    "RemoveBreakpoint",
    "SetThread",
    "StartNoAck",
    "Step",
    "ThreadAlive",
    "ThreadExtraInfo",
    "ThreadInfoFirst",
    "ThreadInfoNext",
    "Unknown",
    "VCont",
    "VContAction",
    "VContQuery",
    "VKill",
    "WriteMemory",
    "WriteMemoryBinary",
    "WriteRegister",
    "WriteRegisters",
    "XferRead",
    "error",
    "console_output",
    "current_thread_reply",
    "error_text",
    "flag",
    "ok",
    "packet_name",
    "parse_command",
    "stop_reply",
    "thread_list",
    "unsupported",
]


class Command:
    """Base of every parsed command."""

    __slots__ = ()

    def encode(self) -> bytes:
        """The packet payload this command stands for."""
        raise NotImplementedError


def _check_nonnegative(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ValueError(f"{name} {value} is negative")


def _opt_hex(value: int | None, prefix: bytes = b"") -> bytes:
    return b"" if value is None else prefix + b"%x" % value


# -- catch-alls ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unknown(Command):
    """A packet no parser is registered for; a stub answers it with the empty reply."""

    payload: bytes

    def encode(self) -> bytes:
        return self.payload


@dataclass(frozen=True, slots=True)
class Malformed(Command):
    """A known packet that did not parse; `reason` says why (a stub answers `E01` or so)."""

    payload: bytes
    reason: str

    def encode(self) -> bytes:
        return self.payload


@dataclass(frozen=True, slots=True)
class Query(Command):
    """A `q`/`Q` packet without a parser of its own (`qOffsets`, `qSymbol::`, `Qqemu.PhyMemMode:1`).

    Attributes:
        name: the packet name, `q`/`Q` included.
        args: what follows the separator, uninterpreted.
        separator: `:`, `,`, `;`, or b"" when the packet is the name alone.
    """

    name: str
    args: bytes = b""
    separator: bytes = b""

    def __post_init__(self) -> None:
        if self.separator not in (b"", b":", b",", b";") or (self.args and not self.separator):
            raise ValueError(f"query {self.name!r}: bad separator {self.separator!r}")

    def encode(self) -> bytes:
        return self.name.encode() + self.separator + self.args


# -- base ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HaltReason(Command):
    """`?`: why did the target stop?"""

    def encode(self) -> bytes:
        return b"?"


@dataclass(frozen=True, slots=True)
class ReadRegisters(Command):
    """`g`: every register of the `Hg` thread."""

    def encode(self) -> bytes:
        return b"g"


@dataclass(frozen=True, slots=True)
class WriteRegisters(Command):
    """`G`: write every register; `data` is the register block in target byte order."""

    data: bytes

    def encode(self) -> bytes:
        return b"G" + self.data.hex().encode()


@dataclass(frozen=True, slots=True)
class ReadRegister(Command):
    """`p`: read register `regnum`."""

    regnum: int

    def __post_init__(self) -> None:
        _check_nonnegative(regnum=self.regnum)

    def encode(self) -> bytes:
        return b"p%x" % self.regnum


@dataclass(frozen=True, slots=True)
class WriteRegister(Command):
    """`P`: write `value` (target byte order) into register `regnum`."""

    regnum: int
    value: bytes

    def __post_init__(self) -> None:
        _check_nonnegative(regnum=self.regnum)

    def encode(self) -> bytes:
        return b"P%x=%s" % (self.regnum, self.value.hex().encode())


@dataclass(frozen=True, slots=True)
class ReadMemory(Command):
    """`m`: read `length` bytes at `address`."""

    address: int
    length: int

    def __post_init__(self) -> None:
        _check_nonnegative(address=self.address, length=self.length)

    def encode(self) -> bytes:
        return b"m%x,%x" % (self.address, self.length)


@dataclass(frozen=True, slots=True)
class WriteMemory(Command):
    """`M`: write `data` (sent as hex) at `address`."""

    address: int
    data: bytes

    def __post_init__(self) -> None:
        _check_nonnegative(address=self.address)

    def encode(self) -> bytes:
        return b"M%x,%x:%s" % (self.address, len(self.data), self.data.hex().encode())


@dataclass(frozen=True, slots=True)
class WriteMemoryBinary(Command):
    """`X`: write `data` (sent as binary) at `address`. GDB probes for `X` support with empty data."""

    address: int
    data: bytes

    def __post_init__(self) -> None:
        _check_nonnegative(address=self.address)

    def encode(self) -> bytes:
        return b"X%x,%x:%s" % (self.address, len(self.data), self.data)


# -- breakpoints -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InsertBreakpoint(Command):
    """`Z`: insert a breakpoint or watchpoint.

    Attributes:
        type: software, hardware, write, read or access.
        address: where.
        kind: the breakpoint's instruction size (arch-specific) or the watched length.
        conditions: GDB's `;X...` condition and command lists, as sent (probed does not evaluate them).
    """

    type: BreakpointType
    address: int
    kind: int
    conditions: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", BreakpointType(self.type))
        _check_nonnegative(address=self.address, kind=self.kind)

    def encode(self) -> bytes:
        tail = b";" + self.conditions if self.conditions else b""
        return b"Z%d,%x,%x%s" % (self.type, self.address, self.kind, tail)


@dataclass(frozen=True, slots=True)
class RemoveBreakpoint(Command):
    """`z`: remove a breakpoint or watchpoint (fields as `InsertBreakpoint`)."""

    type: BreakpointType
    address: int
    kind: int
    conditions: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", BreakpointType(self.type))
        _check_nonnegative(address=self.address, kind=self.kind)

    def encode(self) -> bytes:
        tail = b";" + self.conditions if self.conditions else b""
        return b"z%d,%x,%x%s" % (self.type, self.address, self.kind, tail)


# -- resume ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue(Command):
    """`c [addr]` or, with a signal, `C sig[;addr]`: resume."""

    address: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        _check_nonnegative(address=self.address)
        if self.signal is not None and not 0 <= self.signal <= 0xFF:
            raise ValueError(f"signal {self.signal} is not 0..255")

    def encode(self) -> bytes:
        if self.signal is None:
            return b"c" + _opt_hex(self.address)
        return b"C%02x" % self.signal + _opt_hex(self.address, b";")


@dataclass(frozen=True, slots=True)
class Step(Command):
    """`s [addr]` or, with a signal, `S sig[;addr]`: single-step."""

    address: int | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        _check_nonnegative(address=self.address)
        if self.signal is not None and not 0 <= self.signal <= 0xFF:
            raise ValueError(f"signal {self.signal} is not 0..255")

    def encode(self) -> bytes:
        if self.signal is None:
            return b"s" + _opt_hex(self.address)
        return b"S%02x" % self.signal + _opt_hex(self.address, b";")


@dataclass(frozen=True, slots=True)
class VCont(Command):
    """`vCont;action[:thread]...`: resume threads, one action each (at least one)."""

    actions: tuple[VContAction, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(self.actions))
        if not self.actions:
            raise ValueError("vCont needs at least one action")

    def encode(self) -> bytes:
        return b"vCont;" + b";".join(a.encode() for a in self.actions)

    @property
    def steps(self) -> bool:
        """Whether any action single-steps."""
        return any(a.steps for a in self.actions)

    def stepped_thread(self) -> ThreadId | None:
        """The thread a step action names, or None for the current one (no thread, -1 or 0)."""
        for a in self.actions:
            if a.steps:
                return a.thread if a.thread is None or a.thread.tid > 0 else None
        return None


@dataclass(frozen=True, slots=True)
class VContQuery(Command):
    """`vCont?`: which vCont actions does the stub support?"""

    def encode(self) -> bytes:
        return b"vCont?"


# -- threads ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetThread(Command):
    """`Hg`/`Hc`: the thread of later register/memory (`g`) or resume (`c`) operations."""

    op: str
    thread: ThreadId

    def __post_init__(self) -> None:
        if self.op not in ("g", "c"):
            raise ValueError(f"H takes g or c, not {self.op!r}")

    def encode(self) -> bytes:
        return b"H" + self.op.encode() + self.thread.encode()


@dataclass(frozen=True, slots=True)
class ThreadAlive(Command):
    """`T thread`: is it alive?"""

    thread: ThreadId

    def encode(self) -> bytes:
        return b"T" + self.thread.encode()


@dataclass(frozen=True, slots=True)
class CurrentThread(Command):
    """`qC`: which thread is current?"""

    def encode(self) -> bytes:
        return b"qC"


@dataclass(frozen=True, slots=True)
class ThreadInfoFirst(Command):
    """`qfThreadInfo`: the first part of the thread list."""

    def encode(self) -> bytes:
        return b"qfThreadInfo"


@dataclass(frozen=True, slots=True)
class ThreadInfoNext(Command):
    """`qsThreadInfo`: the next part of the thread list."""

    def encode(self) -> bytes:
        return b"qsThreadInfo"


@dataclass(frozen=True, slots=True)
class ThreadExtraInfo(Command):
    """`qThreadExtraInfo,thread`: a printable description of a thread."""

    thread: ThreadId

    def encode(self) -> bytes:
        return b"qThreadExtraInfo," + self.thread.encode()


# -- queries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QSupported(Command):
    """`qSupported[:features]`: what the debugger supports (see `rsp.features`)."""

    features: Mapping[str, FeatureValue] = field(default_factory=dict)

    def encode(self) -> bytes:
        return build_qsupported(self.features)


@dataclass(frozen=True, slots=True)
class XferRead(Command):
    """`qXfer:object:read:annex:offset,length`: read part of a special object."""

    object: str
    annex: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_nonnegative(offset=self.offset, length=self.length)
        if ":" in self.object or ":" in self.annex:
            raise ValueError("qXfer object and annex cannot contain ':'")

    def encode(self) -> bytes:
        return b"qXfer:%s:read:%s:%x,%x" % (self.object.encode(), self.annex.encode(), self.offset, self.length)


@dataclass(frozen=True, slots=True)
class Monitor(Command):
    """`qRcmd,hex`: a monitor command (bytes that are not UTF-8 survive as surrogate escapes)."""

    command: str

    def encode(self) -> bytes:
        return b"qRcmd," + self.command.encode("utf-8", "surrogateescape").hex().encode()


@dataclass(frozen=True, slots=True)
class Attached(Command):
    """`qAttached[:pid]`: did the debugger attach to an existing process?"""

    pid: int | None = None

    def __post_init__(self) -> None:
        _check_nonnegative(pid=self.pid)

    def encode(self) -> bytes:
        return b"qAttached" + _opt_hex(self.pid, b":")


@dataclass(frozen=True, slots=True)
class StartNoAck(Command):
    """`QStartNoAckMode`: stop acknowledging packets once the stub answers OK."""

    def encode(self) -> bytes:
        return b"QStartNoAckMode"


# -- session ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detach(Command):
    """`D` or `D;pid`: detach."""

    pid: int | None = None

    def __post_init__(self) -> None:
        _check_nonnegative(pid=self.pid)

    def encode(self) -> bytes:
        return b"D" + _opt_hex(self.pid, b";")


@dataclass(frozen=True, slots=True)
class Kill(Command):
    """`k`: kill the target."""

    def encode(self) -> bytes:
        return b"k"


@dataclass(frozen=True, slots=True)
class VKill(Kill):
    """`vKill;pid`: kill one process (a `Kill` that wants an `OK` reply)."""

    pid: int

    def __post_init__(self) -> None:
        _check_nonnegative(pid=self.pid)

    def encode(self) -> bytes:
        return b"vKill;%x" % self.pid


@dataclass(frozen=True, slots=True)
class MustReplyEmpty(Command):
    """`vMustReplyEmpty`: GDB checks that unknown `v` packets get the empty reply."""

    def encode(self) -> bytes:
        return b"vMustReplyEmpty"


@dataclass(frozen=True, slots=True)
class ExtendedMode(Command):
    """`!`: enter extended mode (probed's stub declines: a running machine is not restarted)."""

    def encode(self) -> bytes:
        return b"!"


# -- the parsers: each gets the whole payload and what follows the packet name ---------------------------


class _Bad(Exception):
    """A known packet did not parse; the message becomes `Malformed.reason`."""


def _hex(text: bytes, what: str = "number") -> int:
    if not is_hex(text):
        raise _Bad(f"{what} {text[:20]!r} is not hex")
    return int(text, 16)


def _hexdata(text: bytes) -> bytes:
    if len(text) % 2 or (text and not is_hex(text)):
        raise _Bad("data is not an even number of hex digits")
    return bytes.fromhex(text.decode("ascii"))


def _thread(text: bytes) -> ThreadId:
    if not text:
        raise _Bad("no thread id")
    return parse_thread_id(text)


def _no_args(cls: type[Command]) -> Callable[[bytes, bytes], Command]:
    def parse(payload: bytes, rest: bytes) -> Command:
        if rest:
            raise _Bad(f"{cls.__name__} takes no arguments")
        return cls()

    return parse


def _address_length(text: bytes) -> tuple[int, int]:
    addr, comma, length = text.partition(b",")
    if not comma:
        raise _Bad("expected ADDR,LENGTH")
    return _hex(addr, "address"), _hex(length, "length")


def _write_registers(payload: bytes, rest: bytes) -> Command:
    return WriteRegisters(_hexdata(rest))


def _read_register(payload: bytes, rest: bytes) -> Command:
    return ReadRegister(_hex(rest, "register number"))


def _write_register(payload: bytes, rest: bytes) -> Command:
    regnum, eq, value = rest.partition(b"=")
    if not eq:
        raise _Bad("expected N=VALUE")
    return WriteRegister(_hex(regnum, "register number"), _hexdata(value))


def _read_memory(payload: bytes, rest: bytes) -> Command:
    return ReadMemory(*_address_length(rest))


def _write_memory(payload: bytes, rest: bytes) -> Command:
    head, colon, data = rest.partition(b":")
    if not colon:
        raise _Bad("expected ADDR,LENGTH:DATA")
    address, length = _address_length(head)
    raw = _hexdata(data) if payload[:1] == b"M" else data
    if len(raw) != length:
        raise _Bad(f"length {length:#x} does not match the {len(raw):#x} bytes of data")
    return (WriteMemory if payload[:1] == b"M" else WriteMemoryBinary)(address, raw)


def _breakpoint(payload: bytes, rest: bytes) -> Command:
    head, semi, conditions = rest.partition(b";")
    fields = head.split(b",")
    if len(fields) != 3:
        raise _Bad("expected TYPE,ADDR,KIND")
    if semi and not conditions:
        raise _Bad("';' without conditions")
    ztype = _hex(fields[0], "type")
    if ztype > 4:
        raise _Bad(f"breakpoint type {ztype} is not 0..4")
    cls = InsertBreakpoint if payload[:1] == b"Z" else RemoveBreakpoint
    return cls(BreakpointType(ztype), _hex(fields[1], "address"), _hex(fields[2], "kind"), conditions)


def _resume(payload: bytes, rest: bytes) -> Command:
    letter = payload[:1]
    cls = Continue if letter in b"cC" else Step
    if letter in b"cs":
        return cls(_hex(rest, "address") if rest else None)
    sig, semi, addr = rest.partition(b";")
    if semi and not addr:
        raise _Bad("';' without an address")
    return cls(_hex(addr, "address") if addr else None, _hex(sig, "signal"))


def _vcont_action(item: bytes) -> VContAction:
    head, colon, thread = item.partition(b":")
    if colon and not thread:
        raise _Bad("':' without a thread")
    action, args = head[:1].decode("ascii"), head[1:]
    tid = _thread(thread) if thread else None
    if action in ("C", "S"):
        return VContAction(action, tid, signal=_hex(args, "signal"))
    if action == "r":
        start, end = _address_length(args)
        return VContAction(action, tid, start=start, end=end)
    if args:
        raise _Bad(f"vCont action {head[:20]!r} takes no arguments")
    return VContAction(action, tid)


def _vcont(payload: bytes, rest: bytes) -> Command:
    if not rest.startswith(b";"):
        raise _Bad("expected vCont;ACTION")
    return VCont(tuple(_vcont_action(item) for item in rest[1:].split(b";")))


def _set_thread(payload: bytes, rest: bytes) -> Command:
    op = rest[:1].decode("ascii")
    if op not in ("g", "c"):
        raise _Bad("H needs g or c")
    return SetThread(op, _thread(rest[1:]))


def _thread_alive(payload: bytes, rest: bytes) -> Command:
    return ThreadAlive(_thread(rest))


def _thread_extra_info(payload: bytes, rest: bytes) -> Command:
    if not rest.startswith(b","):
        raise _Bad("expected qThreadExtraInfo,THREAD")
    return ThreadExtraInfo(_thread(rest[1:]))


def _qsupported(payload: bytes, rest: bytes) -> Command:
    return QSupported(parse_qsupported_request(payload))


def _xfer(payload: bytes, rest: bytes) -> Command:
    parts = rest.split(b":")
    if len(parts) != 5 or parts[0] != b"" or parts[2] != b"read":
        # Writes and other operations are forwarded as they are.
        return Query("qXfer", rest[1:], b":")
    offset, length = _address_length(parts[4])
    return XferRead(parts[1].decode("ascii"), parts[3].decode("ascii"), offset, length)


def _monitor(payload: bytes, rest: bytes) -> Command:
    if not rest.startswith(b","):
        raise _Bad("expected qRcmd,HEX")
    return Monitor(_hexdata(rest[1:]).decode("utf-8", "surrogateescape"))


def _attached(payload: bytes, rest: bytes) -> Command:
    if not rest:
        return Attached()
    if not rest.startswith(b":"):
        raise _Bad("expected qAttached:PID")
    return Attached(_hex(rest[1:], "pid"))


def _query(payload: bytes, rest: bytes) -> Command:
    name = payload[: len(payload) - len(rest)].decode("ascii")
    return Query(name, rest[1:], rest[:1])


def _detach(payload: bytes, rest: bytes) -> Command:
    if not rest:
        return Detach()
    if not rest.startswith(b";"):
        raise _Bad("expected D;PID")
    return Detach(_hex(rest[1:], "pid"))


def _vkill(payload: bytes, rest: bytes) -> Command:
    if not rest.startswith(b";"):
        raise _Bad("expected vKill;PID")
    return VKill(_hex(rest[1:], "pid"))


_Parser = Callable[[bytes, bytes], Command]

PARSERS: dict[bytes, _Parser] = {
    # base
    b"?": _no_args(HaltReason),
    b"g": _no_args(ReadRegisters),
    b"G": _write_registers,
    b"p": _read_register,
    b"P": _write_register,
    b"m": _read_memory,
    b"M": _write_memory,
    b"X": _write_memory,
    # breakpoints and watchpoints
    b"Z": _breakpoint,
    b"z": _breakpoint,
    # resume
    b"c": _resume,
    b"C": _resume,
    b"s": _resume,
    b"S": _resume,
    b"vCont": _vcont,
    b"vCont?": _no_args(VContQuery),
    # threads
    b"H": _set_thread,
    b"T": _thread_alive,
    b"qC": _no_args(CurrentThread),
    b"qfThreadInfo": _no_args(ThreadInfoFirst),
    b"qsThreadInfo": _no_args(ThreadInfoNext),
    b"qThreadExtraInfo": _thread_extra_info,
    # queries (any other q/Q packet is a generic Query)
    b"qSupported": _qsupported,
    b"qXfer": _xfer,
    b"qRcmd": _monitor,
    b"qAttached": _attached,
    b"QStartNoAckMode": _no_args(StartNoAck),
    b"qOffsets": _query,
    b"qSymbol": _query,
    b"qTStatus": _query,
    # session
    b"D": _detach,
    b"k": _no_args(Kill),
    b"vKill": _vkill,
    b"vMustReplyEmpty": _no_args(MustReplyEmpty),
    b"!": _no_args(ExtendedMode),
}
"""Packet name to parser, grouped by feature: the one table of the packets `parse_command` knows."""


def packet_name(payload: bytes) -> bytes:
    """The name of a packet: its letter, or for `q`/`Q`/`v` packets the word before the first separator."""
    first = payload[:1]
    if first in (b"q", b"Q"):
        separators = b":,;"
    elif first == b"v":
        separators = b":;"
    else:
        return first
    end = len(payload)
    for i, byte in enumerate(payload):
        if byte in separators:
            end = i
            break
    return payload[:end]


def parse_command(payload: bytes) -> Command:
    """The typed command a packet payload stands for; never raises.

    Returns:
        The command; `Query` for a `q`/`Q` packet without a parser of its own, `Unknown` for any other
        packet without a parser, `Malformed` for a known packet that does not parse.
    """
    name = packet_name(payload)
    parser = PARSERS.get(name)
    if parser is None:
        if name[:1] in (b"q", b"Q") and name.isascii():
            parser = _query
        else:
            return Unknown(payload)
    try:
        return parser(payload, payload[len(name) :])
    except _Bad as exc:
        return Malformed(payload, str(exc))
    except (ValueError, UnicodeDecodeError, RSPError) as exc:
        return Malformed(payload, str(exc) or type(exc).__name__)


# -- replies a stub sends --------------------------------------------------------------------------------


def ok() -> bytes:
    """`OK`."""
    return b"OK"


def unsupported() -> bytes:
    """The empty reply: "I do not know this packet"."""
    return b""


def error(code: int) -> bytes:
    """`E NN`: an error with a number (errno-like by convention: 0x0e EFAULT, 0x16 EINVAL...).

    Raises:
        ValueError: `code` is not 0..255.
    """
    if not 0 <= code <= 0xFF:
        raise ValueError(f"error code {code} is not 0..255")
    return b"E%02x" % code


def error_text(text: str) -> bytes:
    """`E.text`: an error with a message (GDB shows it when it has asked for `error-message+`)."""
    return b"E." + text.encode()


def stop_reply(event: StopEvent) -> bytes:
    """The payload of a stop reply (`T05thread:01;...`, `W00`, ...); see `rsp.stop.encode_stop_reply`."""
    return encode_stop_reply(event)


def console_output(text: bytes) -> bytes:
    """An `O` packet: text for the debugger's console (a monitor command's output, say)."""
    return b"O" + text.hex().encode()


def current_thread_reply(thread: ThreadId) -> bytes:
    """The reply to `qC`: `QC` and the thread id."""
    return b"QC" + thread.encode()


def flag(value: bool) -> bytes:
    """`1` or `0`: the reply to `qAttached` (1: attached to something that was running) and like queries."""
    return b"1" if value else b"0"


def thread_list(threads: Iterable[ThreadId]) -> bytes:
    """A `qfThreadInfo`/`qsThreadInfo` reply: `m01,02` for these threads, `l` when there are none left."""
    ids = [t.encode() for t in threads]
    return b"m" + b",".join(ids) if ids else b"l"
