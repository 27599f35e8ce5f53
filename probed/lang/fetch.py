"""The fetch language of `kprobe_events`, parsed (never evaluated as Python) and run in batches.

    NAME=FETCHARG[:TYPE]     or     FETCHARG[:TYPE]   (named arg1, arg2, ... by position)

FETCHARG: `%REG`, `@ADDR`, `@SYM[+|-OFF]`, `$stack`, `$stackN`, `$argN`, `+|-[u]OFF(FETCHARG)`, `\\IMM`.
TYPE: `u8..u64`, `s8..s64`, `x8..x64`, `string`, `ustring`, `symbol`, and arrays `TYPE[N]`.

Memory is read breadth-first: every field's next read goes into one batch (one write of `m` packets to the
target), so independent dereferences cost one round trip and a double dereference two.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from probed.errors import FetchSyntaxError

__all__ = ["FetchField", "FetchProgram", "parse_fetchargs", "parse_fetcharg"]

STRING_MAX = 256
PAGE = 4096
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*")
_SPECIAL = re.compile(r"\$(stack|arg|retval|comm)([0-9]*)")
_TYPE = re.compile(r"^(?:(?P<int>[usx])(?P<bits>8|16|32|64)|(?P<other>string|ustring|symbol))(?:\[(?P<n>[0-9]+)\])?$")

# -- the syntax tree ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reg:
    name: str


@dataclass(frozen=True)
class Imm:
    value: int


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
class Memory:
    """`@ADDR` or `@SYM+OFF`: the memory at a fixed address."""

    address: int


@dataclass(frozen=True)
class Deref:
    """`+OFF(inner)`: the memory at inner's value plus OFF."""

    offset: int
    inner: Any


Node = Reg | Imm | StackPointer | StackEntry | Arg | Memory | Deref


@dataclass(frozen=True)
class FieldType:
    """How a field is read and rendered."""

    kind: str  # "u", "s", "x", "string", "ustring", "symbol"
    size: int  # bytes per element (strings: 0)
    count: int | None  # array length, or None

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


# -- parsing ------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, start: int, end: int, arch: Any, symbols: Any):
        self.text, self.pos, self.end = text, start, end
        self.arch, self.symbols = arch, symbols

    def fail(self, reason: str, at: int | None = None) -> FetchSyntaxError:
        return FetchSyntaxError(self.text, (self.pos if at is None else at) + 1, reason)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.end else ""

    def number(self, what: str) -> int:
        m = _NUMBER.match(self.text, self.pos, self.end)
        if not m:
            raise self.fail(f"expected {what}")
        self.pos = m.end()
        return int(m.group(0), 0)

    def fetcharg(self) -> Node:
        c = self.peek()
        start = self.pos
        if not c:
            raise self.fail("expected a fetch arg")
        if c == "%":
            self.pos += 1
            m = _NAME.match(self.text, self.pos, self.end)
            if not m:
                raise self.fail("expected a register name after %")
            self.pos = m.end()
            try:
                return Reg(self.arch.resolve_register(m.group(0)))
            except KeyError as exc:
                raise self.fail(str(exc).strip("'\""), start + 1) from None
        if c == "@":
            self.pos += 1
            if self.text.startswith(("0x", "0X"), self.pos) or self.peek().isdigit():
                return Memory(self.number("an address"))
            m = _SYMBOL.match(self.text, self.pos, self.end)
            if not m:
                raise self.fail("expected an address or a symbol after @")
            self.pos = m.end()
            offset = 0
            if self.peek() and self.peek() in "+-":
                sign = -1 if self.peek() == "-" else 1
                self.pos += 1
                offset = sign * self.number("an offset")
            if self.symbols is None:
                raise self.fail("no symbols are loaded to resolve @SYM", start + 1)
            try:
                sym = self.symbols.lookup(m.group(0))
            except Exception as exc:  # UnknownSymbol: keep its close matches in the message
                raise self.fail(str(exc), start + 1) from None
            return Memory(sym.address + offset)
        if c == "$":
            m = _SPECIAL.match(self.text, self.pos, self.end)
            if not m:
                raise self.fail("expected $stack, $stackN or $argN")
            self.pos = m.end()
            what, n = m.group(1), m.group(2)
            if what == "stack":
                return StackEntry(int(n)) if n else StackPointer()
            if what == "arg" and n and int(n) >= 1:
                return Arg(int(n))
            if what == "arg":
                raise self.fail("$arg needs a number from 1", start)
            raise self.fail(f"${what} is not available for guest probes", start)
        if c in "+-":
            sign = -1 if c == "-" else 1
            self.pos += 1
            if self.peek() == "u":
                self.pos += 1
            offset = sign * self.number("an offset")
            if self.peek() != "(":
                raise self.fail("expected ( after the offset")
            self.pos += 1
            inner = self.fetcharg()
            if self.peek() != ")":
                raise self.fail("expected )")
            self.pos += 1
            return Deref(offset, inner)
        if c == "\\":
            self.pos += 1
            sign = 1
            if self.peek() == "-":
                sign, self.pos = -1, self.pos + 1
            return Imm(sign * self.number("an immediate number"))
        raise self.fail(f"unexpected {c!r}: a fetch arg starts with %, @, $, +, - or \\")


