"""The fetch language's syntax tree: what to fetch (nodes) and how to read and render it (FieldType)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Arg", "Deref", "Failed", "FetchField", "FieldType", "Imm", "Memory", "Node", "Reg", "RetVal", "StackEntry",
           "StackPointer", "StrImm"]


@dataclass(frozen=True)
class Reg:
    name: str


@dataclass(frozen=True)
class Imm:
    value: int


@dataclass(frozen=True)
class StrImm:
    """`\\"text"`: a string immediate."""

    value: str


@dataclass(frozen=True)
class StackPointer:
    pass


@dataclass(frozen=True)
class StackEntry:
    index: int


@dataclass(frozen=True)
class Arg:
    index: int


@dataclass(frozen=True)
class RetVal:
    """`$retval`: the return value register, in a return probe."""


@dataclass(frozen=True)
class Failed:
    """A return probe's `$argN` that could not be fetched at the function's entry: its message."""

    message: str


@dataclass(frozen=True)
class Memory:
    """`@ADDR` or `@SYM+OFF`: the memory at a fixed address."""

    address: int


@dataclass(frozen=True)
class Deref:
    """`+OFF(inner)`: the memory at inner's value plus OFF."""

    offset: int
    inner: Any


Node = Reg | Imm | StrImm | StackPointer | StackEntry | Arg | RetVal | Failed | Memory | Deref


@dataclass(frozen=True)
class FieldType:
    """How a field is read and rendered.

    Attributes:
        kind: "u", "s", "x", "char", "string", "ustring", "symbol", "symstr" or "bitfield".
        size: bytes per element (strings: 0; bitfields: the container).
        count: array length, or None.
        bits, shift: a bitfield's width and offset in its container.
    """

    kind: str
    size: int
    count: int | None
    bits: int = 0
    shift: int = 0

    @property
    def is_string(self) -> bool:
        return self.kind in ("string", "ustring")


@dataclass(frozen=True)
class FetchField:
    """One parsed fetch arg: its field name, what to fetch, its type, and the text it came from."""

    name: str
    node: Node
    type: FieldType
    text: str
