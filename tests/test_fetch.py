"""The fetch language and filters: parsing, columns of errors, batched evaluation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probed.errors import FetchSyntaxError, FilterSyntaxError
from probed.fetch import parse_fetchargs
from probed.filter import parse_filter
from rsp.arch import ARCHES

X64 = ARCHES["x86_64"]
I386 = ARCHES["i386"]


class Memory:
    """A fake hit context over a dict of bytes (evaluation is pure: no target needed to test it)."""

    def __init__(self, regs, mem):
        self.regs, self.mem, self.batches = regs, mem, []

    async def registers(self):
        return self.regs

    async def read_many(self, reqs):
        self.batches.append(list(reqs))
        out = []
        pages = {a // 4096 for a in self.mem}
        for addr, n in reqs:
            # Mapping is page-granular, as on the guest: a page with any byte put in it reads as zeros elsewhere.
            if all(p in pages for p in range(addr // 4096, (addr + n - 1) // 4096 + 1)):
                out.append(bytes(self.mem.get(a, 0) for a in range(addr, addr + n)))
            else:
                out.append(RuntimeError("E14"))
        return out

    def symbolize(self, addr):
        return "func+0x4" if addr == 0x1004 else None


def put(mem, addr, data):
    for i, b in enumerate(data):
        mem[addr + i] = b


async def test_every_form_and_type():
    mem = {}
    put(mem, 0x2000, b"/etc/hostname\0")
    put(mem, 0x3000, (0x2000).to_bytes(8, "little"))
    put(mem, 0x4000, (-100 & 0xFFFFFFFF).to_bytes(4, "little") + bytes([1, 2, 3, 4]))
    put(mem, 0x5008, (0x1004).to_bytes(8, "little"))
    regs = {"rdi": 0x4000, "rsi": 0x3000, "rsp": 0x5000, "rip": 0x1000, "rax": 0xFFFFFFFFFFFFFFFF}
    prog = parse_fetchargs(
        ["dfd=+0(%di):s32", "name=+0(+0(%si)):string", "bytes=+4(%di):u8[4]", "ret=$stack1:symbol",
         "%ax:s8", "$arg1:x32", "sp=$stack", "imm=\\-5:s64", "raw=%ax"],
        X64,
    )
    ctx = Memory(regs, mem)
    values = await prog.evaluate(ctx)
    assert values == {
        "dfd": -100, "name": "/etc/hostname", "bytes": [1, 2, 3, 4], "ret": "func+0x4", "arg5": -1,
        "arg6": "0x4000", "sp": "0x5000", "imm": -5, "raw": "0xffffffffffffffff",
    }
    assert prog.fields == ("dfd", "name", "bytes", "ret", "arg5", "arg6", "sp", "imm", "raw")


async def test_reads_are_batched_breadth_first():
    mem = {}
    put(mem, 0x3000, (0x2000).to_bytes(8, "little"))
    put(mem, 0x2000, b"abc\0")
    put(mem, 0x4000, bytes(8))
    ctx = Memory({"rdi": 0x4000, "rsi": 0x3000, "rsp": 0}, mem)
    prog = parse_fetchargs(["a=+0(%di):u32", "b=+4(%di):u32", "c=+0(+0(%si)):string"], X64)
    await prog.evaluate(ctx)
    # a, b and the first hop of c in one batch; the string in a second.
    assert [len(b) for b in ctx.batches] == [3, 1]


async def test_i386_arguments_are_on_the_stack_and_faults_stay_in_their_field():
    mem = {}
    put(mem, 0x7004, (7).to_bytes(4, "little") + (0x9999).to_bytes(4, "little"))
    ctx = Memory({"esp": 0x7000}, mem)
    prog = parse_fetchargs(["a=$arg1:u32", "s=+0($arg2):string"], I386)
    assert prog.needs_memory
    values = await prog.evaluate(ctx)
    assert values["a"] == 7
    assert values["s"].startswith("<fault reading 0x9999")


@pytest.mark.parametrize(
    ("arg", "column", "reason"),
    [
        ("a=+4(%esp:s32", 10, "expected )"),
        ("a=%nope", 4, "unknown register"),
        ("a=+4(%sp):u33", 11, "unknown type"),
        ("x=$argz", 3, "$arg"),
        ("x=+(%sp)", 4, "expected an offset"),
        ("x=%sp junk", 6, "unexpected text"),
        ("x=?", 3, "unexpected '?'"),
        ("9x=%sp", 1, "C identifier"),
    ],
)
def test_syntax_errors_name_the_column(arg, column, reason):
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs([arg], X64)
    assert info.value.column == column
    assert reason in info.value.reason
    assert "^" in str(info.value)


@given(st.text(max_size=40))
def test_garbage_only_ever_raises_fetch_syntax_errors(text):
    try:
        parse_fetchargs([text], X64)
    except FetchSyntaxError:
        pass


def test_filters():
    f = parse_filter('dfd == -100 && (name ~ "/etc/*" || !ok) && n >= 0x10', ["dfd", "name", "ok", "n"])
    assert f.matches({"dfd": -100, "name": "/etc/hostname", "ok": 1, "n": 16})
    assert not f.matches({"dfd": -100, "name": "/tmp/x", "ok": 1, "n": 16})
    assert f.matches({"dfd": -100, "name": "/tmp/x", "ok": 0, "n": "0x20"})
    assert not f.matches({"dfd": -100, "name": "<fault reading 0x0: E14>", "ok": 1, "n": 16})
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("dfd == ", ["dfd"])
    assert info.value.column == 8
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("nope > 1", ["dfd"])
    assert info.value.column == 1 and "unknown field" in info.value.reason
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("dfd == 1 $", ["dfd"])
    assert info.value.column == 10
