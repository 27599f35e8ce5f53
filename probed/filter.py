"""Hit filters (`--if EXPR`) over fetched field names; parsed by hand, never evaluated as Python.

    expr   := or
    or     := and ('||' and)*
    and    := unary ('&&' unary)*
    unary  := '!' unary | '(' or ')' | cmp
    cmp    := operand (('==' | '!=' | '<' | '<=' | '>' | '>=' | '~') operand)?
    operand:= FIELD | INTEGER | "STRING"

`~` matches a string against a glob (`filename ~ "/etc/*"`). A field whose fetch failed (a `<fault ...>`
value) makes every comparison on it false. Hex strings (`x` types) compare as numbers.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from .errors import FilterSyntaxError

__all__ = ["Filter", "parse_filter"]

_TOKEN = re.compile(
    r"\s*(?:(?P<op>==|!=|<=|>=|&&|\|\||[<>~!()])|(?P<num>-?0[xX][0-9a-fA-F]+|-?\d+)"
    r"|(?P<str>\"(?:[^\"\\]|\\.)*\")|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)
_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    col: int


def _tokenize(expr: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            col = len(expr[pos:]) - len(expr[pos:].lstrip()) + pos + 1
            raise FilterSyntaxError(expr, col, f"unexpected {expr[col - 1]!r}")
        kind = m.lastgroup
        start = m.start(kind)
        toks.append(_Tok(kind, m.group(kind), start + 1))
        pos = m.end()
    toks.append(_Tok("end", "", len(expr) + 1))
    return toks


class _Parser:
    def __init__(self, expr: str, fields: set[str]):
        self.expr, self.fields = expr, fields
        self.toks = _tokenize(expr)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, tok: _Tok, reason: str) -> FilterSyntaxError:
        return FilterSyntaxError(self.expr, tok.col, reason)

    def parse(self):
        node = self.or_()
        if self.peek().kind != "end":
            raise self.fail(self.peek(), f"unexpected {self.peek().text!r}")
        return node

    def or_(self):
        node = self.and_()
        while self.peek().text == "||":
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self):
        node = self.unary()
        while self.peek().text == "&&":
            self.take()
            node = ("and", node, self.unary())
        return node

    def unary(self):
        tok = self.peek()
        if tok.text == "!":
            self.take()
            return ("not", self.unary())
        if tok.text == "(":
            self.take()
            node = self.or_()
            if self.peek().text != ")":
                raise self.fail(self.peek(), "expected )")
            self.take()
            return node
        left = self.operand()
        op = self.peek()
        if op.text in _CMP or op.text == "~":
            self.take()
            right = self.operand()
            if op.text == "~" and right[0] != "str":
                raise self.fail(op, "~ needs a glob string on its right")
            return ("cmp", op.text, left, right)
        if left[0] != "field":
            raise self.fail(op, "expected a comparison")
        return ("truth", left)

    def operand(self):
        tok = self.take()
        if tok.kind == "num":
            return ("num", int(tok.text, 0))
        if tok.kind == "str":
            return ("str", bytes(tok.text[1:-1], "utf-8").decode("unicode_escape"))
        if tok.kind == "name":
            if tok.text not in self.fields:
                known = ", ".join(sorted(self.fields)) or "none"
                raise self.fail(tok, f"unknown field {tok.text!r} (fields: {known})")
            return ("field", tok.text)
        raise self.fail(tok, "expected a field, a number or a string" if tok.kind != "end" else "unexpected end")


class Filter:
    """A parsed filter; `matches(values)` says whether a hit is reported."""

    def __init__(self, expr: str, tree: Any):
        self.expr = expr
        self._tree = tree

    def matches(self, values: Mapping[str, Any]) -> bool:
        return bool(self._eval(self._tree, values))

    def _operand(self, node, values):
        kind, v = node
        if kind != "field":
            return v
        value = values.get(v)
        if isinstance(value, str):
            if value.startswith("<fault"):
                raise _Missing
            if value.startswith("0x"):
                try:
                    return int(value, 16)
                except ValueError:
                    return value
        if value is None:
            raise _Missing
        return value

    def _eval(self, node, values) -> bool:
        tag = node[0]
        if tag == "or":
            return self._eval(node[1], values) or self._eval(node[2], values)
        if tag == "and":
            return self._eval(node[1], values) and self._eval(node[2], values)
        if tag == "not":
            return not self._eval(node[1], values)
        try:
            if tag == "truth":
                return bool(self._operand(node[1], values))
            _, op, left, right = node
            a, b = self._operand(left, values), self._operand(right, values)
            if op == "~":
                return isinstance(a, str) and fnmatchcase(a, b)
            if isinstance(a, str) != isinstance(b, str):
                return False
            return _CMP[op](a, b)
        except _Missing:
            return False

    def __repr__(self) -> str:
        return f"Filter({self.expr!r})"


class _Missing(Exception):
    pass


def parse_filter(expr: str, fields: Iterable[str]) -> Filter:
    """Parse a filter over the given field names.

    Raises:
        FilterSyntaxError: with the 1-based column.
    """
    return Filter(expr, _Parser(expr, set(fields)).parse())
