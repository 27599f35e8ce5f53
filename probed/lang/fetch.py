"""The fetch language of `kprobe_events`, parsed (never evaluated as Python) and run in batches.

    NAME=FETCHARG[:TYPE]     or     FETCHARG[:TYPE]   (named arg1, arg2, ... by position)

FETCHARG: `%REG`, `@ADDR`, `@SYM[+|-OFF]`, `$stack`, `$stackN`, `$argN`, `+|-[u]OFF(FETCHARG)`, `\\IMM`,
`\\"STRING"`, and with the kernel's types (BTF, Linux guests): `$comm`, `$pid`, `$tid`, `$current`, a
parameter by name (`filename`), `$arg*` (every parameter), member chains `how->flags`, `a->b.c`, `$arg2->f`,
and offsets by name `+STRUCT.MEMBER[.MEMBER](FETCHARG)`.
TYPE: `u8..u64`, `s8..s64`, `x8..x64`, `char`, `string`, `ustring`, `symbol`, `symstr`, bitfields
`b<width>@<offset>/<container bits>`, and arrays `TYPE[N]` (`string[N]`: N char pointers there).

Memory is read breadth-first: every field's next read goes into one batch (one write of `m` packets to the
target), so independent dereferences cost one round trip and a double dereference two.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from probed.errors import FetchSyntaxError

from . import typed
from .program import STRING_MAX, FetchProgram, Unfetched, read_c_string
from .tree import (
    Arg,
    Deref,
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

__all__ = [
    "STRING_MAX", "FetchEnv", "FetchField", "FetchProgram", "TypesNeeded", "kernel_number", "parse_fetchargs",
    "parse_fetcharg", "read_c_string", "Node", "Unfetched",
]

MAX_DEPTH = 64  # nested dereferences and member accesses in one fetch arg (the kernel allows far fewer)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*")
_SPECIAL = re.compile(r"\$(stack|arg|retval|comm|pid|tid|current)([0-9]*)")
_STRUCT_PATH = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
_KERNEL_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_TYPE = re.compile(
    r"^(?:(?P<int>[usx])(?P<bits>8|16|32|64)|(?P<other>string|ustring|symbol|symstr|char)"
    r"|b(?P<bw>[0-9]+)@(?P<bo>[0-9]+)/(?P<bc>[0-9]+))(?:\[(?P<n>[0-9]+)\])?$"
)
_TASK_FIELDS = {  # the current task's fields and their types (pid_t is an int)
    "$comm": FieldType("string", 0, None), "$pid": FieldType("s", 4, None), "$tid": FieldType("s", 4, None),
}
_TYPES_HELP = "u8..u64, s8..s64, x8..x64, char, string, ustring, symbol, symstr, bW@O/C, TYPE[N]"


@dataclass(frozen=True)
class FetchEnv:
    """What a fetch arg may refer to beyond registers and memory.

    Attributes:
        function: the probed function (parameter names and `$argN` types come from its BTF prototype).
        at_entry: the probe is at the function's first instruction (parameters by name only there).
        types: the kernel's types (probed.guest.linux.kernel_types.KernelTypes), or None.
        types_error: why `types` is None, if they were looked for ("" if nobody asked yet).
        user: the probe is in user space: the CPU runs with the user's GS base, the kernel's per-CPU base is
            parked in KERNEL_GS_BASE (swapgs), so `$comm`/`$pid`/`$tid` find `current` through that.
        retprobe: the fetch args of a return probe (`$retval`; `$argN` and parameters as at the entry).
    """

    function: str | None = None
    at_entry: bool = True
    types: Any = None
    types_error: str = ""
    user: bool = False
    retprobe: bool = False  # a return probe's handler: `$retval` allowed, `$argN` kept from the entry


class TypesNeeded(FetchSyntaxError):
    """A fetch arg uses the kernel's types and none were given: load them and parse again (the message
    stands as the error when they cannot be had)."""


def kernel_number(text: str) -> int | None:
    """A number as kprobe_events reads one (`kstrtoul` with base 0): `0x` hex, octal after a leading `0`,
    else decimal; None for anything else (`08`, `1_000`, ` 7`)."""
    if not _KERNEL_NUMBER.fullmatch(text):
        return None
    return int(text, 16) if text[1:2] in ("x", "X") else int(text, 8) if text[0] == "0" else int(text)


class _Parser:
    def __init__(self, text: str, start: int, end: int, arch: Any, symbols: Any, env: FetchEnv):
        self.text, self.pos, self.end = text, start, end
        self.arch, self.symbols, self.env = arch, symbols, env

    def fail(self, reason: str, at: int | None = None) -> FetchSyntaxError:
        return FetchSyntaxError(self.text, (self.pos if at is None else at) + 1, reason)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.end else ""

    def number(self, what: str) -> int:
        m = _NUMBER.match(self.text, self.pos, self.end)
        if not m:
            raise self.fail(f"expected {what}")
        text = m.group(0)
        value = kernel_number(text)
        if value is None:
            raise self.fail(f"{text} is not a number: a leading 0 makes it octal (write {text.lstrip('0')} "
                            f"or 0x... for decimal or hex)")
        self.pos = m.end()
        return value

    def types(self, what: str, at: int) -> Any:
        """The kernel's types, or the error saying `what` needs them."""
        env = self.env
        if env.types is not None:
            return env.types
        if env.types_error:
            raise self.fail(f"{what} needs the kernel's types (BTF): {env.types_error}", at)
        raise TypesNeeded(self.text, at + 1, f"{what} needs the kernel's types (BTF), and none are loaded")

    def typed(self, problem: typed.TypeProblem, at: int) -> FetchSyntaxError:
        return self.fail(str(problem), at)

    # -- the grammar ---------------------------------------------------------------------------------

    def fetcharg(self, depth: int = 0) -> Node | typed.Typed:
        """One FETCHARG: a node, or a Typed one when BTF says what it points at."""
        if depth > MAX_DEPTH:
            raise self.fail(f"more than {MAX_DEPTH} nested dereferences")
        value = self.primary(depth)
        hops = 0
        while self.text.startswith(("->", "."), self.pos) and self.pos < self.end:
            op = "->" if self.text.startswith("->", self.pos) else "."
            at = self.pos
            self.pos += len(op)
            m = _NAME.match(self.text, self.pos, self.end)
            if not m:
                raise self.fail(f"expected a member name after {op}")
            hops += 1
            if depth + hops > MAX_DEPTH:
                raise self.fail(f"more than {MAX_DEPTH} nested dereferences", at)
            if not isinstance(value, typed.Typed):
                raise self.fail(f"{op} needs a typed value: a parameter by name, or $argN of a function the "
                                "kernel's BTF knows", at)
            types = self.types(f"{op}{m.group(0)}", at)
            try:
                value = typed.member(types, value, op, m.group(0), Deref)
            except typed.TypeProblem as exc:
                raise self.typed(exc, m.start()) from None
            self.pos = m.end()
        return value

    def primary(self, depth: int) -> Node | typed.Typed:
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
            return self.memory(start)
        if c == "$":
            return self.special(start)
        if c in "+-":
            sign = -1 if c == "-" else 1
            self.pos += 1
            path = _STRUCT_PATH.match(self.text, self.pos, self.end)
            if path:  # +STRUCT.MEMBER[.MEMBER](FETCHARG): the offset by name, from BTF
                offset = sign * self.struct_offset(path)
            else:
                if self.peek() == "u" and self.text[self.pos + 1 : self.pos + 2].isdigit():
                    self.pos += 1
                offset = sign * self.number("an offset")
            if self.peek() != "(":
                raise self.fail("expected ( after the offset")
            self.pos += 1
            inner = self.fetcharg(depth + 1)
            if self.peek() != ")":
                raise self.fail("expected )")
            self.pos += 1
            return Deref(offset, inner.node if isinstance(inner, typed.Typed) else inner)
        if c == "\\":
            self.pos += 1
            if self.peek() == '"':
                close = self.text.find('"', self.pos + 1, self.end)
                if close < 0:
                    raise self.fail("unterminated string immediate (\\\"...\")")
                value = self.text[self.pos + 1 : close]
                self.pos = close + 1
                return StrImm(value)
            sign = 1
            if self.peek() == "-":
                sign, self.pos = -1, self.pos + 1
            return Imm(sign * self.number("an immediate number"))
        m = _NAME.match(self.text, self.pos, self.end)
        if m:
            return self.parameter(m, start)
        raise self.fail(f"unexpected {c!r}: a fetch arg starts with %, @, $, +, -, \\ or a parameter name")

    def struct_offset(self, path: re.Match) -> int:
        types = self.types(f"+{path.group(0)}", path.start())
        try:
            offset = types.btf.offset_of(path.group(1), path.group(2)[1:].split("."))
        except (LookupError, ValueError) as exc:  # UnknownType, UnknownMember, BtfError
            raise self.fail(str(exc), path.start()) from None
        self.pos = path.end()
        return offset

    def memory(self, start: int) -> Node:
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

    def special(self, start: int) -> Node | typed.Typed:
        m = _SPECIAL.match(self.text, self.pos, self.end)
        if not m:
            raise self.fail("expected $stack, $stackN, $argN, $comm, $pid, $tid or $current")
        self.pos = m.end()
        what, n = m.group(1), m.group(2)
        if what == "stack":
            return StackEntry(int(n)) if n else StackPointer()
        if what == "arg" and n and int(n) >= 1:
            index = int(n)
            ctype = typed.argument_type(self.env.types, self.env.function, index)
            if ctype is None and self.env.types is None and self.text.startswith(("->", "."), self.pos):
                self.types(f"$arg{index}{self.text[self.pos:self.pos + 2]}", self.pos)
            return typed.Typed(Arg(index), ctype, False, text=f"$arg{index}") if ctype is not None else Arg(index)
        if what == "arg":
            raise self.fail("$arg needs a number from 1", start)
        if what in ("comm", "pid", "tid") and not n:
            return self.task_field(what, start)
        if what == "current" and not n:
            return self.current_task(start)
        if what == "retval" and not n:
            if not self.env.retprobe:
                raise self.fail("$retval is only for return probes (probectl add -r)", start)
            return RetVal()
        raise self.fail(f"${what}{n} is not available for guest probes", start)

    def current_pointer(self, what: str, start: int) -> tuple[Any, Node]:
        """(the types, the location of this CPU's `current_task` pointer: %gs_base + its per-CPU offset)."""
        types = self.types(f"${what}", start)
        current = types.current
        if current is None:
            raise self.fail(f"${what}: cannot find the current task: {types.current_error}", start)
        wanted = current.user_register if self.env.user else current.register
        try:
            register = self.arch.resolve_register(wanted)
        except KeyError:
            raise self.fail(f"${what}: the target reports no {wanted} register", start) from None
        return types, Deref(current.percpu_offset, Reg(register))

    def task_field(self, what: str, start: int) -> Node:
        """`$comm`, `$pid` (the thread group: what ps shows), `$tid`: fields of the CPU's current task."""
        types, task = self.current_pointer(what, start)
        current = types.current
        offset = {"comm": current.comm, "pid": current.tgid, "tid": current.pid}[what]
        return Deref(offset, task)

    def current_task(self, start: int) -> typed.Typed:
        """`$current`: the CPU's task as a `struct task_struct *`, for `$current->member` chains."""
        types, task = self.current_pointer("current", start)
        pointer = types.btf.pointer_to(types.btf.struct("task_struct"))
        if pointer is None:
            raise self.fail("$current: the kernel's BTF has no struct task_struct *", start)
        return typed.Typed(task, pointer, True, text="$current")

    def parameter(self, m: re.Match, start: int) -> typed.Typed:
        name = m.group(0)
        self.pos = m.end()
        types = self.types(f"the parameter name {name!r}", start)
        if not self.env.at_entry:
            raise self.fail(f"{name!r}: parameters by name only at a function's entry (offset 0); use a "
                            "register there", start)
        try:
            return typed.parameter(types, self.env.function, name, Arg)
        except typed.TypeProblem as exc:
            raise self.typed(exc, start) from None


