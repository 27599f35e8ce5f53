"""kprobe_events/uprobe_events lines: the kernel documentation's own examples, and errors by line and column."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probed.front.kprobe_events import EventsFileError, parse_line, parse_text


def test_the_kernel_documentation_examples():
    # Documentation/trace/kprobetrace.rst
    ev = parse_line("p:myprobe do_sys_open dfd=%ax filename=%dx flags=%cx mode=+4($stack)")
    assert (ev.action, ev.retprobe, ev.group, ev.name, ev.target) == ("add", False, None, "myprobe", "do_sys_open")
    assert ev.fetchargs == ("dfd=%ax", "filename=%dx", "flags=%cx", "mode=+4($stack)")
    assert ev.columns == (23, 31, 44, 54)
    ev = parse_line("r:myretprobe do_sys_open $retval")
    assert (ev.retprobe, ev.name, ev.fetchargs) == (True, "myretprobe", ("$retval",))
    ev = parse_line("-:myprobe")
    assert (ev.action, ev.event) == ("remove", "myprobe")
    ev = parse_line("p:myprobe do_sys_open%return $retval")
    assert (ev.retprobe, ev.target) == (True, "do_sys_open")
    # Documentation/trace/uprobetracer.rst
    ev = parse_line("p:uprobes/p_bash_0x4245c0 /bin/bash:0x4245c0 %ip %ax")
    assert (ev.user, ev.group, ev.name, ev.target) == (True, "uprobes", "p_bash_0x4245c0", "/bin/bash:0x4245c0")
    ev = parse_line("r:uprobes/r_bash_0x4245c0 /bin/bash:0x4245c0")
    assert ev.user and ev.retprobe
    ev = parse_line("p /bin/bash:0x4245c0(0x10)")
    assert ev.ref_ctr == 0x10 and ev.target == "/bin/bash:0x4245c0"


def test_default_names_groups_and_maxactive():
    assert parse_line("p do_sys_open").name == "p_do_sys_open_0"
    assert parse_line("p do_sys_open+0x10").name == "p_do_sys_open_16"
    assert parse_line("r10 vfs_read").name == "r_vfs_read_0"
    assert parse_line("r10 vfs_read").maxactive == 10
    assert parse_line("r10:rp vfs_read").maxactive == 10
    assert parse_line("p ext4:ext4_sync_file").name == "p_ext4_ext4_sync_file_0"
    assert parse_line("p 0xffffffff81000000").name == "p_0xffffffff81000000"
    assert parse_line("p /bin/bash:0x4245c0").name == "p_bash_0x4245c0"
    ev = parse_line("p:grp/ do_sys_open")
    assert (ev.group, ev.event, ev.name) == ("grp", None, "p_do_sys_open_0")
    assert parse_line("p do_sys_open").default_group == "kprobes"
    assert parse_line("p /bin/ls:0x10").default_group == "uprobes"


def test_numbers_are_read_as_tracefs_reads_them_and_passed_on_in_hex():
    # kstrtoul with base 0: 0x hex, octal after a leading 0, else decimal; probed's own specs take a
    # decimal offset and a 0x address, so a number probed would read otherwise is passed on in hex.
    ev = parse_line("p do_sys_open+010")
    assert (ev.target, ev.name) == ("do_sys_open+0x8", "p_do_sys_open_8")
    assert parse_line("p ext4:ext4_sync_file+16").target == "ext4:ext4_sync_file+16"
    assert parse_line("p ext4:ext4_sync_file+0x10").target == "ext4:ext4_sync_file+0x10"
    assert parse_line("p 4096").target == "0x1000"
    assert parse_line("r vfs_read+00").retprobe
    ev = parse_line("p /bin/bash:1264(010)")
    assert (ev.target, ev.ref_ctr, ev.name) == ("/bin/bash:0x4f0", 8, "p_bash_0x4f0")
    for line, column in [("p do_sys_open+08", 14), ("p 09", 3), ("p /bin/sh:019", 11), ("p /bin/sh:0x10(09)", 16)]:
        with pytest.raises(EventsFileError) as info:
            parse_line(line)
        assert info.value.column == column, line


def test_comments_and_blank_lines():
    commands = parse_text("# a comment\n\n   \np:a f x=%ax # trailing\n-:a\n")
    assert [(c.line, c.action, c.fetchargs) for c in commands] == [(4, "add", ("x=%ax",)), (5, "remove", ())]


@pytest.mark.parametrize(
    ("line", "column", "reason"),
    [
        ("x:foo do_sys_open", 1, "unknown command"),
        ("p:1bad do_sys_open", 3, "bad event name"),
        ("p:grp/9x do_sys_open", 7, "bad event name"),
        ("p:/ev do_sys_open", 3, "a group name is expected"),
        ("p: do_sys_open", 3, "an event name is expected"),
        ("p5 do_sys_open", 2, "MAXACTIVE is only for return probes"),
        ("r0 do_sys_open", 2, "MAXACTIVE must be 1..4096"),
        ("r5000 do_sys_open", 2, "MAXACTIVE must be 1..4096"),
        ("p:ev", 6, "a probe needs a place"),
        ("p do_sys_open+zz", 14, "bad offset"),
        ("p do_sys_open-4", 14, "an offset is added"),
        ("r do_sys_open+4", 14, "a return probe goes on a function's entry"),
        ("r do_sys_open%return", 14, "%return is for p lines"),
        ("p do_sys_open x=$retval", 17, "$retval is only for return probes"),
        ("-:", 3, "an event name is expected"),
        ("-:ev extra", 6, "nothing may follow"),
        ("p /bin/bash:0x10(zz)", 18, "bad reference-counter offset"),
    ],
)
def test_errors_name_the_column(line, column, reason):
    with pytest.raises(EventsFileError) as info:
        parse_text("# first\n" + line, source="probes.txt")
    err = info.value
    assert (err.line, err.column) == (2, column), str(err)
    assert reason in err.reason
    assert str(err).startswith(f"probes.txt:2:{column}: ")
    assert str(err).splitlines()[1:] == [f"  {line}", "  " + " " * (column - 1) + "^"]
    assert err.data()["line"] == 2 and err.data()["column"] == column


@given(st.text(alphabet="pr-:/ 0123456789xX+%()abcdefgsymo_.$@\\=#", max_size=40))
def test_near_grammatical_garbage_only_ever_raises_events_file_errors(line):
    try:
        parse_line(line)
    except EventsFileError as exc:
        # (A missing word is pointed at where it would start, after a space: one past the end at most.)
        assert 1 <= exc.column <= len(line) + 2
