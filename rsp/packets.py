"""Client-side packets, sans-IO: builders of request payloads and parsers of the replies.

Builders return the payload only; `rsp.framing.encode_packet` frames it. Parsers take a reply payload as the
framer delivered it (unescaped, run-length expanded) and return typed values or raise typed errors.

Error replies (GDB manual, "Standard Replies"): `E NN` is an error with a two-hex-digit number, `E.text` one
with a message, and the empty reply means "packet not supported". Data replies to `g`, `m` and `p` are hex,
and a hex reply can start with `E` too (`E5` is the byte 0xe5 from a stub that writes upper case). The rule
taken here, as GDB's own: a reply is an error only when it is exactly `E` and two hex digits (3 bytes), or
when it starts with `E.` (a `.` is never hex). A data reply of one byte that reads `Exx` is therefore an error;
QEMU writes lower-case hex, so it never sends one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from .errors import LocalProtocolError, RemoteError, RemoteProtocolError, UnsupportedPacket
from .framing import is_hex
from .stop import ThreadId, parse_thread_id

__all__ = [
    "Z_KEYS",
    "Z_TYPES",
    "BreakpointType",
    "VContAction",
    "attached",
    "check_ok",
    "cont",
    "cont_signal",
    "current_thread",
    "detach",
    "halt_reason",
    "insert_breakpoint",
    "kill",
    "monitor",
    "parse_current_thread",
    "parse_error",
    "parse_hex_data",
    "parse_monitor_output",
    "parse_thread_list",
    "parse_vcont_actions",
    "parse_xfer_chunk",
    "qemu_phys_mem_mode",
    "raise_for_error",
    "read_memory",
    "read_register",
    "read_registers",
    "remove_breakpoint",
    "set_thread",
    "start_no_ack",
    "step",
    "step_signal",
    "thread_alive",
    "thread_info_first",
    "thread_info_next",
    "vcont",
    "vcont_query",
    "write_memory",
    "write_memory_binary",
    "write_register",
    "write_registers",
    "xfer_read",
]


class BreakpointType(IntEnum):
    """The type number of a `Z`/`z` packet."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE = 2
    READ = 3
    ACCESS = 4

    @property
    def is_watch(self) -> bool:
        """A watchpoint (types 2..4), not a breakpoint."""
        return self >= BreakpointType.WRITE

    @property
    def access(self) -> str:
        """The access a watchpoint catches (`w`, `r`, `rw`); `x` for a breakpoint."""
        return _ACCESS[self]


_ACCESS = {0: "x", 1: "x", 2: "w", 3: "r", 4: "rw"}

Z_TYPES: dict[tuple[str, str], BreakpointType] = {
    ("break", "x"): BreakpointType.SOFTWARE,
    ("hbreak", "x"): BreakpointType.HARDWARE,
    ("watch", "w"): BreakpointType.WRITE,
    ("watch", "r"): BreakpointType.READ,
    ("watch", "rw"): BreakpointType.ACCESS,
}
"""The one map of (kind, access) as probed names a hook point (`break`/`hbreak` with `x`, `watch` with `w`,
`r` or `rw`) to the `Z` packet's type."""

Z_KEYS: dict[BreakpointType, tuple[str, str]] = {t: key for key, t in Z_TYPES.items()}
"""`Z` type to (kind, access): the inverse of `Z_TYPES`."""


VCONT_ACTIONS = frozenset("cCsStr")
"""vCont actions: continue, continue with signal, step, step with signal, stop, range step."""


