"""A small BTF writer for tests: types with known layouts, encoded as include/uapi/linux/btf.h says."""

from __future__ import annotations

import struct

from probed.guest.linux.btf import ARRAY, CONST, ENUM, FUNC, FUNC_PROTO, FWD, INT, PTR, STRUCT, TYPEDEF, UNION


class BtfBuilder:
    """Add types (each call returns the new type id), then `blob()`."""

    def __init__(self):
        self._types: list[bytes] = []
        self._strings = bytearray(b"\0")

    def _name(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self._strings)
        self._strings += name.encode() + b"\0"
        return offset

    def _add(self, kind: int, name: str, size_or_type: int, vlen: int = 0, kflag: bool = False, extra: bytes = b"") -> int:
        info = (kind << 24) | vlen | (int(kflag) << 31)
        self._types.append(struct.pack("<III", self._name(name), info, size_or_type) + extra)
        return len(self._types)

    def int(self, name: str, size: int, signed: bool = False, char: bool = False) -> int:
        encoding = (1 if signed else 0) | (2 if char else 0)
        return self._add(INT, name, size, extra=struct.pack("<I", (encoding << 24) | (size * 8)))

    def ptr(self, to: int) -> int:
        return self._add(PTR, "", to)

    def const(self, of: int) -> int:
        return self._add(CONST, "", of)

    def typedef(self, name: str, of: int) -> int:
        return self._add(TYPEDEF, name, of)

    def array(self, elem: int, length: int, index: int) -> int:
        return self._add(ARRAY, "", 0, extra=struct.pack("<III", elem, index, length))

    def fwd(self, name: str) -> int:
        return self._add(FWD, name, 0)

    def struct(self, name: str, size: int, members: list[tuple[str, int, int, int]], union: bool = False) -> int:
        """members: (name, type, bit offset, bitfield size or 0)."""
        kflag = any(bits for *_, bits in members)
        extra = b"".join(
            struct.pack("<III", self._name(n), t, (bits << 24 | off) if kflag else off) for n, t, off, bits in members)
        return self._add(UNION if union else STRUCT, name, size, len(members), kflag, extra)

    def enum(self, name: str, size: int, values: list[tuple[str, int]], signed: bool = False) -> int:
        extra = b"".join(struct.pack("<Ii", self._name(n), v) for n, v in values)
        return self._add(ENUM, name, size, len(values), signed, extra)

    def function(self, name: str, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<II", self._name(n), t) for n, t in params)
        proto = self._add(FUNC_PROTO, "", ret, len(params), extra=extra)
        return self._add(FUNC, name, proto, 1)

    def blob(self) -> bytes:
        types = b"".join(self._types)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self._strings))
        return header + types + bytes(self._strings)


def model_kernel() -> bytes:
    """A small kernel's types with known layouts (offsets in the comments are bytes).

    struct open_how { __u64 flags @0; __u64 mode @8; __u64 resolve @16; }                      (24 bytes)
    struct inner { int x @0; const char *name @8; }                                             (16 bytes)
    struct task_struct { unsigned int __state @0; pid_t pid @4; pid_t tgid @8;
        union { unsigned int a; unsigned short b; } @12;
        unsigned int in_exec:1 @bit 128; unsigned int prio:5 @bit 129; unsigned int spill:6 @bit 158;
        char comm[16] @32; struct inner in @48; struct task_struct *parent @64; }              (72 bytes)
    long do_open(int dfd, const char *filename, struct open_how *how);
    void wake(struct task_struct *p);  void *no_names(int, int);
    """
    b = BtfBuilder()
    int_ = b.int("int", 4, signed=True)
    uint = b.int("unsigned int", 4)
    ushort = b.int("short unsigned int", 2)
    u64 = b.int("long long unsigned int", 8)
    long = b.int("long int", 8, signed=True)
    char = b.int("char", 1, char=True)
    t_u64 = b.typedef("__u64", u64)
    pid_t = b.typedef("pid_t", int_)
    const_char_p = b.ptr(b.const(char))
    how = b.struct("open_how", 24, [("flags", t_u64, 0, 0), ("mode", t_u64, 64, 0), ("resolve", t_u64, 128, 0)])
    union = b.struct("", 4, [("a", uint, 0, 0), ("b", ushort, 0, 0)], union=True)
    inner = b.struct("inner", 16, [("x", int_, 0, 0), ("name", const_char_p, 64, 0)])
    comm = b.array(char, 16, int_)
    b.fwd("task_struct")  # a declaration before the definition, as vmlinux BTF has them
    task_id = inner + 3  # the ids that follow inner: the comm array, the declaration, this struct
    task = b.struct("task_struct", 72, [
        ("__state", uint, 0, 0), ("pid", pid_t, 32, 0), ("tgid", pid_t, 64, 0), ("", union, 96, 0),
        ("in_exec", uint, 128, 1), ("prio", uint, 129, 5), ("spill", uint, 158, 6),
        ("comm", comm, 256, 0), ("in", inner, 384, 0), ("parent", task_id + 1, 512, 0)])
    assert task == task_id
    task_p = b.ptr(task)
    b.function("do_open", long, [("dfd", int_), ("filename", const_char_p), ("how", b.ptr(how))])
    b.function("wake", 0, [("p", task_p)])
    b.function("no_names", b.ptr(0), [("", int_), ("", int_)])
    b.enum("pid_type", 4, [("PIDTYPE_PID", 0), ("PIDTYPE_TGID", 1)])
    return b.blob()


def model_kernel_types(current_offset: int):
    """`KernelTypes` of `model_kernel()`, its `current_task` at `current_offset` from the GS base."""
    from probed.guest.linux.btf import Btf
    from probed.guest.linux.kernel_types import KernelTypes
    from probed.guest.linux.tasks import CurrentTask

    btf = Btf(model_kernel())
    task = btf.struct("task_struct")
    current = CurrentTask("gs_base", current_offset, btf.member(task, "comm").bit_offset // 8, 16,
                          btf.member(task, "pid").bit_offset // 8, btf.member(task, "tgid").bit_offset // 8)
    return KernelTypes(btf, current, "", "test")