def _split_type(text: str, start: int) -> int:
    """Index of the `:` that starts the type (outside parentheses and string immediates), or -1."""
    if text.startswith('\\"', start):
        close = text.find('"', start + 2)
        tail = text.find(":", close + 1) if close >= 0 else -1
        return tail
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


def _parse_type(text: str, colon: int, word: int) -> FieldType:
    tm = _TYPE.match(text[colon + 1 :])
    if not tm:
        raise FetchSyntaxError(text, colon + 2, f"unknown type {text[colon + 1:]!r} ({_TYPES_HELP})")
    count = int(tm.group("n")) if tm.group("n") else None
    if count is not None and not 1 <= count <= 1024:
        raise FetchSyntaxError(text, colon + 2, "array length must be 1..1024")
    if tm.group("int"):
        return FieldType(tm.group("int"), int(tm.group("bits")) // 8, count)
    if tm.group("bw"):
        width, shift, container = int(tm.group("bw")), int(tm.group("bo")), int(tm.group("bc"))
        if container not in (8, 16, 32, 64) or not 1 <= width or shift + width > container:
            raise FetchSyntaxError(text, colon + 2, "a bitfield is b<width>@<offset>/<container> with container "
                                   "8, 16, 32 or 64 and width + offset within it")
        if count is not None:
            raise FetchSyntaxError(text, colon + 2, "arrays of bitfields are not supported")
        return FieldType("bitfield", container // 8, None, width, shift)
    other = tm.group("other")
    if other in ("symbol", "symstr"):
        return FieldType(other, word, count)
    if other == "char":
        return FieldType("char", 1, count)
    return FieldType(other, 0, count)


def _auto_name(body: str, position: int) -> str:
    """An unnamed field's name: `$comm`/`$pid`/`$tid` are comm/pid/tid, a parameter or member chain names
    itself (`how->flags` is how_flags), anything else is argN by position (as kprobe_events does)."""
    if body in _TASK_FIELDS:
        return body[1:]
    candidate = re.sub(r"->|\.", "_", body)
    if _NAME.match(body) and _NAME.fullmatch(candidate):
        return candidate
    return f"arg{position}"


def parse_fetcharg(text: str, position: int, arch: Any, symbols: Any = None, env: FetchEnv | None = None) -> FetchField:
    """Parse one `NAME=FETCHARG[:TYPE]`.

    Raises:
        FetchSyntaxError: with the 1-based column of the problem in `text` (TypesNeeded when it needs BTF).
    """
    env = env or FetchEnv()
    name = ""
    start = 0
    m = _NAME.match(text)
    if m and text[m.end() : m.end() + 1] == "=":
        name, start = m.group(0), m.end() + 1
    elif "=" in text.split("(")[0] and not text.startswith(("+", "-", "%", "@", "$", "\\")):
        raise FetchSyntaxError(text, 1, "a field name is a C identifier")
    colon = _split_type(text, start)
    end = colon if colon >= 0 else len(text)
    parser = _Parser(text, start, end, arch, symbols, env)
    value = parser.fetcharg()
    if parser.pos != end:
        raise parser.fail("unexpected text after the fetch arg")
    body = text[start:end]
    name = name or _auto_name(body, position)
    word = arch.word_size
    node = value.node if isinstance(value, typed.Typed) else value
    if colon >= 0:
        ftype = _parse_type(text, colon, word)
        if body == "$comm" and ftype != _TASK_FIELDS["$comm"]:
            raise FetchSyntaxError(text, colon + 2, "$comm is a string; any other type is invalid")
        if isinstance(value, typed.Typed) and ftype.is_string and ftype.count is None:
            try:
                node = typed.string_node(env.types, value, Deref)
            except typed.TypeProblem as exc:
                raise FetchSyntaxError(text, colon + 2, str(exc)) from None
    elif isinstance(value, typed.Typed):
        try:
            ftype = typed.default_type(env.types, value, FieldType, word)
        except typed.TypeProblem as exc:
            raise FetchSyntaxError(text, start + 1, str(exc)) from None
    elif isinstance(node, StrImm):
        ftype = FieldType("string", 0, None)
    else:
        ftype = _TASK_FIELDS.get(body, FieldType("x", word, None))
    if isinstance(node, StrImm) and not ftype.is_string:
        raise FetchSyntaxError(text, colon + 2, "a string immediate is a string; any other type is invalid")
    if ftype.count is not None and not isinstance(node, Memory | Deref | StackEntry):
        raise FetchSyntaxError(text, start + 1, "an array needs a memory fetch arg (@ADDR or +OFF(...))")
    if ftype.kind == "bitfield" and not isinstance(node, Memory | Deref | StackEntry):
        raise FetchSyntaxError(text, start + 1, "a bitfield needs a memory fetch arg (@ADDR or +OFF(...))")
    return FetchField(name, node, ftype, text)


def parse_fetchargs(args: Sequence[str], arch: Any, symbols: Any = None, env: FetchEnv | None = None) -> FetchProgram:
    """Parse a handler's fetch args.

    Args:
        args: `NAME=FETCHARG[:TYPE]` or `FETCHARG[:TYPE]` strings (unnamed ones become `argN`, N its position;
            `$arg*` stands for every parameter of the function, by name).
        arch: register names, word size and calling convention of the target.
        symbols: resolves `@SYM`; None if no symbol files are loaded.
        env: the probed function and the kernel's types, for `$comm`, parameter names and member chains.

    Returns:
        The program; its `fields` are the names in argument order.

    Raises:
        FetchSyntaxError: the first arg that does not parse (its text and column), or a repeated name;
            TypesNeeded (a subclass) when an arg needs the kernel's types and `env` has none.
    """
    env = env or FetchEnv()
    fields = []
    seen: set[str] = set()
    expanded: list[str] = []
    for text in args:
        if text == "$arg*":
            types = _Parser(text, 0, len(text), arch, symbols, env).types("$arg*", 0)
            proto = types.params(env.function) if env.function else None
            if proto is None:
                raise FetchSyntaxError(text, 1, f"$arg*: the kernel's BTF has no prototype for {env.function}")
            expanded += [p.name for p in proto[1] if p.name]
        else:
            expanded.append(text)
    for i, text in enumerate(expanded, start=1):
        f = parse_fetcharg(text, i, arch, symbols, env)
        if f.name in seen:
            raise FetchSyntaxError(text, 1, f"field {f.name!r} appears twice")
        seen.add(f.name)
        fields.append(f)
    return FetchProgram(tuple(fields), arch)