@dataclass(frozen=True, slots=True)
class VContAction:
    """One action of a `vCont` packet.

    Attributes:
        action: `c`, `C`, `s`, `S`, `t` or `r`.
        thread: the thread it applies to; None for every thread without an action of its own.
        signal: the signal of `C` and `S` (required by them, refused for the others).
        start: the first address of an `r` range step.
        end: the address just past an `r` range step.

    Raises:
        LocalProtocolError: an unknown action, or a signal or range where it does not belong.
    """

    action: str
    thread: ThreadId | None = None
    signal: int | None = None
    start: int | None = None
    end: int | None = None

    def __post_init__(self) -> None:
        if self.action not in VCONT_ACTIONS or len(self.action) != 1:
            raise LocalProtocolError(f"unknown vCont action {self.action!r}")
        if (self.signal is not None) != (self.action in "CS"):
            raise LocalProtocolError(f"vCont action {self.action!r}: a signal goes with C and S only")
        if self.signal is not None and not 0 <= self.signal <= 0xFF:
            raise LocalProtocolError(f"signal {self.signal} is not 0..255")
        if (self.start is not None and self.end is not None) != (self.action == "r"):
            raise LocalProtocolError("vCont action 'r' needs start and end, the others take none")

    def encode(self) -> bytes:
        """The wire form (`c`, `C05:p1.2`, `r1000,1010:01`)."""
        out = self.action.encode()
        if self.signal is not None:
            out += b"%02x" % self.signal
        if self.action == "r":
            out += b"%x,%x" % (self.start, self.end)
        if self.thread is not None:
            out += b":" + self.thread.encode()
        return out

    @property
    def steps(self) -> bool:
        """Whether this action single-steps."""
        return self.action in "sS"


# -- request builders ----------------------------------------------------------------------------------


def _check_address(address: int, what: str = "address") -> None:
    if address < 0:
        raise LocalProtocolError(f"{what} {address:#x} is negative")


def _check_signal(signal: int) -> None:
    if not 0 <= signal <= 0xFF:
        raise LocalProtocolError(f"signal {signal} is not 0..255")


def _hexstring(value: bytes | str) -> bytes:
    text = value.encode("ascii") if isinstance(value, str) else bytes(value)
    try:
        bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise LocalProtocolError(f"not an even-length hex string: {text[:40]!r}") from None
    return text


def read_registers() -> bytes:
    """`g`: read every register of the current `Hg` thread."""
    return b"g"


def write_registers(hexdata: bytes | str) -> bytes:
    """`G`: write every register.

    Args:
        hexdata: the register block in hex, as `g` returned it.

    Raises:
        LocalProtocolError: `hexdata` is not hex.
    """
    return b"G" + _hexstring(hexdata)


def read_register(regnum: int) -> bytes:
    """`p`: read one register by its number in the target description."""
    _check_address(regnum, "register number")
    return b"p%x" % regnum


def write_register(regnum: int, hexvalue: bytes | str) -> bytes:
    """`P`: write one register.

    Args:
        regnum: the register number.
        hexvalue: the value in hex, in target byte order.

    Raises:
        LocalProtocolError: a negative number, or a value that is not hex.
    """
    _check_address(regnum, "register number")
    return b"P%x=%s" % (regnum, _hexstring(hexvalue))


def read_memory(address: int, length: int) -> bytes:
    """`m`: read `length` bytes at `address`."""
    _check_address(address)
    _check_address(length, "length")
    return b"m%x,%x" % (address, length)


def write_memory(address: int, data: bytes) -> bytes:
    """`M`: write `data` at `address`, sent as hex."""
    _check_address(address)
    return b"M%x,%x:%s" % (address, len(data), data.hex().encode())


def write_memory_binary(address: int, data: bytes) -> bytes:
    """`X`: write `data` at `address`, sent as binary (the framer escapes it; QEMU 7.2 lacks `X`)."""
    _check_address(address)
    return b"X%x,%x:%s" % (address, len(data), data)


def _breakpoint(op: bytes, type: int, address: int, kind: int) -> bytes:
    btype = BreakpointType(type)
    _check_address(address)
    _check_address(kind, "kind")
    return b"%s%d,%x,%x" % (op, btype, address, kind)


def insert_breakpoint(type: BreakpointType | int, address: int, kind: int) -> bytes:
    """`Z`: insert a breakpoint or watchpoint.

    Args:
        type: what to insert (software, hardware, write, read, access).
        address: where.
        kind: for breakpoints the instruction size (or an arch-specific kind), for watchpoints the length.

    Raises:
        ValueError: `type` is not 0..4.
        LocalProtocolError: a negative address or kind.
    """
    return _breakpoint(b"Z", type, address, kind)


def remove_breakpoint(type: BreakpointType | int, address: int, kind: int) -> bytes:
    """`z`: remove a breakpoint or watchpoint (same arguments as `insert_breakpoint`)."""
    return _breakpoint(b"z", type, address, kind)


def cont(address: int | None = None) -> bytes:
    """`c`: continue, at `address` if given."""
    if address is None:
        return b"c"
    _check_address(address)
    return b"c%x" % address


