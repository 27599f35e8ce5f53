"""Fetch args with types: parameters by name, `->` and `.` member chains, and the type a field gets by default.

Types come from the kernel's BTF (probed.guest.linux); the fetch language only asks it about type ids, so
without BTF (the bundled non-Linux guests) none of this is touched. A typed value is a fetch node (the same
syntax tree `+OFF(...)` builds) plus the C type of what it denotes:

- a parameter or `$argN` is a value (in a register), of the parameter's type;
- `p->m` is the memory at p + offsetof(m): a location, of m's type (`+OFF(p)` in kprobe terms);
- `s.m` (s a struct in memory) is the location s + offsetof(m);
- a bitfield member is its container (the member's integer type, aligned), with a bit offset and width.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Any

from probed.guest.linux import btf as k  # the kind numbers only; the types themselves come with `types`

__all__ = ["TypeProblem", "Typed", "default_type", "member", "parameter", "string_node"]


class TypeProblem(Exception):
    """A typed access that cannot be done; the parser adds the column."""


@dataclass(frozen=True)
class Typed:
    """A fetch node with the C type it denotes (`ctype` a BTF type id) and, for a bitfield, its bits.

    `located`: the node is a place in memory (its value is read there); else it is a value (a register).
    """

    node: Any
    ctype: int
    located: bool
    bitfield: tuple[int, int, int] | None = None  # (width, shift, container bytes)
    text: str = ""


def parameter(types: Any, function: str | None, name: str, index_node: Any) -> Typed:
    """The parameter `name` of `function`, as `$argN` would fetch it (`index_node(N)` builds that node).

    Raises:
        TypeProblem: no prototype in BTF, or no such parameter (naming the parameters there are).
    """
    if not function:
        raise TypeProblem(f"{name!r}: a parameter name needs a probe on a function")
    proto = types.params(function)
    if proto is None:
        raise TypeProblem(f"the kernel's BTF has no prototype for {function}; fetch its arguments with $argN or %REG")
    _ret, params = proto
    names = [p.name for p in params]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TypeProblem(f"{function} has no parameter {name!r}; {hint}its parameters: {', '.join(names) or 'none'}")
    i = names.index(name)
    return Typed(index_node(i + 1), params[i].type, located=False, text=name)


def argument_type(types: Any, function: str | None, n: int) -> int | None:
    """The BTF type of `$argN` of `function`, or None when unknown."""
    if types is None or not function:
        return None
    proto = types.params(function)
    if proto is None or n > len(proto[1]):
        return None
    return proto[1][n - 1].type


def member(types: Any, value: Typed, op: str, name: str, deref: Any) -> Typed:
    """`value->name` (op "->") or `value.name` (op ".").

    Args:
        deref: builds a memory node `deref(offset, inner)` (the parser's Deref).

    Raises:
        TypeProblem: not a pointer to a struct (for ->), not a struct in memory (for .), or no such member
            (naming the struct and its closest fields).
    """
    btf = types.btf
    t = btf.strip(value.ctype)
    what = f"{value.text} is {btf.describe(value.ctype)}"
    if op == "->":
        if t.kind != k.PTR or btf.strip(t.ref).kind not in (k.STRUCT, k.UNION):
            hint = "; use '.' for a member of a struct" if t.kind in (k.STRUCT, k.UNION) else ""
            raise TypeProblem(f"'->' needs a pointer to a struct, and {what}{hint}")
        record, base, inner = t.ref, 0, value.node
    else:
        if t.kind not in (k.STRUCT, k.UNION):
            hint = "; use '->' through a pointer" if t.kind == k.PTR else ""
            raise TypeProblem(f"'.' needs a struct, and {what}{hint}")
        if not value.located or not hasattr(value.node, "offset"):
            raise TypeProblem(f"'.' needs a struct in memory, and {value.text} is a value in a register")
        record, base, inner = value.ctype, value.node.offset, value.node.inner
    try:
        m = btf.member(record, name)
    except LookupError as exc:  # UnknownMember: names the struct and its closest fields
        raise TypeProblem(str(exc)) from None
    text = f"{value.text}{op}{name}"
    if not m.bitfield_size:
        return Typed(deref(base + m.bit_offset // 8, inner), m.type, True, None, text)
    container = max(btf.size_of(m.type), 1)
    byte = (m.bit_offset // (8 * container)) * container
    if m.bit_offset - 8 * byte + m.bitfield_size > 8 * container:
        container = 8
        byte = (m.bit_offset // 64) * 8
    return Typed(deref(base + byte, inner), m.type, True, (m.bitfield_size, m.bit_offset - 8 * byte, container), text)


def default_type(types: Any, value: Typed, field_type: Any, word: int) -> Any:
    """The field type BTF gives a value nobody typed: integers by size and sign, pointers as hex words,
    char arrays as strings, other arrays element by element, bitfields as themselves.

    Raises:
        TypeProblem: a struct or union (a member must be picked), or a type with no fetchable value.
    """
    btf = types.btf
    if value.bitfield:
        width, shift, container = value.bitfield
        return field_type("bitfield", container, None, width, shift)
    t = btf.strip(value.ctype)
    if t.kind == k.INT:
        signed, bits = btf.int_encoding(t)
        return field_type("s" if signed else "u", max(bits // 8, 1), None)
    if t.kind in (k.ENUM, k.ENUM64):
        return field_type("s" if t.kind_flag else "u", t.size, None)
    if t.kind == k.PTR:
        return field_type("x", word, None)
    if t.kind == k.ARRAY and value.located:
        elem = btf.strip(t.ref)
        if _is_char(btf, elem):
            return field_type("string", 0, None)
        inner = default_type(types, Typed(value.node, t.ref, True), field_type, word)
        if inner.count is not None or inner.kind in ("string", "bitfield"):
            raise TypeProblem(f"{value.text} is {btf.describe(value.ctype)}: fetch its elements one by one")
        return replace(inner, count=max(1, min(btf.array_length(t), 1024)))
    if t.kind in (k.STRUCT, k.UNION):
        raise TypeProblem(f"{value.text} is {btf.describe(value.ctype)} ({t.size} bytes): pick a member with "
                          f"{'.' if value.located else '->'}")
    if t.kind == k.FLOAT:
        return field_type("x", t.size, None)
    raise TypeProblem(f"{value.text} is {btf.describe(value.ctype)}, which has no value to fetch")


def _is_char(btf: Any, t: Any) -> bool:
    return t.kind == k.INT and btf.int_encoding(t)[1] == 8


def string_node(types: Any, value: Typed, deref: Any) -> Any:
    """The node whose address `:string` reads: a char array where it lies, a char pointer where it points.

    Raises:
        TypeProblem: neither `char *` nor `char[]` (kprobe_events refuses the string types there too).
    """
    btf = types.btf
    t = btf.strip(value.ctype)
    if t.kind == k.ARRAY and _is_char(btf, btf.strip(t.ref)) and value.located:
        return value.node
    if t.kind == k.PTR and _is_char(btf, btf.strip(t.ref)):
        return deref(0, value.node) if value.located else value.node
    raise TypeProblem(f"{value.text} is {btf.describe(value.ctype)}: the string types need char * or char[]")
