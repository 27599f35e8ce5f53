"""The fetch language: every form and type, batched breadth-first evaluation, errors with their columns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probed.errors import FetchSyntaxError
from probed.guest.symbols import SymbolStore
from probed.lang.fetch import STRING_MAX, FetchEnv, parse_fetchargs
from rsp.arch import ARCHES

X64 = ARCHES["x86_64"]
I386 = ARCHES["i386"]


class FakeHit:
    """A hit context over a dict of bytes; counts the target round trips evaluation costs.

    Mapping is page-granular, as on the guest: a page with any byte put in it reads as zeros elsewhere, and a
    read touching any other page fails as a whole (like an `m` packet answered E14).
    """

    def __init__(self, regs, mem=None):
        self.regs, self.mem = regs, mem or {}
        self.batches: list[list[tuple[int, int]]] = []
        self.register_calls = 0

    async def registers(self):
        self.register_calls += 1
        return self.regs

    async def read_many(self, reqs):
        self.batches.append(list(reqs))
        pages = {a // 4096 for a in self.mem}
        out = []
        for addr, n in reqs:
            if all(p in pages for p in range(addr // 4096, (addr + n - 1) // 4096 + 1)):
                out.append(bytes(self.mem.get(a, 0) for a in range(addr, addr + n)))
            else:
                out.append(RuntimeError("E14"))
        return out

    def symbolize(self, addr):
        return {0x1004: "func+0x4", 0x2000: "other"}.get(addr)


def put(mem, addr, data):
    for i, b in enumerate(data):
        mem[addr + i] = b


def word(value, size=8):
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


@pytest.fixture
def symbols(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("ffffffff81000000 T do_thing\nffffffff82000000 D jiffies\nffffffff82000040 D other_var\n")
    store = SymbolStore()
    store.add_file(path)
    return store


async def test_every_form_and_type():
    mem = {}
    put(mem, 0x2000, b"/etc/hostname\0")
    put(mem, 0x3000, word(0x2000))
    put(mem, 0x4000, word(-100, 4) + bytes([1, 2, 3, 4]))
    put(mem, 0x5008, word(0x1004))
    regs = {"rdi": 0x4000, "rsi": 0x3000, "rsp": 0x5000, "rip": 0x1000, "rax": 0xFFFFFFFFFFFFFFFF}
    prog = parse_fetchargs(
        ["dfd=+0(%di):s32", "name=+0(+0(%si)):string", "bytes=+4(%di):u8[4]", "ret=$stack1:symbol",
         "%ax:s8", "$arg1:x32", "sp=$stack", "imm=\\-5:s64", "raw=%ax"],
        X64,
    )
    ctx = FakeHit(regs, mem)
    values = await prog.evaluate(ctx)
    assert values == {
        "dfd": -100, "name": "/etc/hostname", "bytes": [1, 2, 3, 4], "ret": "func+0x4", "arg5": -1,
        "arg6": "0x4000", "sp": "0x5000", "imm": -5, "raw": "0xffffffffffffffff",
    }
    assert prog.fields == ("dfd", "name", "bytes", "ret", "arg5", "arg6", "sp", "imm", "raw")
    assert ctx.register_calls == 1


@pytest.mark.parametrize(
    ("type_", "expected"),
    [
        ("u8", 0x80), ("s8", -128), ("x8", "0x80"),
        ("u16", 0xFF80), ("s16", -128), ("x16", "0xff80"),
        ("u32", 0xFFFFFF80), ("s32", -128), ("x32", "0xffffff80"),
        ("u64", 0xFFFFFFFFFFFFFF80), ("s64", -128), ("x64", "0xffffffffffffff80"),
        ("symbol", "0xffffffffffffff80"),
    ],
)
async def test_register_values_are_cut_and_sign_extended_to_the_type(type_, expected):
    prog = parse_fetchargs([f"v=%ax:{type_}"], X64)
    ctx = FakeHit({"rax": 0xFFFFFFFFFFFFFF80})
    assert await prog.evaluate(ctx) == {"v": expected}
    assert ctx.batches == []


@pytest.mark.parametrize(
    ("type_", "length", "expected"),
    [
        ("u8", 1, 0xF0), ("s8", 1, -16), ("x8", 1, "0xf0"),
        ("u16", 2, 0xDEF0), ("s16", 2, -8464), ("x16", 2, "0xdef0"),
        ("u32", 4, 0x9ABCDEF0), ("s32", 4, 0x9ABCDEF0 - (1 << 32)), ("x32", 4, "0x9abcdef0"),
        ("u64", 8, 0x123456789ABCDEF0), ("s64", 8, 0x123456789ABCDEF0), ("x64", 8, "0x123456789abcdef0"),
        ("u8[3]", 3, [0xF0, 0xDE, 0xBC]),
        ("x16[2]", 4, ["0xdef0", "0x9abc"]),
        ("s32[2]", 8, [0x9ABCDEF0 - (1 << 32), 0x12345678]),
    ],
)
async def test_memory_reads_the_size_of_the_type(type_, length, expected):
    mem = {}
    put(mem, 0x4010, word(0x123456789ABCDEF0))
    prog = parse_fetchargs([f"v=+0x10(%di):{type_}"], X64)
    ctx = FakeHit({"rdi": 0x4000}, mem)
    assert await prog.evaluate(ctx) == {"v": expected}
    assert ctx.batches == [[(0x4010, length)]]


async def test_defaults_are_hex_words_and_names_are_positional():
    mem = {}
    put(mem, 0x7000, word(0xABCDEF, 4))
    ctx = FakeHit({"eax": 0x1F, "esp": 0x7000}, mem)
    prog = parse_fetchargs(["%ax", "named=+0(%sp)", "$stack0"], I386)
    assert prog.fields == ("arg1", "named", "arg3")
    assert await prog.evaluate(ctx) == {"arg1": "0x1f", "named": "0xabcdef", "arg3": "0xabcdef"}
    assert ctx.batches == [[(0x7000, 4), (0x7000, 4)]]


async def test_symbols_and_absolute_addresses(symbols):
    mem = {}
    put(mem, 0xFFFFFFFF82000000, word(1234) + word(0x1004) + word(0x2000))
    put(mem, 0x1000, word(0x55AA, 2))
    prog = parse_fetchargs(
        ["j=@jiffies:u64", "p=@jiffies+8:symbol", "q=@other_var-0x38:symbol[2]", "a=@0x1000:u16", "d=@4096:x8"],
        X64, symbols,
    )
    ctx = FakeHit({}, mem)
    assert not prog.needs_registers and prog.needs_memory
    assert await prog.evaluate(ctx) == {
        "j": 1234, "p": "func+0x4", "q": ["func+0x4", "other"], "a": 0x55AA, "d": "0xaa",
    }
    assert ctx.register_calls == 0
    assert ctx.batches == [[
        (0xFFFFFFFF82000000, 8), (0xFFFFFFFF82000008, 8), (0xFFFFFFFF82000008, 16), (0x1000, 2), (0x1000, 1),
    ]]


async def test_unknown_symbol_is_a_syntax_error_with_suggestions(symbols):
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs(["j=@jifies:u64"], X64, symbols)
    assert info.value.column == 4
    assert "did you mean jiffies" in info.value.reason
    with pytest.raises(FetchSyntaxError, match="no symbols are loaded"):
        parse_fetchargs(["j=@jiffies"], X64)


async def test_dereferences_nest_and_cost_one_batch_per_level():
    mem = {}
    put(mem, 0x3000, word(0x3100))
    put(mem, 0x3100 + 0x18, word(0x3200))
    put(mem, 0x3200 - 8, word(77, 4))
    ctx = FakeHit({"rsi": 0x3000}, mem)
    prog = parse_fetchargs(["v=-8(+0x18(+0(%si))):u32", "w=+u0(%si)"], X64)
    assert await prog.evaluate(ctx) == {"v": 77, "w": "0x3100"}
    assert ctx.batches == [[(0x3000, 8), (0x3000, 8)], [(0x3118, 8)], [(0x31F8, 4)]]


async def test_reads_are_batched_breadth_first():
    mem = {}
    put(mem, 0x3000, word(0x2000))
    put(mem, 0x2000, b"abc\0")
    put(mem, 0x4000, bytes(8))
    ctx = FakeHit({"rdi": 0x4000, "rsi": 0x3000, "rsp": 0}, mem)
    prog = parse_fetchargs(["a=+0(%di):u32", "b=+4(%di):u32", "c=+0(+0(%si)):string"], X64)
    assert await prog.evaluate(ctx) == {"a": 0, "b": 0, "c": "abc"}
    # a, b and the first hop of c in one batch; the string in a second.
    assert [len(b) for b in ctx.batches] == [3, 1]


async def test_nothing_is_read_that_no_field_needs():
    ctx = FakeHit({"rdi": 5})
    prog = parse_fetchargs(["a=\\0x10:u8", "b=\\7"], X64)
    assert not prog.needs_registers and not prog.needs_memory
    assert await prog.evaluate(ctx) == {"a": 16, "b": "0x7"}
    assert (ctx.register_calls, ctx.batches) == (0, [])
    prog = parse_fetchargs(["a=%di:u32", "b=$arg6"], X64)
    assert prog.needs_registers and not prog.needs_memory
    assert await prog.evaluate(FakeHit({"rdi": 5, "r9": 9})) == {"a": 5, "b": "0x9"}


async def test_x86_64_arguments_past_the_sixth_are_on_the_stack():
    regs = {"rdi": 1, "rsi": 2, "rdx": 3, "rcx": 4, "r8": 5, "r9": 6, "rsp": 0x8000}
    mem = {}
    put(mem, 0x8000, word(0xDEAD) + word(7) + word(8))
    prog = parse_fetchargs([f"a{n}=$arg{n}:u64" for n in range(1, 9)], X64)
    assert prog.needs_memory
    ctx = FakeHit(regs, mem)
    assert await prog.evaluate(ctx) == {f"a{n}": n for n in range(1, 9)}
    assert ctx.batches == [[(0x8008, 8), (0x8010, 8)]]


async def test_i386_arguments_are_on_the_stack_and_faults_stay_in_their_field():
    mem = {}
    put(mem, 0x7004, word(7, 4) + word(0x9999, 4))
    ctx = FakeHit({"esp": 0x7000}, mem)
    prog = parse_fetchargs(["a=$arg1:u32", "s=+0($arg2):string", "t=$stack1:u32[2]"], I386)
    assert prog.needs_memory
    assert await prog.evaluate(ctx) == {"a": 7, "s": "<fault reading 0x9999: E14>", "t": [7, 0x9999]}


async def test_a_fault_in_an_inner_dereference_and_a_missing_register():
    ctx = FakeHit({"rdi": 0x10})
    prog = parse_fetchargs(["a=+8(+0(%di)):u32", "b=%r15", "c=%di"], X64)
    assert await prog.evaluate(ctx) == {"a": "<fault reading 0x10: E14>", "b": "<no register r15>", "c": "0x10"}
    assert ctx.batches == [[(0x10, 8)]]


async def test_addresses_wrap_at_the_word_size():
    mem = {}
    put(mem, 0xFFFFF000, bytes(4096))
    put(mem, 0xFFFFFFFC, word(0x11223344, 4))
    ctx = FakeHit({"esp": 4}, mem)
    prog = parse_fetchargs(["v=-8(%sp):x32"], I386)
    assert await prog.evaluate(ctx) == {"v": "0x11223344"}
    assert ctx.batches == [[(0xFFFFFFFC, 4)]]


async def test_strings_stop_at_nul_and_at_the_limit():
    mem = {}
    put(mem, 0x2000, b"x" * 300)
    put(mem, 0x2200, b"caf\xc3\xa9\0")
    ctx = FakeHit({"rdi": 0x2000, "rsi": 0x2200}, mem)
    prog = parse_fetchargs(["long=+0(%di):string", "u=+0(%si):ustring", "e=+0x1ff(%di):string"], X64)
    assert await prog.evaluate(ctx) == {"long": "x" * STRING_MAX, "u": "café", "e": ""}
    assert ctx.batches == [[(0x2000, 256), (0x2200, 256), (0x21FF, 256)]]


async def test_strings_do_not_cross_a_page_on_the_first_read():
    mem = {}
    put(mem, 0x2FF0, b"0123456789abcdef")
    put(mem, 0x3000, b"ghij\0")
    put(mem, 0x5FFC, b"wxyz")  # the page after 0x5fff is not mapped
    ctx = FakeHit({"rdi": 0x2FF0, "rsi": 0x5FFC}, mem)
    prog = parse_fetchargs(["a=+0(%di):string", "b=+0(%si):string", "c=+0x10(%si):string"], X64)
    assert await prog.evaluate(ctx) == {
        "a": "0123456789abcdefghij", "b": "wxyz", "c": "<fault reading 0x600c: E14>",
    }
    assert ctx.batches == [[(0x2FF0, 16), (0x5FFC, 4), (0x600C, 256)], [(0x3000, 240), (0x6000, 252)]]


async def test_string_of_a_register_reads_at_its_value():
    mem = {}
    put(mem, 0x2000, b"hi\0")
    prog = parse_fetchargs(["%di:string", "$stack:string"], X64)
    assert await prog.evaluate(FakeHit({"rdi": 0x2000, "rsp": 0x2001}, mem)) == {"arg1": "hi", "arg2": "i"}


@pytest.mark.parametrize(
    ("arg", "column", "reason"),
    [
        ("a=+4(%rsp:s32", 10, "expected )"),
        ("a=%nope", 4, "unknown register %nope"),
        ("a=%", 4, "expected a register name"),
        ("a=+4(%sp):u33", 11, "unknown type 'u33'"),
        ("a=+4(%sp):", 11, "unknown type ''"),
        ("a=+4(%sp):b4@30/32", 11, "a bitfield is b<width>@<offset>/<container>"),
        ("a=+4(%sp):b4@0/24", 11, "a bitfield is b<width>@<offset>/<container>"),
        ("a=+4(%sp):b0@0/8", 11, "a bitfield is b<width>@<offset>/<container>"),
        ("a=+4(%sp):b1@0/8[2]", 11, "arrays of bitfields"),
        ("a=%di:b1@0/8", 3, "a bitfield needs a memory fetch arg"),
        ('a=\\"abc":u32', 10, "a string immediate is a string"),
        ('a=\\"abc', 4, "unterminated string immediate"),
        ("a=filename", 3, "the parameter name 'filename' needs the kernel's types"),
        ("a=$arg1->f_mode", 8, "$arg1-> needs the kernel's types"),
        ("a=+0(%di)->f", 10, "-> needs a typed value"),
        ("a=%di.x", 6, ". needs a typed value"),
        ("a=%di:u8[2]", 3, "an array needs a memory fetch arg"),
        ("a=+0(%di):u8[0]", 11, "array length must be 1..1024"),
        ("a=+0(%di):u8[1025]", 11, "array length must be 1..1024"),
        ("x=$argz", 3, "$arg needs a number"),
        ("x=$arg0", 3, "$arg needs a number"),
        ("x=$retval", 3, "$retval is only for return probes"),
        ("x=$comm", 3, "$comm needs the kernel's types (BTF), and none are loaded"),
        ("x=$pid", 3, "$pid needs the kernel's types"),
        ("x=$foo", 3, "expected $stack, $stackN, $argN, $comm, $pid, $tid or $current"),
        ("x=+(%sp)", 4, "expected an offset"),
        ("x=+4%sp", 5, "expected ( after the offset"),
        ("x=+4(%sp)junk", 10, "unexpected text after the fetch arg"),
        ("x=%sp junk", 6, "unexpected text"),
        ("x=?", 3, "unexpected '?'"),
        ("x=", 3, "expected a fetch arg"),
        ("", 1, "expected a fetch arg"),
        ("x=@", 4, "expected an address or a symbol"),
        ("x=@0x", 5, "unexpected text after the fetch arg"),
        ("x=\\abc", 4, "expected an immediate number"),
        ("9x=%sp", 1, "C identifier"),
        ("=%sp", 1, "C identifier"),
        ("+0(+0(+0(%di)):u8", 15, "expected )"),
    ],
)
def test_syntax_errors_name_the_column(arg, column, reason):
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs([arg], X64)
    assert (info.value.column, info.value.text) == (column, arg)
    assert reason in info.value.reason
    assert str(info.value).splitlines()[-1] == "  " + " " * (column - 1) + "^"


async def test_a_leading_zero_is_octal_as_in_kprobe_events():
    mem = {}
    put(mem, 0x5008, word(0x11223344, 4))
    put(mem, 0x0008, word(0x55, 4))
    prog = parse_fetchargs(["a=+010(%sp):x32", "b=@010:u32", "c=+0x8(%sp):x32", "d=+8(%sp):x32"], X64)
    values = await prog.evaluate(FakeHit({"rsp": 0x5000}, mem))
    assert values == {"a": "0x11223344", "b": 0x55, "c": "0x11223344", "d": "0x11223344"}
    with pytest.raises(FetchSyntaxError, match="08 is not a number: a leading 0 makes it octal") as info:
        parse_fetchargs(["x=@08"], X64)
    assert info.value.column == 4


def test_a_name_may_not_repeat_even_by_position():
    with pytest.raises(FetchSyntaxError, match="'arg1' appears twice"):
        parse_fetchargs(["%di", "arg1=%si"], X64)


def test_i386_register_aliases():
    prog = parse_fetchargs(["%ax", "%eax", "%sp", "%ip", "%flags"], I386)
    assert [f.node.name for f in prog.fields_spec] == ["eax", "eax", "esp", "eip", "eflags"]
    with pytest.raises(FetchSyntaxError, match="unknown register %rdi"):
        parse_fetchargs(["%rdi"], I386)


@given(st.text(max_size=40))
def test_garbage_only_ever_raises_fetch_syntax_errors(text):
    try:
        parse_fetchargs([text], X64)
    except FetchSyntaxError as exc:
        assert 1 <= exc.column <= len(text) + 1


@given(st.lists(st.text(alphabet="%@$+-u()\\:[]=0123456789xabcdisp_jfestckrgtymol ", max_size=24), max_size=3))
def test_near_grammatical_garbage_only_ever_raises_fetch_syntax_errors(args):
    store = SymbolStore()
    try:
        parse_fetchargs(args, I386, store)
    except FetchSyntaxError as exc:
        assert 1 <= exc.column <= len(exc.text) + 1


class CheapHit(FakeHit):
    """A hit whose reads come from guest RAM at once (`read_now`): None where RAM cannot answer (a page not
    mapped, or a read whose turn it is to be checked against the stub), as `GuestMemory.read_now`."""

    reads_are_cheap = True

    def __init__(self, regs, mem=None, refuse_every: int = 0):
        super().__init__(regs, mem)
        self.refuse_every = refuse_every
        self.now = 0

    def read_now(self, addr, n):
        self.now += 1
        if self.refuse_every and self.now % self.refuse_every == 0:
            return None
        pages = {a // 4096 for a in self.mem}
        if not all(p in pages for p in range(addr // 4096, (addr + n - 1) // 4096 + 1)):
            return None
        return bytes(self.mem.get(a, 0) for a in range(addr, addr + n))


PAGES = [0x10000, 0x11000, 0x13000]
AT_ONCE_FIELDS = ["a=+0(%di):u64", "b=+8(+0(%si)):s32", "s=+0(%si):string", "t=+0(+0(%di)):string",
                  "arr=+4(%sp):u16[3]", "c=$stack2:x64", "d=+0(+8(+0(%di))):u8", "e=+16(%sp):ustring",
                  "f=+0(+0(+0(%sp))):x32", "g=+4094(%si):u32"]


@given(
    words=st.lists(st.one_of(st.sampled_from([p + o for p in PAGES for o in (0, 8, 24, 4090)] + [0x20000]),
                             st.integers(0, 2**64 - 1)), min_size=24, max_size=24),
    text=st.binary(max_size=12),
    regs=st.tuples(*[st.sampled_from([p + o for p in PAGES for o in (0, 16, 4088)] + [0x20000])] * 3),
    refuse_every=st.sampled_from([0, 1, 2, 3, 7]),
)
async def test_reads_at_once_give_what_breadth_first_reads_give(words, text, regs, refuse_every):
    """With guest RAM at hand a hit's fields are read depth-first at once; when RAM cannot answer a read
    (not mapped, or checked against the stub), the breadth-first reads give the answer. Either way every
    field is what reading breadth-first alone gives, faults included."""
    mem = {}
    for i, w in enumerate(words):
        put(mem, PAGES[i % 3] + 8 * (i // 3), word(w))
    put(mem, PAGES[1] + 64, text + b"\0")
    registers = {"rdi": regs[0], "rsi": regs[1], "rsp": regs[2], "rip": 0x1000}
    prog = parse_fetchargs(AT_ONCE_FIELDS, X64)
    expected = await prog.evaluate(FakeHit(registers, mem))
    cheap = CheapHit(registers, mem, refuse_every)
    assert await prog.evaluate(cheap) == expected
    assert not cheap.batches or refuse_every or any(isinstance(v, str) and v.startswith("<fault") for v in expected.values())


async def test_reads_at_once_make_no_round_trip():
    """Every read of a hit's fields served from guest RAM at once: no batch goes to the target."""
    mem = {}
    put(mem, 0x10000, word(0x11000) + word(0x11010))
    put(mem, 0x11000, b"comm\0")
    put(mem, 0x11010, word(-7, 4))
    prog = parse_fetchargs(["name=+0(+0(%di)):string", "n=+0(+8(%di)):s32", "p=+0(%di):x64"], X64)
    cheap = CheapHit({"rdi": 0x10000, "rip": 0x1000}, mem)
    assert await prog.evaluate(cheap) == {"name": "comm", "n": -7, "p": "0x11000"}
    assert cheap.batches == [] and cheap.now == 5


