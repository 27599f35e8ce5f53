"""The kernel's BTF (BPF Type Format): struct layouts, members and function prototypes, read from raw bytes.

Why a parser of our own rather than drgn: drgn 0.3.0 (the PyPI wheel installs and imports under Python 3.11
here) reads types from DWARF only; its kallsyms helpers expect "an alternative type information source" and
its shared library carries no BTF reader at all. Its memory readers are synchronous callbacks, which the
engine (trio, reads batched while the guest is stopped) would have to bridge through a thread. What probes
need from BTF is small: find a struct or function by name, walk members (bitfields, anonymous unions), strip
typedefs and qualifiers, know a type's size and sign. The format is simple and stable (a header, a type
section of fixed-shape records, a string section), so ~300 lines cover it with no native dependency.

Format (include/uapi/linux/btf.h): header {magic 0xeb9f u16, version u8, flags u8, hdr_len u32, type_off,
type_len, str_off, str_len u32}; each type is {name_off u32, info u32 (vlen bits 0-15, kind bits 24-28,
kind_flag bit 31), size-or-type u32} followed by kind-specific data. Type ids count from 1; 0 is void.
"""

from __future__ import annotations

import difflib
import struct
from array import array
from dataclasses import dataclass

__all__ = ["Btf", "BtfError", "Member", "Param", "Type", "UnknownMember", "UnknownType"]

MAGIC = 0xEB9F
# Kinds, by number.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
KIND_NAMES = {
    INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct", UNION: "union", ENUM: "enum", FWD: "fwd",
    TYPEDEF: "typedef", VOLATILE: "volatile", CONST: "const", RESTRICT: "restrict", FUNC: "func",
    FUNC_PROTO: "func_proto", VAR: "var", DATASEC: "datasec", FLOAT: "float", DECL_TAG: "decl_tag",
    TYPE_TAG: "type_tag", ENUM64: "enum64",
}
_QUALIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})
_INT_SIGNED, _INT_CHAR, _INT_BOOL = 1, 2, 4
# Bytes of kind-specific data after the 12-byte record: fixed, or per vlen item.
_EXTRA_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_EXTRA_PER_ITEM = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}


class BtfError(ValueError):
    """The bytes are not BTF this parser reads (bad magic, truncated sections, unknown kind)."""


class UnknownType(LookupError):
    """No struct/union/typedef/function of that name; `suggestions` are close names."""

    def __init__(self, what: str, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"the kernel's BTF has no {what} {name!r}{hint}")


class UnknownMember(LookupError):
    """A member the struct does not have; the message names the struct and its closest fields."""

    def __init__(self, struct_name: str, member: str, suggestions: list[str], fields: list[str] | None = None):
        self.struct_name = struct_name
        self.member = member
        self.suggestions = suggestions
        if suggestions:
            hint = f"; closest fields: {', '.join(suggestions)}"
        elif fields:  # nothing close: show what there is
            hint = f"; its fields: {', '.join(fields[:10])}{', ...' if len(fields) > 10 else ''}"
        else:
            hint = ""
        super().__init__(f"{struct_name} has no member {member!r}{hint}")


@dataclass(frozen=True)
class Type:
    """One BTF type record.

    Attributes:
        id: its type id.
        kind: one of the kind numbers (INT, PTR, STRUCT, ...).
        name: "" when anonymous.
        size: bytes (INT, STRUCT, UNION, ENUM, FLOAT, DATASEC), else 0.
        ref: the type referred to (PTR, TYPEDEF, qualifiers, FUNC -> its FUNC_PROTO, FUNC_PROTO's return,
            ARRAY's element type, VAR's type), else 0.
        vlen: number of members/params/enumerators.
        kind_flag: for STRUCT/UNION, member offsets carry bitfield sizes; for ENUM, values are signed.
        offset: where its record starts in the type section (members follow it).
    """

    id: int
    kind: int
    name: str
    size: int
    ref: int
    vlen: int
    kind_flag: bool
    offset: int


@dataclass(frozen=True)
class Member:
    """A struct or union member: `bit_offset` from the start of the outermost struct asked about."""

    name: str
    type: int
    bit_offset: int
    bitfield_size: int  # 0: not a bitfield


@dataclass(frozen=True)
class Param:
    """A function parameter: its name ("" when BTF has none) and type id."""

    name: str
    type: int


