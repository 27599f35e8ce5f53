"""Fetch args with the kernel's types (BTF) over a model kernel of known layout, evaluated on fake hits:
`$comm`/`$pid`/`$tid`, parameters by name, `->` and `.` chains, bitfields, anonymous unions, and the errors.
Also the kernel documentation's own fetch-arg examples (kprobetrace.rst, fprobetrace.rst), and depth limits."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probed.errors import FetchSyntaxError
from probed.lang.fetch import MAX_DEPTH, FetchEnv, TypesNeeded, parse_fetchargs
from probed.lang.handlers import make_handlers
from rsp.arch import ARCHES
from tests.btf_builder import model_kernel_types
from tests.test_fetch import FakeHit, put, word

X64 = replace(ARCHES["x86_64"], registers=(*ARCHES["x86_64"].registers, "fs_base", "gs_base", "k_gs_base"))

GS, CURRENT_OFF, TASK, HOW, NAME = 0x10000, 0x100, 0x4000, 0x3000, 0x2000


@pytest.fixture(scope="module")
def types():
    return model_kernel_types(CURRENT_OFF)


def env(types, function="do_open", at_entry=True):
    return FetchEnv(function=function, at_entry=at_entry, types=types)


def hit():
    """A CPU in do_open(-100, "/etc/hostname", how) with current = the task at TASK (layout: model_kernel)."""
    mem = {}
    put(mem, NAME, b"/etc/hostname\0")
    put(mem, HOW, word(0x8000) + word(0o666) + word(0))
    put(mem, GS + CURRENT_OFF, word(TASK))
    task = word(1, 4) + word(42, 4) + word(41, 4) + word(0x12345678, 4)
    task += word(1 | 21 << 1 | 0b101101 << 30)  # in_exec=1, prio=21, spill (6 bits from bit 30: past 32)
    task += word(0, 8) + b"probed-open\0".ljust(16, b"\0")
    task += word(7, 4) + word(0, 4) + word(NAME) + word(TASK)  # in.x=7, in.name, parent = itself
    put(mem, TASK, task)
    regs = {"rdi": (-100) & (2**64 - 1), "rsi": NAME, "rdx": HOW, "rcx": TASK, "rsp": 0x7000, "gs_base": GS}
    return FakeHit(regs, mem)


async def test_comm_pid_tid_of_the_current_task(types):
    prog = parse_fetchargs(["$comm", "$pid", "$tid", "who=$comm:string"], X64, env=env(types))
    assert prog.fields == ("comm", "pid", "tid", "who")
    ctx = hit()
    assert await prog.evaluate(ctx) == {"comm": "probed-open", "pid": 41, "tid": 42, "who": "probed-open"}
    assert len(ctx.batches) == 2  # current (one read for all three), then the fields


async def test_parameters_names_and_defaults(types):
    prog = parse_fetchargs(["dfd", "filename", "path=filename:string", "how->flags", "mode=how->mode:x32"],
                           X64, env=env(types))
    assert prog.fields == ("dfd", "filename", "path", "how_flags", "mode")
    assert await prog.evaluate(hit()) == {
        "dfd": -100, "filename": hex(NAME), "path": "/etc/hostname", "how_flags": 0x8000, "mode": "0x1b6"}


async def test_arg_star_is_every_parameter_by_name(types):
    prog = parse_fetchargs(["$arg*"], X64, env=env(types))
    assert prog.fields == ("dfd", "filename", "how")
    assert await prog.evaluate(hit()) == {"dfd": -100, "filename": hex(NAME), "how": hex(HOW)}


async def test_member_chains_unions_bitfields_and_arrays(types):
    prog = parse_fetchargs(
        ["p->comm", "c=p->comm:string", "p->pid", "p->in.x", "n=p->in.name:string", "p->parent->parent->tgid",
         "p->a", "p->b", "p->in_exec", "p->prio", "p->spill", "raw=p->comm:u8[2]", "$arg1->tgid"],
        X64, env=env(types, "wake"))
    ctx = hit()
    ctx.regs["rdi"] = TASK  # wake(struct task_struct *p)
    assert await prog.evaluate(ctx) == {
        "p_comm": "probed-open", "c": "probed-open", "p_pid": 42, "p_in_x": 7, "n": "/etc/hostname",
        "p_parent_parent_tgid": 41, "p_a": 0x12345678, "p_b": 0x5678, "p_in_exec": 1, "p_prio": 21,
        "p_spill": 0b101101, "raw": [ord("p"), ord("r")], "arg13": 41}


@pytest.mark.parametrize(("function", "arg", "column", "reason"), [
    ("wake", "p->comn", 4, "struct task_struct has no member 'comn'; closest fields: comm"),
    ("wake", "p.pid", 3, "'.' needs a struct, and p is struct task_struct *; use '->' through a pointer"),
    ("wake", "p->in->x", 8, "'->' needs a pointer to a struct, and p->in is struct inner; use '.' for a member of a struct"),
    ("wake", "p->in", 1, "p->in is struct inner (16 bytes): pick a member with ."),
    ("wake", "p", 1, None),  # a pointer: a hex word, no error
    ("wake", "p->pid:string", 8, "p->pid is pid_t: the string types need char * or char[]"),
    ("wake", "p->", 4, "expected a member name after ->"),
    ("do_open", "fname", 1, "do_open has no parameter 'fname'; did you mean filename? its parameters: dfd, filename, how"),
    ("do_open", "x=dfd->a", 8, "'->' needs a pointer to a struct, and dfd is int"),
    ("vfs_read", "file", 1, "the kernel's BTF has no prototype for vfs_read; fetch its arguments with $argN or %REG"),
    ("do_open", "$comm:u32", 7, "$comm is a string; any other type is invalid"),
])
def test_typed_errors_name_what_is_wrong(types, function, arg, column, reason):
    if reason is None:
        parse_fetchargs([arg], X64, env=env(types, function))
        return
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs([arg], X64, env=env(types, function))
    assert (info.value.reason, info.value.column) == (reason, column)


def test_registers_and_positions_need_no_types(types):
    # A function BTF does not know is still probed by register and $argN; nothing asks for the types.
    prog = parse_fetchargs(["%di", "$arg2", "+0(%si):string"], X64, env=FetchEnv(function="vfs_read"))
    assert prog.fields == ("arg1", "arg2", "arg3")


def test_parameters_by_name_only_at_entry(types):
    with pytest.raises(FetchSyntaxError, match="parameters by name only at a function's entry"):
        parse_fetchargs(["dfd"], X64, env=env(types, at_entry=False))


def test_without_types_the_error_says_why(types):
    with pytest.raises(TypesNeeded, match="needs the kernel's types"):
        parse_fetchargs(["$comm"], X64)
    why = FetchEnv(function="f", types_error="no symbol __start_BTF in the loaded symbols")
    with pytest.raises(FetchSyntaxError, match="\\$comm needs the kernel's types \\(BTF\\): no symbol __start_BTF"):
        parse_fetchargs(["$comm"], X64, env=why)


async def test_types_are_loaded_once_and_only_when_an_arg_needs_them(types):
    calls = []

    async def load():
        calls.append(1)
        return types

    plain = await make_handlers([["%di"], None], X64, None, function="do_open", load_types=load)
    assert calls == [] and plain[1] is None
    typed = await make_handlers([["dfd"], ["$comm"]], X64, None, function="do_open", load_types=load)
    assert calls == [1] and typed[0].fields == ("dfd",) and typed[1].fields == ("comm",)

    async def none():
        raise LookupError("no symbol __start_BTF in the loaded symbols")

    with pytest.raises(FetchSyntaxError, match="the parameter name 'dfd' needs the kernel's types \\(BTF\\): no symbol"):
        await make_handlers([["dfd"]], X64, None, function="do_open", load_types=none)


# -- the kernel documentation's examples (kprobetrace.rst, Types) ---------------------------------------------


async def test_string_array_is_an_array_of_char_pointers():
    # "+0(%di):string[1] is equal to +0(+0(%di)):string"
    mem = {}
    put(mem, 0x2000, b"first\0second\0")
    put(mem, 0x3000, word(0x2000) + word(0x2006) + word(0x9000_0000))
    prog = parse_fetchargs(["a=+0(%di):string[1]", "b=+0(+0(%di)):string", "c=+0(%di):string[3]"], X64)
    values = await prog.evaluate(FakeHit({"rdi": 0x3000}, mem))
    assert values["a"] == [values["b"]] == ["first"]
    assert values["c"] == ["first", "second", "<fault reading 0x90000000: E14>"]


async def test_bitfields_char_symstr_and_string_immediates():
    mem = {}
    put(mem, 0x3000, word(0b1011_0110_0000, 4) + b"AZ")
    prog = parse_fetchargs(["bits=+0(%di):b4@5/32", "top=+0(%di):b1@31/32", "ch=+4(%di):char", "two=+4(%di):char[2]",
                            "sym=%si:symstr", "imm=\\\"hello: world\"", "s=\\\"x\":string"], X64)
    ctx = FakeHit({"rdi": 0x3000, "rsi": 0x1004}, mem)
    ctx.symstr = lambda a: {0x1004: "func+0x4/0x20"}.get(a)
    assert await prog.evaluate(ctx) == {"bits": 0b1011, "top": 0, "ch": "A", "two": ["A", "Z"],
                                        "sym": "func+0x4/0x20", "imm": "hello: world", "s": "x"}


def test_arrays_only_of_memory_as_the_documentation_says():
    # "'$stack1:x8[8]' is wrong, but '+8($stack):x8[8]' is OK"
    parse_fetchargs(["+8($stack):x8[8]"], X64)
    with pytest.raises(FetchSyntaxError, match="an array needs a memory fetch arg"):
        parse_fetchargs(["%di:x8[8]"], X64)


async def test_ustring_is_a_user_dereference_string():
    # "+0(%si):ustring is equivalent to +u0(%si):string"
    mem = {}
    put(mem, 0x2000, b"/etc/hostname\0")
    prog = parse_fetchargs(["a=+0(%si):ustring", "b=+u0(%si):string"], X64)
    values = await prog.evaluate(FakeHit({"rsi": 0x2000}, mem))
    assert values["a"] == values["b"] == "/etc/hostname"


# -- depth (issue 10.6) -------------------------------------------------------------------------------------


def test_five_thousand_nested_dereferences_are_a_clear_error():
    arg = "+0(" * 5000 + "%di" + ")" * 5000
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs([arg], X64)
    assert info.value.column == 3 * (MAX_DEPTH + 1) + 1
    assert f"more than {MAX_DEPTH} nested dereferences" in info.value.reason
    parse_fetchargs(["+0(" * MAX_DEPTH + "%di" + ")" * MAX_DEPTH], X64)


def test_five_thousand_member_hops_are_a_clear_error(types):
    with pytest.raises(FetchSyntaxError, match=f"more than {MAX_DEPTH} nested dereferences"):
        parse_fetchargs(["p" + "->parent" * 5000 + "->pid"], X64, env=env(types, "wake"))


@pytest.mark.parametrize("arg", ["(" * 10_000 + "%di" + ")" * 10_000, "!" * 20_000 + "%di"])
def test_parentheses_and_bangs_are_refused_at_their_first_column(arg):
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs([arg], X64)
    assert info.value.column == 1


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from(["+0(", "+8(", ")", "%di", "->", "p", ".in", "->parent", ":string", "$comm"]),
                max_size=400))
def test_long_nested_garbage_only_ever_raises_fetch_syntax_errors(types, parts):
    text = "".join(parts)
    try:
        parse_fetchargs([text], X64, env=env(types, "wake"))
    except FetchSyntaxError as exc:
        assert 1 <= exc.column <= len(text) + 1


async def test_current_task_and_offsets_by_struct_and_member_names(types):
    prog = parse_fetchargs(
        ["cur=$current", "c=$current->comm", "ppid=$current->parent->tgid", "x=+task_struct.in.x(%cx):s32",
         "mode=+open_how.mode(%dx):x32", "back=-open_how.mode(%dx):x8"], X64, env=env(types))
    ctx = hit()
    assert await prog.evaluate(ctx) == {"cur": hex(TASK), "c": "probed-open", "ppid": 41, "x": 7, "mode": "0x1b6",
                                        "back": "0x0"}


@pytest.mark.parametrize(("arg", "column", "reason"), [
    ("+open_how.nope(%dx)", 2, "struct open_how has no member 'nope'; closest fields: mode"),
    ("+open_how.xyz(%dx)", 2, "struct open_how has no member 'xyz'; its fields: flags, mode, resolve"),
    ("+open_hw.mode(%dx)", 2, "the kernel's BTF has no struct 'open_hw'; did you mean open_how?"),
    ("+task_struct.in_exec(%di)", 2, "task_struct.in_exec is a bitfield: it has no byte offset"),
    ("+task_struct.pid.x(%di)", 2, "task_struct.pid is pid_t, not a struct"),
    ("$current->nope", 11, "struct task_struct has no member 'nope'"),
])
def test_offsets_by_name_errors(types, arg, column, reason):
    with pytest.raises(FetchSyntaxError) as info:
        parse_fetchargs([arg], X64, env=env(types))
    assert info.value.column == column and info.value.reason.startswith(reason), info.value


def test_offsets_by_name_need_the_types_and_user_derefs_stay_numbers():
    with pytest.raises(TypesNeeded, match="\\+open_how.mode needs the kernel's types"):
        parse_fetchargs(["+open_how.mode(%dx)"], X64)
    assert parse_fetchargs(["+u8(%di)"], X64).fields_spec[0].node.offset == 8
