"""What a debugger sends to a stub, parsed into the typed commands of `rsp.commands` (sans-IO).

`parse_command(payload)` looks the packet's name up in one table, grouped by feature, of small parsers.
A packet nobody registered is `Unknown`; a `q`/`Q` query without a parser of its own is a generic `Query`;
a known packet that does not parse is `Malformed`. None of them raises.

A packet's name (GDB manual, "Packets"): the first byte for the one-letter packets; for `q`/`Q` packets
everything up to the first `:`, `,` or `;`; for `v` packets everything up to the first `;` or `:`.
"""

from __future__ import annotations

from collections.abc import Callable

from .commands import (
    Attached,
    Command,
    Continue,
    CurrentThread,
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
    ReadRegister,
    ReadRegisters,
    RemoveBreakpoint,
    SetThread,
    StartNoAck,
    Step,
    ThreadAlive,
    ThreadExtraInfo,
    ThreadInfoFirst,
    ThreadInfoNext,
    Unknown,
    VCont,
    VContQuery,
    VKill,
    WriteMemory,
    WriteMemoryBinary,
    WriteRegister,
    WriteRegisters,
    XferRead,
)
from .errors import RSPError
from .features import parse_qsupported_request
from .framing import is_hex
from .packets import BreakpointType, VContAction
from .stop import ThreadId, parse_thread_id

__all__ = ["PARSERS", "packet_name", "parse_command"]


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