def step(address: int | None = None) -> bytes:
    """`s`: single-step, at `address` if given."""
    if address is None:
        return b"s"
    _check_address(address)
    return b"s%x" % address


def cont_signal(signal: int, address: int | None = None) -> bytes:
    """`C`: continue delivering `signal`, at `address` if given."""
    _check_signal(signal)
    return b"C%02x" % signal + (b"" if address is None else b";%x" % address)


def step_signal(signal: int, address: int | None = None) -> bytes:
    """`S`: single-step delivering `signal`, at `address` if given."""
    _check_signal(signal)
    return b"S%02x" % signal + (b"" if address is None else b";%x" % address)


def vcont_query() -> bytes:
    """`vCont?`: ask which vCont actions the stub supports."""
    return b"vCont?"


def vcont(actions: Iterable[VContAction]) -> bytes:
    """`vCont;a1;a2...`: resume threads with one action each.

    Raises:
        LocalProtocolError: no action at all.
    """
    parts = [a.encode() for a in actions]
    if not parts:
        raise LocalProtocolError("vCont needs at least one action")
    return b"vCont;" + b";".join(parts)


def xfer_read(object: str, annex: str, offset: int, length: int) -> bytes:
    """`qXfer:OBJECT:read:ANNEX:OFFSET,LENGTH`: read part of a special object (a target description...)."""
    _check_address(offset, "offset")
    _check_address(length, "length")
    return b"qXfer:%s:read:%s:%x,%x" % (object.encode(), annex.encode(), offset, length)


def monitor(command: str) -> bytes:
    """`qRcmd,HEX`: run a monitor command (QEMU's HMP)."""
    return b"qRcmd," + command.encode().hex().encode()


def detach(pid: int | None = None) -> bytes:
    """`D` (or `D;PID`): detach; QEMU resumes the guest and drops every breakpoint."""
    return b"D" if pid is None else b"D;%x" % pid


def kill() -> bytes:
    """`k`: kill the target (QEMU exits)."""
    return b"k"


def set_thread(op: str, thread: ThreadId) -> bytes:
    """`Hg`/`Hc`: choose the thread of later register/memory (`g`) or resume (`c`) operations.

    Raises:
        LocalProtocolError: `op` is not `g` or `c`.
    """
    if op not in ("g", "c"):
        raise LocalProtocolError(f"H takes 'g' or 'c', not {op!r}")
    return b"H" + op.encode() + thread.encode()


def thread_info_first() -> bytes:
    """`qfThreadInfo`: the first part of the thread list."""
    return b"qfThreadInfo"


def thread_info_next() -> bytes:
    """`qsThreadInfo`: the next part of the thread list."""
    return b"qsThreadInfo"


def thread_alive(thread: ThreadId) -> bytes:
    """`T`: is this thread alive?"""
    return b"T" + thread.encode()


def current_thread() -> bytes:
    """`qC`: which thread is current?"""
    return b"qC"


def attached(pid: int | None = None) -> bytes:
    """`qAttached`: did we attach to an existing process (1) or create one (0)?"""
    return b"qAttached" if pid is None else b"qAttached:%x" % pid


def halt_reason() -> bytes:
    """`?`: why did the target stop? (QEMU also deletes every breakpoint when it gets this.)"""
    return b"?"


def qemu_phys_mem_mode(physical: bool) -> bytes:
    """`Qqemu.PhyMemMode:1` (or `:0`): QEMU's `m`/`M` on physical (or virtual) addresses, for every client."""
    return b"Qqemu.PhyMemMode:1" if physical else b"Qqemu.PhyMemMode:0"


def start_no_ack() -> bytes:
    """`QStartNoAckMode`: stop acknowledging packets (QEMU 7.2 answers empty: acks stay on)."""
    return b"QStartNoAckMode"


# -- reply parsers -------------------------------------------------------------------------------------


def parse_error(reply: bytes) -> RemoteError | None:
    """The error an `E NN` or `E.text` reply stands for, or None for any other reply.

    See the module docstring for why `E` and two hex digits is an error only as the whole reply.
    """
    if reply[:1] != b"E":
        return None
    if reply[1:2] == b".":
        return RemoteError(None, reply[2:].decode(errors="replace"))
    if len(reply) == 3 and is_hex(reply[1:3]):
        return RemoteError(int(reply[1:3], 16))
    return None


