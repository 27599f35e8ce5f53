"""Hit filters (`--if EXPR`) over fetched field names; parsed by hand, never evaluated as Python.

    expr    := and ('||' and)*
    and     := unary ('&&' unary)*
    unary   := '!' unary | '(' expr ')' | compare
    compare := operand (('==' | '!=' | '<' | '<=' | '>' | '>=' | '~') operand)?
    operand := FIELD | INTEGER | "STRING"

INTEGER is decimal or 0x hex, optionally negative. STRING takes the escapes \\" \\\\ \\n \\t.
`~` matches a string against a glob (`name ~ "/etc/*"`). A bare field is true when it is non-zero / non-empty.

Values come from a fetch program: ints (`u`/`s` types), "0x..." strings (`x` types, compared as numbers
against integers), strings, symbol names, lists (arrays: unequal to any scalar). A field whose fetch failed
(a `<fault ...>` value) or is absent makes every comparison on it false, and a bare test of it false.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from probed.errors import FilterSyntaxError
from probed.lang.fetch import Unfetched

__all__ = ["Filter", "parse_filter"]

_TOKEN = re.compile(
    r"(?P<op>==|!=|<=|>=|&&|\|\||[<>~!()])"
    r"|(?P<num>-?0[xX][0-9a-fA-F]+|-?\d+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<str>\")"
)
MAX_NESTING = 100  # parentheses; deeper is refused with the column rather than recursing without end
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


@dataclass(frozen=True)
class _Token:
    kind: str  # "op", "num", "name", "str", "end"
    text: str  # for "str": the unescaped value
    column: int  # 1-based


def _read_string(expr: str, start: int) -> tuple[str, int]:
    """The string literal whose opening quote is at `start`: (its value, the index after the closing quote)."""
    out = []
    i = start + 1
    while i < len(expr):
        ch = expr[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            escaped = expr[i + 1 : i + 2]
            if escaped not in _ESCAPES:
                raise FilterSyntaxError(expr, i + 1, 'unknown escape (use \\" \\\\ \\n \\t)')
            out.append(_ESCAPES[escaped])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise FilterSyntaxError(expr, start + 1, "unterminated string")


def _tokenize(expr: str) -> list[_Token]:
    tokens = []
    pos = 0
    while True:
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
        if pos == len(expr):
            break
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise FilterSyntaxError(expr, pos + 1, f"unexpected {expr[pos]!r}")
        kind = m.lastgroup or ""
        if kind == "str":
            value, pos_after = _read_string(expr, pos)
            tokens.append(_Token("str", value, pos + 1))
            pos = pos_after
            continue
        tokens.append(_Token(kind, m.group(0), pos + 1))
        pos = m.end()
    tokens.append(_Token("end", "", len(expr) + 1))
    return tokens


# -- the syntax tree ----------------------------------------------------------------------------------


class _Unknown(Exception):
    """A field with no usable value (its fetch failed, or it is absent)."""


@dataclass(frozen=True)
class _Field:
    name: str

    def value(self, values: Mapping[str, Any]) -> Any:
        value = values.get(self.name)
        if value is None or isinstance(value, Unfetched):
            raise _Unknown
        return value


@dataclass(frozen=True)
class _Literal:
    literal: int | str

    def value(self, values: Mapping[str, Any]) -> Any:
        return self.literal


def _as_number(value: Any) -> int | None:
    """An int, or an `x`-type "0x..." string, as a number; None for anything else."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class _Compare:
    op: str
    left: _Field | _Literal
    right: _Field | _Literal

    def test(self, values: Mapping[str, Any]) -> bool:
        try:
            a, b = self.left.value(values), self.right.value(values)
        except _Unknown:
            return False
        if self.op == "~":
            return isinstance(a, str) and isinstance(b, str) and fnmatchcase(a, b)
        if isinstance(a, str) and isinstance(b, str):
            return _COMPARE[self.op](a, b)
        # A number against an `x` field ("0x1f") compares numerically; values that are not both numbers
        # (a string and an int, an array and anything) are unequal and unordered.
        na, nb = _as_number(a), _as_number(b)
        if na is None or nb is None:
            return self.op == "!="
        return _COMPARE[self.op](na, nb)


@dataclass(frozen=True)
class _Truth:
    operand: _Field

    def test(self, values: Mapping[str, Any]) -> bool:
        try:
            value = self.operand.value(values)
        except _Unknown:
            return False
        number = _as_number(value)
        return bool(number if number is not None else value)


@dataclass(frozen=True)
class _Not:
    inner: Any

    def test(self, values: Mapping[str, Any]) -> bool:
        return not self.inner.test(values)


