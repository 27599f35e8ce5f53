"""The daemon's errors: few, typed, each carrying what a user needs to act.

Each has a numeric `code`, used as the JSON-RPC error code on the control socket, and `data()` with the
fields a client may show (close matches of an unknown symbol, the column of a syntax error, ...).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadSpec",
    "FetchSyntaxError",
    "FilterSyntaxError",
    "NotFound",
    "ProbedError",
    "SlotsExhausted",
    "TargetError",
    "UnknownSymbol",
    "Unsupported",
]


class ProbedError(Exception):
    """Base class of the daemon's errors."""

    code = 1

    def data(self) -> dict[str, Any]:
        return {"type": type(self).__name__}


class UnknownSymbol(ProbedError):
    """No symbol by that name in the loaded symbol files."""

    code = 2

    def __init__(self, name: str, suggestions: list[str] | None = None, file: str | None = None):
        self.name = name
        self.suggestions = list(suggestions or [])
        self.file = file
        where = f" in {file}" if file else ""
        hint = f"; did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"unknown symbol {name!r}{where}{hint}")

    def data(self) -> dict[str, Any]:
        return {**super().data(), "name": self.name, "suggestions": self.suggestions}


class BadSpec(ProbedError):
    """A probe spec that cannot be used (offset past the symbol, data not code, bad number...)."""

    code = 3

    def __init__(self, spec: str, reason: str):
        self.spec = spec
        self.reason = reason
        super().__init__(f"{spec}: {reason}")

    def data(self) -> dict[str, Any]:
        return {**super().data(), "spec": self.spec, "reason": self.reason}


class _SyntaxError(ProbedError):
    what = "syntax"

    def __init__(self, text: str, column: int, reason: str):
        self.text = text
        self.column = column
        self.reason = reason
        caret = " " * (max(column, 1) - 1) + "^"
        super().__init__(f"{self.what} error at column {column}: {reason}\n  {text}\n  {caret}")

    def data(self) -> dict[str, Any]:
        return {**super().data(), "text": self.text, "column": self.column, "reason": self.reason}


class FetchSyntaxError(_SyntaxError):
    """A fetch arg that does not parse; `column` is 1-based into `text`."""

    code = 4
    what = "fetch arg"


class FilterSyntaxError(_SyntaxError):
    """A filter expression that does not parse; `column` is 1-based into `text`."""

    code = 5
    what = "filter"


class TargetError(ProbedError):
    """The target refused, failed, or is not there."""

    code = 6


class NotFound(ProbedError):
    """No such probe (or file, or other named thing)."""

    code = 7

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"no {what}")


class SlotsExhausted(ProbedError):
    """Every hardware debug-register slot is held."""

    code = 8

    def __init__(self, holders: list[str]):
        self.holders = list(holders)
        super().__init__("no free hardware debug-register slot; held by: " + "; ".join(self.holders))

    def data(self) -> dict[str, Any]:
        return {**super().data(), "holders": self.holders}


class Unsupported(ProbedError):
    """Something the target or probed does not support."""

    code = 9
