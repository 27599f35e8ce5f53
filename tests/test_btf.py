"""The BTF reader: layouts it decodes from a blob written to a known shape, and the real Debian kernel's."""

from __future__ import annotations

import io

import pytest

from probed.guest.linux.btf import ARRAY, PTR, STRUCT, UNION, Btf, BtfError, UnknownMember, UnknownType
from tests.btf_builder import model_kernel


@pytest.fixture(scope="module")
def btf():
    return Btf(model_kernel())


def test_struct_members_and_their_offsets(btf):
    how = btf.struct("open_how")
    assert [(m.name, m.bit_offset, btf.describe(m.type)) for m in btf.members(how)] == [
        ("flags", 0, "__u64"), ("mode", 64, "__u64"), ("resolve", 128, "__u64")]
    assert btf.size_of(how) == 24


def test_members_of_anonymous_unions_and_bitfields(btf):
    task = btf.struct("task_struct")  # the definition, not the forward declaration before it
    assert btf.type(task).kind == STRUCT and btf.size_of(task) == 72
    a, b = btf.member(task, "a"), btf.member(task, "b")
    assert (a.bit_offset, b.bit_offset, btf.describe(a.type), btf.describe(b.type)) == (
        96, 96, "unsigned int", "short unsigned int")
    assert [(m.bit_offset, m.bitfield_size) for m in map(lambda n: btf.member(task, n), ("in_exec", "prio", "spill"))] \
        == [(128, 1), (129, 5), (158, 6)]
    assert btf.strip(btf.members(task)[3].type).kind == UNION
    assert "a" in btf.member_names(task) and "" not in btf.member_names(task)


def test_typedefs_qualifiers_pointers_and_arrays(btf):
    task = btf.struct("task_struct")
    pid = btf.member(task, "pid")
    assert btf.describe(pid.type) == "pid_t" and btf.strip(pid.type).name == "int"
    assert btf.int_encoding(btf.strip(pid.type)) == (True, 32)
    comm = btf.member(task, "comm")
    assert btf.describe(comm.type) == "char[16]" and btf.strip(comm.type).kind == ARRAY
    assert btf.size_of(comm.type) == 16
    name = btf.member(btf.struct("inner"), "name")
    assert btf.describe(name.type) == "const char *" and btf.strip(name.type).kind == PTR
    parent = btf.member(task, "parent")
    assert btf.describe(parent.type) == "struct task_struct *" and btf.size_of(parent.type) == 8


def test_function_prototypes_with_parameter_names(btf):
    ret, params = btf.function("do_open")
    assert btf.describe(ret) == "long int"
    assert [(p.name, btf.describe(p.type)) for p in params] == [
        ("dfd", "int"), ("filename", "const char *"), ("how", "struct open_how *")]
    assert btf.function("wake")[0] == 0 and btf.describe(0) == "void"
    assert [p.name for p in btf.function("no_names")[1]] == ["", ""]
    assert btf.function("not_there") is None


def test_unknown_members_and_structs_name_the_closest(btf):
    with pytest.raises(UnknownMember) as info:
        btf.member(btf.struct("task_struct"), "comn")
    assert str(info.value) == "struct task_struct has no member 'comn'; closest fields: comm"
    with pytest.raises(UnknownType, match="no struct 'open_hw'; did you mean open_how"):
        btf.struct("open_hw")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:10], "too short"),
    (lambda b: b"\x00\x00" + b[2:], "bad BTF magic"),
    (lambda b: b[:2] + b"\x02" + b[3:], "BTF version 2"),
    (lambda b: b[:-5], "past the blob"),
])
def test_damaged_blobs_are_refused(damage, message):
    with pytest.raises(BtfError, match=message):
        Btf(damage(model_kernel()))


@pytest.fixture(scope="module")
def kernel_btf():
    """The BTF of the Debian kernel the Linux tests boot, from its image's .BTF section (no QEMU)."""
    from elftools.elf.elffile import ELFFile

    from tests.linux.guest import LinuxUnavailable, fetch_linux
    from tests.linux.kernel_image import vmlinux_from_bzimage

    try:
        files = fetch_linux()
    except LinuxUnavailable as exc:
        pytest.skip(f"no Debian kernel: {exc}")
    elf = ELFFile(io.BytesIO(vmlinux_from_bzimage(files.vmlinuz.read_bytes())))
    return Btf(elf.get_section_by_name(".BTF").data())


@pytest.mark.linux
def test_the_debian_kernels_types(kernel_btf):
    btf = kernel_btf
    assert btf.count > 50_000
    assert [p.name for p in btf.function("vfs_read")[1]] == ["file", "buf", "count", "pos"]  # as fprobetrace.rst shows
    assert [(p.name, btf.describe(p.type)) for p in btf.function("do_sys_openat2")[1]] == [
        ("dfd", "int"), ("filename", "const char *"), ("how", "struct open_how *")]
    task = btf.struct("task_struct")
    assert btf.describe(btf.member(task, "comm").type) == "char[16]"
    assert btf.describe(btf.member(task, "pid").type) == btf.describe(btf.member(task, "tgid").type) == "pid_t"
    assert btf.member(task, "tgid").bit_offset == btf.member(task, "pid").bit_offset + 32
    # struct sk_buff's first members sit in anonymous unions and structs, as C lets one name them.
    skb = btf.struct("sk_buff")
    assert btf.member(skb, "next").bit_offset == 0 and btf.member(skb, "dev").bit_offset > 0
    assert btf.member(skb, "cloned").bitfield_size == 1