def _split_type(text: str, start: int) -> int:
    """Index of the `:` that starts the type (outside parentheses), or -1."""
    depth = 0
    for i in range(len(text) - 1, start - 1, -1):
        ch = text[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            depth -= 1
        elif ch == ":" and depth == 0:
            return i
    return -1


def parse_fetcharg(text: str, position: int, arch: Any, symbols: Any = None) -> FetchField:
    """Parse one `NAME=FETCHARG[:TYPE]`.

    Raises:
        FetchSyntaxError: with the 1-based column of the problem in `text`.
    """
    name = f"arg{position}"
    start = 0
    m = _NAME.match(text)
    if m and text[m.end() : m.end() + 1] == "=":
        name, start = m.group(0), m.end() + 1
    elif "=" in text.split("(")[0] and not text.startswith(("+", "-", "%", "@", "$", "\\")):
        raise FetchSyntaxError(text, 1, "a field name is a C identifier")
    colon = _split_type(text, start)
    end = colon if colon >= 0 else len(text)
    parser = _Parser(text, start, end, arch, symbols)
    node = parser.fetcharg()
    if parser.pos != end:
        raise parser.fail("unexpected text after the fetch arg")
    word = arch.word_size
    ftype = FieldType("x", word, None)
    if colon >= 0:
        tm = _TYPE.match(text[colon + 1 :])
        if not tm:
            raise FetchSyntaxError(
                text, colon + 2, f"unknown type {text[colon + 1:]!r} (u8..u64, s8..s64, x8..x64, string, symbol, TYPE[N])"
            )
        count = int(tm.group("n")) if tm.group("n") else None
        if tm.group("int"):
            ftype = FieldType(tm.group("int"), int(tm.group("bits")) // 8, count)
        elif tm.group("other") == "symbol":
            ftype = FieldType("symbol", word, count)
        else:
            if count is not None:
                raise FetchSyntaxError(text, colon + 2, "arrays of strings are not supported")
            ftype = FieldType(tm.group("other"), 0, None)
        if count is not None and not isinstance(node, Memory | Deref | StackEntry):
            raise FetchSyntaxError(text, start + 1, "an array needs a memory fetch arg (@ADDR or +OFF(...))")
        if count is not None and not 1 <= count <= 1024:
            raise FetchSyntaxError(text, colon + 2, "array length must be 1..1024")
    return FetchField(name, node, ftype, text)


def parse_fetchargs(args: Sequence[str], arch: Any, symbols: Any = None) -> FetchProgram:
    """Parse a handler's fetch args.

    Args:
        args: `NAME=FETCHARG[:TYPE]` or `FETCHARG[:TYPE]` strings (unnamed ones become `argN`, N its position).
        arch: register names, word size and calling convention of the target.
        symbols: resolves `@SYM`; None if no symbol files are loaded.

    Returns:
        The program; its `fields` are the names in argument order.

    Raises:
        FetchSyntaxError: the first arg that does not parse (its text and column), or a repeated name.
    """
    fields = []
    seen: set[str] = set()
    for i, text in enumerate(args, start=1):
        f = parse_fetcharg(text, i, arch, symbols)
        if f.name in seen:
            raise FetchSyntaxError(text, 1, f"field {f.name!r} appears twice")
        seen.add(f.name)
        fields.append(f)
    return FetchProgram(tuple(fields), arch)


# -- evaluation ---------------------------------------------------------------------------------------

_Read = tuple[int, int]
_Gen = Generator[_Read, "bytes | Exception", Any]


def read_c_string(
    read: Callable[[int, int], Generator[_Read, Any, bytes]], address: int, limit: int, fault: type[Exception]
) -> Generator[_Read, Any, str]:
    """A NUL-terminated string (at most `limit` bytes, UTF-8 with replacement), read through `read`.

    The first read stops at the page boundary, so a string at the end of a mapped page is not lost to an
    unmapped next page. A `fault` on a later read ends the string there; on the first, it is raised.
    Sans-IO: `read` is a generator that yields `(address, length)` and gets the bytes back.
    """
    out = bytearray()
    while len(out) < limit:
        chunk = min(limit - len(out), PAGE - (address % PAGE))
        try:
            data = yield from read(address, chunk)
        except fault:
            if out:
                break
            raise
        nul = data.find(b"\0")
        if nul >= 0:
            out += data[:nul]
            break
        out += data
        address += chunk
    return out.decode("utf-8", errors="replace")


class Unfetched(str):
    """The value of a field that could not be fetched on a hit: its message, e.g. `<no register rip>`.

    A `str` (records show the message), marked so that filters treat it as unknown, never as a string.
    """


class _FieldError(Exception):
    """A field that cannot be fetched on this hit; its value becomes the message, e.g. `<fault reading 0x0: E14>`."""


def _fault(address: int, cause: Exception) -> _FieldError:
    return _FieldError(f"<fault reading {address:#x}: {cause}>")


def _register(regs: Mapping[str, int], name: str) -> int:
    try:
        return regs[name]
    except KeyError:
        raise _FieldError(f"<no register {name}>") from None


def _uses_registers(node: Node) -> bool:
    if isinstance(node, Reg | StackPointer | StackEntry | Arg):
        return True
    return isinstance(node, Deref) and _uses_registers(node.inner)


def _uses_memory(node: Node, arch: Any) -> bool:
    if isinstance(node, Memory | Deref | StackEntry):
        return True
    return isinstance(node, Arg) and arch.arg_location(node.index)[0] == "stack"


class FetchProgram:
    """Parsed fetch args, ready to run on hit contexts.

    Attributes:
        fields: the field names, in argument order.
        needs_registers: evaluation calls `ctx.registers()` (a `g` packet per hit).
        needs_memory: evaluation calls `ctx.read_many` (at least one batch of `m` packets per hit).
    """

    def __init__(self, fields: tuple[FetchField, ...], arch: Any):
        self.fields_spec = fields
        self.arch = arch
        self.fields = tuple(f.name for f in fields)
        self.needs_registers = any(_uses_registers(f.node) for f in fields)
        self.needs_memory = any(_uses_memory(f.node, arch) or f.type.is_string for f in fields)

    async def evaluate(self, ctx: Any) -> dict[str, Any]:
        """Fetch every field, reading memory breadth-first (one `read_many` per round of dereferences).

        Args:
            ctx: the hit: `await ctx.registers()` (a mapping of register name to value),
                `await ctx.read_many([(address, length), ...])` (bytes or an Exception per request, in order)
                and `ctx.symbolize(address)` (a "sym+0xoff" string or None).

        Returns:
            Field name to value, in argument order: an int (`u`/`s`), a "0x.." string (`x`), a string, a
            symbol name, or a list of those (arrays). A field that cannot be fetched on this hit gets a
            `<fault reading ADDR: ...>` (or `<no register ...>`) string instead; the other fields are unaffected.
        """
        regs = await ctx.registers() if self.needs_registers else {}
        gens = {f.name: self._field(f, regs, ctx) for f in self.fields_spec}
        results: dict[str, Any] = {}
        pending: dict[str, _Read] = {}
        for name, gen in gens.items():
            self._advance(name, gen, None, pending, results)
        while pending:
            names = list(pending)
            replies = await ctx.read_many([pending[n] for n in names])
            pending = {}
            for name, reply in zip(names, replies, strict=True):
                self._advance(name, gens[name], reply, pending, results)
        return {f.name: results[f.name] for f in self.fields_spec}

    @staticmethod
    def _advance(name: str, gen: _Gen, reply: Any, pending: dict[str, _Read], results: dict[str, Any]) -> None:
        try:
            pending[name] = gen.send(reply) if reply is not None else next(gen)
        except StopIteration as stop:
            results[name] = stop.value
        except _FieldError as error:
            results[name] = Unfetched(error)

    def _read(self, address: int, length: int) -> Generator[_Read, Any, bytes]:
        data = yield (address & ((1 << (8 * self.arch.word_size)) - 1), length)
        if isinstance(data, Exception):
            raise _fault(address, data)
        return data

    def _value(self, node: Node, regs: Mapping[str, int]) -> Generator[_Read, Any, int]:
        word = self.arch.word_size
        if isinstance(node, Reg):
            return _register(regs, node.name)
        if isinstance(node, Imm):
            return node.value
        if isinstance(node, StackPointer):
            return _register(regs, self.arch.sp)
        if isinstance(node, Arg):
            where, loc = self.arch.arg_location(node.index)
            if where == "reg":
                return _register(regs, loc)
            return int.from_bytes((yield from self._read(_register(regs, self.arch.sp) + loc, word)), "little")
        address = yield from self._address(node, regs)
        return int.from_bytes((yield from self._read(address, word)), "little")

    def _address(self, node: Node, regs: Mapping[str, int]) -> Generator[_Read, Any, int]:
        if isinstance(node, Memory):
            return node.address
        if isinstance(node, StackEntry):
            return _register(regs, self.arch.sp) + node.index * self.arch.word_size
        assert isinstance(node, Deref)
        return (yield from self._value(node.inner, regs)) + node.offset

    def _field(self, f: FetchField, regs: Mapping[str, int], ctx: Any) -> Generator[_Read, Any, Any]:
        t = f.type
        located = isinstance(f.node, Memory | Deref | StackEntry)
        if t.is_string:
            if located and not isinstance(f.node, StackEntry):
                address = yield from self._address(f.node, regs)
            else:
                address = yield from self._value(f.node, regs)
            return (yield from self._string(address))
        if located:
            address = yield from self._address(f.node, regs)
            data = yield from self._read(address, t.size * (t.count or 1))
            values = [int.from_bytes(data[i : i + t.size], "little") for i in range(0, len(data), t.size)]
        else:
            values = [(yield from self._value(f.node, regs))]
        rendered = [self._render(v, t, ctx) for v in values]
        return rendered if t.count is not None else rendered[0]

    def _string(self, address: int) -> Generator[_Read, Any, str]:
        return (yield from read_c_string(self._read, address, STRING_MAX, _FieldError))

    def _render(self, value: int, t: FieldType, ctx: Any) -> Any:
        bits = 8 * t.size
        value &= (1 << bits) - 1
        if t.kind == "u":
            return value
        if t.kind == "s":
            return value - (1 << bits) if value >> (bits - 1) else value
        if t.kind == "symbol":
            return ctx.symbolize(value) or f"{value:#x}"
        return f"{value:#x}"