class Btf:
    """Parsed BTF: types by id and by name, decoded on demand.

    Args:
        data: the raw blob (`/sys/kernel/btf/vmlinux`, or kernel memory from `__start_BTF` to `__stop_BTF`).

    Raises:
        BtfError: not little-endian BTF version 1, or cut short.
    """

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError(f"{len(data)} bytes is too short for a BTF header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"bad BTF magic {magic:#06x} (expected {MAGIC:#06x}, little-endian)")
        if version != 1:
            raise BtfError(f"BTF version {version} (this reader knows version 1)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        base = hdr_len
        if base + max(type_off + type_len, str_off + str_len) > len(data):
            raise BtfError(f"BTF sections end past the blob's {len(data)} bytes")
        self._types = data[base + type_off : base + type_off + type_len]
        self._strings = data[base + str_off : base + str_off + str_len]
        self.size = len(data)
        self._offsets = array("I", [0])  # by id; id 0 (void) has no record
        self._pointers: dict[int, int] | None = None  # pointee id -> a PTR type id, built on first use
        self._by_name: dict[str, list[int]] = {}
        self._scan()

    def _scan(self) -> None:
        """One pass over the type section: where each record starts, and names to ids."""
        types, offsets, by_name = self._types, self._offsets, self._by_name
        unpack = struct.Struct("<III").unpack_from
        pos, end, type_id = 0, len(types), 1
        while pos < end:
            name_off, info, _ = unpack(types, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            offsets.append(pos)
            if name_off:
                by_name.setdefault(self._string(name_off), []).append(type_id)
            if kind in _EXTRA_PER_ITEM:
                pos += 12 + vlen * _EXTRA_PER_ITEM[kind]
            elif kind in _EXTRA_FIXED:
                pos += 12 + _EXTRA_FIXED[kind]
            elif kind in KIND_NAMES:
                pos += 12
            else:
                raise BtfError(f"unknown BTF kind {kind} at type {type_id} (offset {pos})")
            type_id += 1
        if pos != end:
            raise BtfError("the BTF type section ends inside a record")

    def _string(self, offset: int) -> str:
        end = self._strings.index(b"\0", offset)
        return self._strings[offset:end].decode("utf-8", errors="replace")

    @property
    def count(self) -> int:
        """How many types there are (ids 1..count)."""
        return len(self._offsets) - 1

    # -- records -------------------------------------------------------------------------------------

    def type(self, type_id: int) -> Type:
        """The record of a type id (0 is void: kind 0, size 0)."""
        if type_id == 0:
            return Type(0, 0, "void", 0, 0, 0, False, -1)
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"type id {type_id} out of range (1..{self.count})")
        pos = self._offsets[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._types, pos)
        kind = (info >> 24) & 0x1F
        sized = kind in (INT, STRUCT, UNION, ENUM, FLOAT, DATASEC, ENUM64)
        ref = 0 if sized else size_or_type
        if kind == ARRAY:
            ref = struct.unpack_from("<I", self._types, pos + 12)[0]
        return Type(type_id, kind, self._string(name_off) if name_off else "", size_or_type if sized else 0,
                    ref, info & 0xFFFF, bool(info >> 31), pos)

    def ids(self, name: str, kind: int | None = None) -> list[int]:
        """Type ids with this name (of this kind, if given)."""
        found = self._by_name.get(name, [])
        return [i for i in found if kind is None or self.type(i).kind == kind]

    def pointer_to(self, type_id: int) -> int | None:
        """A pointer type to `type_id` (e.g. `struct task_struct *`), or None if BTF has none."""
        if self._pointers is None:
            self._pointers = {}
            for i in range(1, len(self._offsets)):
                _name, info, ref = struct.unpack_from("<III", self._types, self._offsets[i])
                if (info >> 24) & 0x1F == PTR:
                    self._pointers.setdefault(ref, i)
        return self._pointers.get(type_id)

    def offset_of(self, struct_name: str, path: list[str]) -> int:
        """Bytes from the start of `struct_name` to the member `path` (`["f_path", "dentry"]`), through
        embedded structs and unions.

        Raises:
            UnknownType, UnknownMember; BtfError for a bitfield or a path through a non-struct.
        """
        type_id, offset = self.struct(struct_name), 0
        for i, name in enumerate(path):
            if i and self.strip(type_id).kind not in (STRUCT, UNION):
                raise BtfError(f"{'.'.join([struct_name, *path[:i]])} is {self.describe(type_id)}, not a struct")
            m = self.member(type_id, name)
            if m.bitfield_size:
                raise BtfError(f"{'.'.join([struct_name, *path[: i + 1]])} is a bitfield: it has no byte offset")
            offset += m.bit_offset // 8
            type_id = m.type
        return offset

    def int_encoding(self, t: Type) -> tuple[bool, int]:
        """An INT's (signed, bits)."""
        (data,) = struct.unpack_from("<I", self._types, t.offset + 12)
        return bool((data >> 24) & _INT_SIGNED), data & 0xFF

    def array_length(self, t: Type) -> int:
        return struct.unpack_from("<I", self._types, t.offset + 20)[0]

    def strip(self, type_id: int) -> Type:
        """The type under typedefs and qualifiers (const, volatile, restrict, type tags)."""
        t = self.type(type_id)
        for _ in range(64):  # a chain of qualifiers is short; the bound guards against a cyclic blob
            if t.kind not in _QUALIFIERS:
                return t
            t = self.type(t.ref)
        raise BtfError(f"type {type_id}: typedef/qualifier chain too long")

    def size_of(self, type_id: int) -> int:
        """Bytes a value of this type occupies (pointers: 8; arrays: element size times length)."""
        t = self.strip(type_id)
        if t.kind == PTR:
            return 8
        if t.kind == ARRAY:
            return self.size_of(t.ref) * self.array_length(t)
        return t.size

    # -- structs and functions ---------------------------------------------------------------------

    def _members(self, t: Type) -> list[Member]:
        out = []
        for i in range(t.vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self._types, t.offset + 12 + 12 * i)
            bits, offset = (moff >> 24, moff & 0xFFFFFF) if t.kind_flag else (0, moff)
            out.append(Member(self._string(name_off) if name_off else "", mtype, offset, bits))
        return out

    def members(self, type_id: int) -> list[Member]:
        """A struct's or union's members in order, anonymous ones included as they are (name "")."""
        t = self.strip(type_id)
        if t.kind not in (STRUCT, UNION):
            raise BtfError(f"{self.describe(type_id)} is not a struct or union")
        return self._members(t)

    def member(self, type_id: int, name: str) -> Member:
        """A member by name, looking into anonymous structs and unions as C does.

        Returns:
            The member, its `bit_offset` counted from the start of `type_id`.

        Raises:
            UnknownMember: naming the struct and its closest fields.
        """
        found = self._find_member(type_id, name, 0, 0)
        if found is None:
            names = self.member_names(type_id)
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
            raise UnknownMember(self.describe(type_id), name, close, names)
        return found

    def _find_member(self, type_id: int, name: str, base: int, depth: int) -> Member | None:
        if depth > 32:
            return None
        for m in self.members(type_id):
            if m.name == name:
                return Member(m.name, m.type, base + m.bit_offset, m.bitfield_size)
            if not m.name and self.strip(m.type).kind in (STRUCT, UNION):
                inner = self._find_member(m.type, name, base + m.bit_offset, depth + 1)
                if inner is not None:
                    return inner
        return None

    def member_names(self, type_id: int, depth: int = 0) -> list[str]:
        """Every name `member` accepts on this struct (anonymous members' names included)."""
        names: list[str] = []
        for m in self.members(type_id):
            if m.name:
                names.append(m.name)
            elif depth < 32 and self.strip(m.type).kind in (STRUCT, UNION):
                names += self.member_names(m.type, depth + 1)
        return names

    def struct(self, name: str) -> int:
        """A struct's (or union's) type id by name; a complete definition over a forward declaration.

        Raises:
            UnknownType: with close names.
        """
        for kind in (STRUCT, UNION):
            ids = [i for i in self.ids(name, kind) if self.type(i).vlen or self.type(i).size]
            if ids:
                return ids[0]
        pool = [n for n in self._by_name if n[:1] == name[:1]]
        raise UnknownType("struct", name, difflib.get_close_matches(name, pool, n=5, cutoff=0.6))

    def function(self, name: str) -> tuple[int, list[Param]] | None:
        """A function's (return type id, parameters), or None when BTF has no prototype for it."""
        for func in self.ids(name, FUNC):
            proto = self.type(self.type(func).ref)
            if proto.kind != FUNC_PROTO:
                continue
            params = []
            for i in range(proto.vlen):
                name_off, ptype = struct.unpack_from("<II", self._types, proto.offset + 12 + 8 * i)
                params.append(Param(self._string(name_off) if name_off else "", ptype))
            if params and params[-1].type == 0 and not params[-1].name:
                params.pop()  # "..." of a variadic function
            return proto.ref, params
        return None

    # -- names -----------------------------------------------------------------------------------

    def describe(self, type_id: int, depth: int = 0) -> str:
        """The type as C spells it: `struct file *`, `const char *`, `umode_t`, `char[16]`."""
        t = self.type(type_id)
        if depth > 16:
            return "..."
        if t.kind == 0:
            return "void"
        if t.kind == PTR:
            return self.describe(t.ref, depth + 1) + " *"
        if t.kind in (CONST, VOLATILE, RESTRICT):
            return f"{KIND_NAMES[t.kind]} {self.describe(t.ref, depth + 1)}"
        if t.kind == TYPE_TAG:
            return self.describe(t.ref, depth + 1)
        if t.kind == ARRAY:
            return f"{self.describe(t.ref, depth + 1)}[{self.array_length(t)}]"
        if t.kind in (STRUCT, UNION, ENUM, ENUM64, FWD):
            word = "union" if t.kind == UNION or (t.kind == FWD and t.kind_flag) else "struct"
            word = "enum" if t.kind in (ENUM, ENUM64) else word
            return f"{word} {t.name or '(anonymous)'}"
        if t.kind == FUNC_PROTO:
            return "function"
        return t.name or KIND_NAMES.get(t.kind, "?")
