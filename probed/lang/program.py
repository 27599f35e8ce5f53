"""Running parsed fetch args on a hit: every field a generator of reads, advanced breadth-first in batches."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import fields as dc_fields
from dataclasses import is_dataclass, replace
from typing import Any

from .tree import (
    Arg,
    Deref,
    Failed,
    FetchField,
    FieldType,
    Imm,
    Memory,
    Node,
    Reg,
    RetVal,
    StackEntry,
    StackPointer,
    StrImm,
)

__all__ = ["PAGE", "STRING_MAX", "FetchProgram", "Unfetched", "read_c_string"]

STRING_MAX = 256
PAGE = 4096

_Read = tuple[int, int]
_Gen = Generator[_Read, "bytes | Exception", Any]
_ReadNow = Callable[[int, int], "bytes | None"]
_NowField = Callable[[Mapping[str, int], _ReadNow, Any], Any]
_NowValue = Callable[[Mapping[str, int], _ReadNow], int]


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


class _NotNow(Exception):  # noqa: N818  (a signal, not a failure)
    """A read made at once found no answer in guest RAM: the hit reads breadth-first instead."""


class _FieldError(Exception):
    """A field that cannot be fetched on this hit; its value becomes the message, e.g. `<fault reading 0x0: E14>`."""


def _fault(address: int, cause: Exception) -> _FieldError:
    return _FieldError(f"<fault reading {address:#x}: {cause}>")


def _at_once(gen: Generator[_Read, Any, Any], read_now: _ReadNow) -> Any:
    """Run a generator of reads (a field's, a string's) with each read answered at once by `read_now`."""
    try:
        request = next(gen)
        while True:
            data = read_now(*request)
            if data is None:
                raise _NotNow
            request = gen.send(data)
    except StopIteration as stop:
        return stop.value


def _register(regs: Mapping[str, int], name: str) -> int:
    try:
        return regs[name]
    except KeyError:
        raise _FieldError(f"<no register {name}>") from None


def _walk_args(node: Any, found: set[int]) -> None:
    """Collect the `$argN` numbers under a node (nodes and typed wrappers are dataclasses)."""
    if isinstance(node, Arg):
        found.add(node.index)
    elif is_dataclass(node):
        for f in dc_fields(node):
            _walk_args(getattr(node, f.name), found)


def _bind_args(node: Any, values: Mapping[int, Any]) -> Any:
    """The node with each `$argN` replaced by its kept value (`Imm`) or why it has none (`Failed`)."""
    if isinstance(node, Arg):
        value = values.get(node.index)
        return Imm(value) if isinstance(value, int) else Failed(str(value or f"<$arg{node.index} not kept>"))
    if is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _bind_args(getattr(node, f.name), values) for f in dc_fields(node)
                   if is_dataclass(getattr(node, f.name))}
        return replace(node, **changes) if changes else node
    return node


def _uses_registers(node: Node) -> bool:
    if isinstance(node, Reg | StackPointer | StackEntry | Arg | RetVal):
        return True
    return isinstance(node, Deref) and _uses_registers(node.inner)


def _uses_memory(node: Node, arch: Any) -> bool:
    if isinstance(node, StrImm):
        return False
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
        self.needs_memory = any(
            _uses_memory(f.node, arch) or (f.type.is_string and not isinstance(f.node, StrImm)) for f in fields
        )
        self._dependent: list[_Read] = []  # the reads after the first round at the last hit
        self._now: list[tuple[str, _NowField]] | None = None  # the fields compiled for `_evaluate_now`

    @property
    def entry_args(self) -> tuple[int, ...]:
        """The `$argN` numbers the fields use (in a return probe, fetched at the function's entry)."""
        found: set[int] = set()
        for f in self.fields_spec:
            _walk_args(f.node, found)
        return tuple(sorted(found))

    def bind(self, values: Mapping[int, Any]) -> FetchProgram:
        """This program with each `$argN` replaced by the value kept at the function's entry (`values[N]`:
        an int, or an `Unfetched` message); what the fields do with it (dereferences...) runs at the return."""
        return type(self)(tuple(replace(f, node=_bind_args(f.node, values)) for f in self.fields_spec), self.arch)

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
        regs = self._registers(await ctx.registers()) if self.needs_registers else {}
        if getattr(ctx, "reads_are_cheap", False) and hasattr(ctx, "read_now"):
            done = self._evaluate_now(regs, ctx)
            if done is not None:
                return done
        gens = {f.name: self._field(f, regs, ctx) for f in self.fields_spec}
        results: dict[str, Any] = {}
        pending: dict[str, _Read] = {}
        for name, gen in gens.items():
            self._advance(name, gen, None, pending, results)
        # Where each read is a round trip, the dependent reads of the last hit go out with the first round:
        # the next round finds them in the stop's cache when their addresses came out the same, and reads
        # again when not (a guess never stands in for a read of this stop).
        guess = self._dependent if pending and not getattr(ctx, "reads_are_cheap", True) else []
        dependent: list[_Read] = []
        while pending:
            names = list(pending)
            batch = [pending[n] for n in names]
            if guess:
                extra, guess = [r for r in guess if r not in batch], []
                replies = (await ctx.read_many(batch + extra))[: len(batch)]
            else:
                replies = await ctx.read_many(batch)
            pending = {}
            for name, reply in zip(names, replies, strict=True):
                self._advance(name, gens[name], reply, pending, results)
            dependent += pending.values()
        self._dependent = dependent[:16]
        return {f.name: results[f.name] for f in self.fields_spec}

    def _evaluate_now(self, regs: Mapping[str, int], ctx: Any) -> dict[str, Any] | None:
        """Every field, depth-first, with reads from guest RAM at once (`ctx.read_now`); None as soon as one
        read cannot be made that way (then `evaluate` reads breadth-first, the stub answering what it must).

        Runs the fields compiled to plain calls (`_compile_now`): the same reads and values as the generators
        of `_field` fed at once, in a fraction of their calls (a hit's Python runs cold between hits)."""
        fields = self._now
        if fields is None:
            fields = self._now = self._compile_now()
        read_now = ctx.read_now
        results: dict[str, Any] = {}
        try:
            for name, field in fields:
                try:
                    results[name] = field(regs, read_now, ctx)
                except _FieldError as error:
                    results[name] = Unfetched(error)
        except _NotNow:
            return None
        return results

    @staticmethod
    def _advance(name: str, gen: _Gen, reply: Any, pending: dict[str, _Read], results: dict[str, Any]) -> None:
        try:
            pending[name] = gen.send(reply) if reply is not None else next(gen)
        except StopIteration as stop:
            results[name] = stop.value
        except _FieldError as error:
            results[name] = Unfetched(error)

    # -- what a variant for another ABI changes (probed.lang.compat) -------------------------------------

    def _registers(self, regs: Mapping[str, int]) -> Mapping[str, int]:
        """The registers as this program's fields see them."""
        return regs

    def _pointer_size(self, address: int) -> int:
        """The size of a pointer (or stacked word) stored at `address`."""
        return self.arch.word_size

    @property
    def _address_bits(self) -> int:
        """Addresses wrap at this many bits (a 32-bit target's `-4(%sp)` near 0)."""
        return 8 * self.arch.word_size

    # -- compiled for reads at once (`_evaluate_now`): `_field`, `_value` and `_address` as plain calls ------

    def _compile_now(self) -> list[tuple[str, _NowField]]:
        return [(f.name, self._now_field(f)) for f in self.fields_spec]

    def _now_reader(self) -> tuple[Callable[[_ReadNow, int, int], bytes], Callable[[_ReadNow, int], int]]:
        """`_read` and `_word` for reads at once (a read RAM cannot answer raises `_NotNow`)."""
        mask = (1 << self._address_bits) - 1
        pointer_size = self._pointer_size

        def read(read_now: _ReadNow, address: int, length: int) -> bytes:
            data = read_now(address & mask, length)
            if data is None:
                raise _NotNow
            return data

        def word(read_now: _ReadNow, address: int) -> int:
            return int.from_bytes(read(read_now, address, pointer_size(address)), "little")

        return read, word

    def _now_value(self, node: Node) -> _NowValue:
        read, word = self._now_reader()
        arch = self.arch
        if isinstance(node, Imm):
            value = node.value
            return lambda regs, read_now: value
        if isinstance(node, Failed):
            message = node.message

            def failed(regs: Mapping[str, int], read_now: _ReadNow) -> int:
                raise _FieldError(message)

            return failed
        register = None
        if isinstance(node, Arg):
            where, loc = arch.arg_location(node.index)
            if where != "reg":
                sp = arch.sp
                return lambda regs, read_now: word(read_now, _register(regs, sp) + loc)
            register = loc
        elif isinstance(node, Reg):
            register = node.name
        elif isinstance(node, RetVal):
            register = arch.return_register
        elif isinstance(node, StackPointer):
            register = arch.sp
        if register is not None:
            return lambda regs, read_now: _register(regs, register)
        address = self._now_address(node)
        return lambda regs, read_now: word(read_now, address(regs, read_now))

    def _now_address(self, node: Node) -> _NowValue:
        if isinstance(node, Memory):
            fixed = node.address
            return lambda regs, read_now: fixed
        if isinstance(node, StackEntry):
            sp, offset = self.arch.sp, node.index * self.arch.word_size
            return lambda regs, read_now: _register(regs, sp) + offset
        assert isinstance(node, Deref)
        inner, offset = self._now_value(node.inner), node.offset
        return lambda regs, read_now: inner(regs, read_now) + offset

    def _now_string(self) -> Callable[[_ReadNow, int], str]:
        """`_string` at once (no faults here: a read RAM cannot answer ends the whole evaluation)."""
        return lambda read_now, address: _at_once(self._string(address), read_now)

    def _now_field(self, f: FetchField) -> _NowField:
        t = f.type
        node = f.node
        render = self._render
        if isinstance(node, StrImm):
            text = node.value
            return lambda regs, read_now, ctx: text
        located = isinstance(node, Memory | Deref | StackEntry)
        read, _ = self._now_reader()
        string = self._now_string()
        if t.is_string and t.count is not None:
            address = self._now_address(node)
            count = t.count

            def strings(regs: Mapping[str, int], read_now: _ReadNow, ctx: Any) -> list[str]:
                at = address(regs, read_now)
                width = self._pointer_size(at)
                data = read(read_now, at, width * count)
                return [string(read_now, int.from_bytes(data[i * width : (i + 1) * width], "little")) for i in range(count)]

            return strings
        if t.is_string:
            where = self._now_address(node) if located and not isinstance(node, StackEntry) else self._now_value(node)
            return lambda regs, read_now, ctx: string(read_now, where(regs, read_now))
        if located:
            address = self._now_address(node)
            size, length = t.size, t.size * (t.count or 1)

            def located_values(regs: Mapping[str, int], read_now: _ReadNow, ctx: Any) -> Any:
                data = read(read_now, address(regs, read_now), length)
                rendered = [render(int.from_bytes(data[i : i + size], "little"), t, ctx) for i in range(0, len(data), size)]
                return rendered if t.count is not None else rendered[0]

            return located_values
        value = self._now_value(node)
        if t.count is not None:
            return lambda regs, read_now, ctx: [render(value(regs, read_now), t, ctx)]
        return lambda regs, read_now, ctx: render(value(regs, read_now), t, ctx)

    # -- evaluation ---------------------------------------------------------------------------------------

    def _read(self, address: int, length: int) -> Generator[_Read, Any, bytes]:
        data = yield (address & ((1 << self._address_bits) - 1), length)
        if isinstance(data, Exception):
            raise _fault(address, data)
        return data

    def _word(self, address: int) -> Generator[_Read, Any, int]:
        """The pointer-sized value at `address`."""
        return int.from_bytes((yield from self._read(address, self._pointer_size(address))), "little")

    def _value(self, node: Node, regs: Mapping[str, int]) -> Generator[_Read, Any, int]:
        if isinstance(node, Reg):
            return _register(regs, node.name)
        if isinstance(node, Imm):
            return node.value
        if isinstance(node, Failed):
            raise _FieldError(node.message)
        if isinstance(node, RetVal):
            return _register(regs, self.arch.return_register)
        if isinstance(node, StackPointer):
            return _register(regs, self.arch.sp)
        if isinstance(node, Arg):
            where, loc = self.arch.arg_location(node.index)
            if where == "reg":
                return _register(regs, loc)
            return (yield from self._word(_register(regs, self.arch.sp) + loc))
        address = yield from self._address(node, regs)
        return (yield from self._word(address))

    def _address(self, node: Node, regs: Mapping[str, int]) -> Generator[_Read, Any, int]:
        if isinstance(node, Memory):
            return node.address
        if isinstance(node, StackEntry):
            return _register(regs, self.arch.sp) + node.index * self.arch.word_size
        assert isinstance(node, Deref)
        return (yield from self._value(node.inner, regs)) + node.offset

    def _field(self, f: FetchField, regs: Mapping[str, int], ctx: Any) -> Generator[_Read, Any, Any]:
        t = f.type
        if isinstance(f.node, StrImm):
            return f.node.value
        located = isinstance(f.node, Memory | Deref | StackEntry)
        if t.is_string and t.count is not None:
            # string[N]: N char pointers at the location, each read as a string (kprobe_events' "char * array").
            address = yield from self._address(f.node, regs)
            word = self._pointer_size(address)
            data = yield from self._read(address, word * t.count)
            out = []
            for i in range(t.count):
                try:
                    out.append((yield from self._string(int.from_bytes(data[i * word : (i + 1) * word], "little"))))
                except _FieldError as error:
                    out.append(Unfetched(error))
            return out
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
        if t.kind == "bitfield":
            return (value >> t.shift) & ((1 << t.bits) - 1)
        if t.kind == "u":
            return value
        if t.kind == "s":
            return value - (1 << bits) if value >> (bits - 1) else value
        if t.kind == "char":
            return chr(value)
        if t.kind == "symbol":
            return ctx.symbolize(value) or f"{value:#x}"
        if t.kind == "symstr":
            symstr = getattr(ctx, "symstr", None)
            return (symstr(value) if symstr else ctx.symbolize(value)) or f"{value:#x}"
        return f"{value:#x}"