@dataclass(frozen=True)
class _And:
    # Flat, not a left-deep tree: `a && b && ...` thousands long must not recurse once per operator.
    items: tuple[Any, ...]

    def test(self, values: Mapping[str, Any]) -> bool:
        return all(item.test(values) for item in self.items)


@dataclass(frozen=True)
class _Or:
    items: tuple[Any, ...]

    def test(self, values: Mapping[str, Any]) -> bool:
        return any(item.test(values) for item in self.items)


# -- parsing ------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, expr: str, fields: set[str]):
        self.expr = expr
        self.fields = fields
        self.used: list[str] = []  # the fields the expression names, in order
        self.tokens = _tokenize(expr)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def fail(self, token: _Token, reason: str) -> FilterSyntaxError:
        return FilterSyntaxError(self.expr, token.column, reason)

    def parse(self) -> Any:
        node = self.or_expr()
        end = self.peek()
        if end.kind != "end":
            raise self.fail(end, f"unexpected {end.text!r} (expected &&, || or the end)")
        return node

    def or_expr(self) -> Any:
        items = [self.and_expr()]
        while self.peek().text == "||" and self.peek().kind == "op":
            self.take()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else _Or(tuple(items))

    def and_expr(self) -> Any:
        items = [self.unary()]
        while self.peek().text == "&&" and self.peek().kind == "op":
            self.take()
            items.append(self.unary())
        return items[0] if len(items) == 1 else _And(tuple(items))

    def unary(self) -> Any:
        token = self.peek()
        if token.kind == "op" and token.text == "!":
            # A run of `!` folds to one (or none): no recursion per `!`, however many.
            negate = False
            while self.peek().kind == "op" and self.peek().text == "!":
                self.take()
                negate = not negate
            inner = self.unary()
            return _Not(inner) if negate else inner
        if token.kind == "op" and token.text == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.fail(token, f"parentheses nested more than {MAX_NESTING} deep")
            self.take()
            node = self.or_expr()
            close = self.peek()
            if close.kind != "op" or close.text != ")":
                raise self.fail(close, "expected )")
            self.take()
            self.depth -= 1
            return node
        left = self.operand()
        op = self.peek()
        if op.kind == "op" and (op.text in _COMPARE or op.text == "~"):
            self.take()
            right = self.operand()
            if op.text == "~" and not (isinstance(right, _Literal) and isinstance(right.literal, str)):
                raise self.fail(op, '~ needs a glob string on its right, e.g. name ~ "/etc/*"')
            return _Compare(op.text, left, right)
        if not isinstance(left, _Field):
            raise self.fail(op, "expected a comparison operator after a literal")
        return _Truth(left)

    def operand(self) -> _Field | _Literal:
        token = self.take()
        if token.kind == "num":
            return _Literal(_number(token.text))
        if token.kind == "str":
            return _Literal(token.text)
        if token.kind == "name":
            if token.text not in self.fields:
                known = ", ".join(sorted(self.fields)) or "none"
                raise self.fail(token, f"unknown field {token.text!r} (fields: {known})")
            if token.text not in self.used:
                self.used.append(token.text)
            return _Field(token.text)
        if token.kind == "end":
            raise self.fail(token, "unexpected end (expected a field, a number or a string)")
        raise self.fail(token, f"unexpected {token.text!r} (expected a field, a number or a string)")


class Filter:
    """A parsed filter expression."""

    def __init__(self, expr: str, tree: Any, fields: Iterable[str] = ()):
        self.expr = expr
        self._tree = tree
        self.fields = tuple(fields)  # the fields it names

    def matches(self, values: Mapping[str, Any]) -> bool:
        """Whether a hit with these fetched values passes.

        Args:
            values: field name to fetched value, as `FetchProgram.evaluate` returns them.

        Returns:
            True to report the hit.
        """
        return self._tree.test(values)

    def unknown_fields(self, values: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The fields this filter uses that were not fetched on this hit, with why (a filter over them is
        false: an unreadable value is never compared as a string)."""
        return [(name, str(values[name])) for name in self.fields if isinstance(values.get(name), Unfetched)]

    def __repr__(self) -> str:
        return f"Filter({self.expr!r})"


def parse_filter(expr: str, fields: Iterable[str]) -> Filter:
    """Parse a filter over the given field names.

    Args:
        expr: the expression, e.g. `dfd == -100 && name ~ "/etc/*"`.
        fields: the names it may use (a handler's fetch fields).

    Returns:
        The filter.

    Raises:
        FilterSyntaxError: with the 1-based column of the problem.
    """
    parser = _Parser(expr, set(fields))
    return Filter(expr, parser.parse(), parser.used)


def _number(text: str) -> int:
    """A decimal literal (leading zeros stay decimal, not octal) or a 0x hex one."""
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    value = int(digits, 16) if digits.lower().startswith("0x") else int(digits, 10)
    return -value if negative else value