I386_AT_ONCE_FIELDS = ["a=$arg1:s32", "s=$arg2:string", "t=+0($arg3):string[2]", "sp=%sp", "spv=$stack",
                       "st=$stack1:u32", "lit=\\\"hi\"", "m=@0x10004:u16[2]", "r=$retval", "sym=+0(%sp):symbol",
                       "bf=+4(%sp):b4@2/32", "ch=+8(%sp):char", "sa=$stack2:string", "far=+4092(%sp):x64"]


@given(
    words=st.lists(st.one_of(st.sampled_from([p + o for p in PAGES for o in (0, 4, 64, 4093)] + [0x1004, 0x20000]),
                             st.integers(0, 2**32 - 1)), min_size=24, max_size=24),
    text=st.binary(max_size=12),
    sp=st.sampled_from([p + o for p in PAGES for o in (0, 12, 4084)] + [0x20000]),
    refuse_every=st.sampled_from([0, 1, 2, 5]),
    bound=st.sampled_from([None, {1: 7, 2: 0x11040, 3: 0x10000}, {1: "<not kept>"}]),
)
async def test_every_kind_of_field_reads_the_same_at_once_and_breadth_first(words, text, sp, refuse_every, bound):
    """The compiled reads at once (`_evaluate_now`) against the generators read breadth-first: stack
    arguments, string arrays, literals, fixed addresses, `$retval`, symbols, bitfields, characters, and the
    values a return probe kept at its entry (or could not), on an i386 program."""
    mem = {}
    for i, w in enumerate(words):
        put(mem, PAGES[i % 3] + 4 * (i // 3), word(w, 4))
    put(mem, PAGES[1] + 64, text + b"\0")
    put(mem, PAGES[0] + 4093, text[:3].replace(b"\0", b"-"))  # a string that goes on into the next page
    registers = {"esp": sp, "eax": words[0], "eip": 0x1000}
    prog = parse_fetchargs(I386_AT_ONCE_FIELDS, I386, env=FetchEnv(retprobe=True))
    if bound is not None:
        prog = prog.bind(bound)
    expected = await prog.evaluate(FakeHit(registers, mem))
    assert await prog.evaluate(CheapHit(registers, mem, refuse_every)) == expected


async def test_a_string_read_at_once_goes_on_into_the_next_page():
    mem = {}
    put(mem, 0x10FFD, b"abc")
    put(mem, 0x11000, b"defg\0")
    put(mem, 0x12000, word(0x11001, 4) + word(0x10FFD, 4))
    prog = parse_fetchargs(["s=$arg1:string", "t=+0(%sp):string[2]"], I386)
    cheap = CheapHit({"esp": 0x12000, "eip": 0x1000}, mem)
    assert await prog.evaluate(cheap) == {"s": "abcdefg", "t": ["efg", "abcdefg"]}
    assert cheap.batches == []
