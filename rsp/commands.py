"""What a debugger sends to a stub, as typed commands (sans-IO, the server side of `rsp`).

Every command can `encode()` itself back into a payload, so a proxy can forward what it parsed:
`parse_command(c.encode()) == c` always, and `parse_command(p).encode() == p` for a payload in the canonical
spelling (lower-case hex without leading zeros, thread ids as `ThreadId.encode` writes them; GDB's `Hg1` comes
back as the equivalent `Hg01`). `rsp.command_parser.parse_command` makes them from payloads; `rsp.replies`
builds what a stub sends back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .features import FeatureValue, build_qsupported
from .packets import BreakpointType, VContAction
from .stop import ThreadId

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