def raise_for_error(reply: bytes, request: bytes | None = None) -> None:
    """Raise if `reply` is an error or the empty reply; return quietly otherwise.

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply.
    """
    if not reply:
        raise UnsupportedPacket(request or b"")
    error = parse_error(reply)
    if error is not None:
        raise RemoteError(error.code, error.text, request)


def check_ok(reply: bytes, request: bytes | None = None) -> None:
    """Check the reply to a request that answers `OK`.

    Args:
        reply: the reply payload.
        request: the request payload, named in the errors.

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply.
        RemoteProtocolError: anything else but `OK`.
    """
    raise_for_error(reply, request)
    if reply != b"OK":
        raise RemoteProtocolError(f"expected OK to {(request or b'')[:40]!r}, got {reply[:40]!r}")


def parse_hex_data(reply: bytes, request: bytes | None = None) -> bytes:
    """The bytes of a hex data reply (`g`, `m`, `p`).

    QEMU answers `xx` for a register it cannot read; those bytes come back as 0 (GDB shows them as
    unavailable; a caller that cares should look at the raw reply).

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply.
        RemoteProtocolError: not hex, or an odd number of digits.
    """
    raise_for_error(reply, request)
    text = reply.replace(b"xx", b"00")
    if len(text) % 2 or not is_hex(text):
        raise RemoteProtocolError(f"expected hex data, got {reply[:40]!r}")
    return bytes.fromhex(text.decode("ascii"))


def parse_xfer_chunk(reply: bytes, request: bytes | None = None) -> tuple[bytes, bool]:
    """One `qXfer` read reply: `m DATA` (more to come) or `l DATA` (the last part).

    Returns:
        (data, last): the binary data (already unescaped by the framer) and whether it is the last part.

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply.
        RemoteProtocolError: neither `m` nor `l`.
    """
    raise_for_error(reply, request)
    kind = reply[:1]
    if kind not in (b"m", b"l"):
        raise RemoteProtocolError(f"bad qXfer reply {reply[:40]!r}")
    return reply[1:], kind == b"l"


def parse_thread_list(reply: bytes) -> tuple[list[ThreadId], bool]:
    """A `qfThreadInfo`/`qsThreadInfo` reply: `m01,02` (part of the list) or `l` (the end).

    Returns:
        (threads, done): the threads of this part, and whether the list is complete.

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply.
        RemoteProtocolError: anything else.
    """
    raise_for_error(reply, b"qfThreadInfo")
    if reply == b"l":
        return [], True
    if reply[:1] != b"m" or len(reply) < 2:
        raise RemoteProtocolError(f"bad thread list {reply[:40]!r}")
    return [parse_thread_id(t) for t in reply[1:].split(b",")], False


def parse_current_thread(reply: bytes) -> ThreadId:
    """A `qC` reply: `QC` and a thread id.

    Raises:
        UnsupportedPacket: the empty reply.
        RemoteError: an error reply.
        RemoteProtocolError: anything else.
    """
    raise_for_error(reply, b"qC")
    if not reply.startswith(b"QC") or len(reply) < 3:
        raise RemoteProtocolError(f"bad qC reply {reply[:40]!r}")
    return parse_thread_id(reply[2:])


def parse_vcont_actions(reply: bytes) -> set[str]:
    """A `vCont?` reply (`vCont;c;C;s;S`): the actions the stub supports.

    Raises:
        UnsupportedPacket: the empty reply (no vCont at all).
        RemoteError: an error reply.
        RemoteProtocolError: not a `vCont` reply.
    """
    raise_for_error(reply, b"vCont?")
    if reply != b"vCont" and not reply.startswith(b"vCont;"):
        raise RemoteProtocolError(f"bad vCont? reply {reply[:40]!r}")
    return {a.decode("ascii", errors="replace") for a in reply[len(b"vCont;") :].split(b";") if a}


def parse_monitor_output(packet: bytes) -> bytes | None:
    """The text of an `O` console-output packet (sent during `qRcmd`), or None for any other packet.

    `OK` is the end of a monitor command, not output.
    """
    if packet[:1] != b"O" or packet == b"OK" or len(packet) % 2 != 1:
        return None
    hexpart = packet[1:]
    if hexpart and not is_hex(hexpart):
        return None
    return bytes.fromhex(hexpart.decode("ascii"))
