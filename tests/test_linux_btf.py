"""The kernel's types on a real two-CPU Debian kernel with KASLR on (the `linux_kaslr_guest`): `$comm`, `$pid`,
`$tid`, arguments by name and member chains from its BTF, checked against what the guest's own workload says.

The workload (tests/linux/init.sh) runs /bin/probed-open pinned to each CPU in turn; the script prints
"PROBED OPEN pid=<its PID> cpu=<its CPU>" on the console, then opens /etc/hostname (read-only), /dev/null
(for writing: the `2>/dev/null` of the next line) and /nonexistent (read-only; it fails).
"""

from __future__ import annotations

import re

import pytest
import trio

from probed.api import attach
from probed.errors import BadSpec, FetchSyntaxError
from probed.guest.insn import NotAnInstructionBoundary

pytestmark = pytest.mark.linux

# x86_64 open(2) flags (include/uapi/asm-generic/fcntl.h); the syscall adds O_LARGEFILE on 64-bit.
O_WRONLY, O_CREAT, O_TRUNC, O_LARGEFILE, O_CLOEXEC = 0o1, 0o100, 0o1000, 0o100000, 0o2000000
OPEN_ARGS = ["$comm", "$pid", "$tid", "filename:ustring", "how->flags", "how->mode", "dfd"]


def _console_runs(console: str) -> dict[int, int]:
    """PID -> CPU of every probed-open run the guest announced."""
    return {int(pid): int(cpu) for pid, cpu in re.findall(r"PROBED OPEN pid=(\d+) cpu=(\d+)", console)}


async def test_comm_pid_and_arguments_by_name_on_every_cpu(linux_kaslr_guest):
    guest = linux_kaslr_guest
    async with attach(guest.target, symbols=[str(guest.kallsyms)]) as engine:
        probe = await engine.add_probe("do_sys_openat2", name="opens", pre=OPEN_ARGS,
                                       condition='comm == "probed-open"')
        assert probe.pre.fields == ("comm", "pid", "tid", "filename", "how_flags", "how_mode", "dfd")
        runs: dict[int, list[dict]] = {}
        with trio.fail_after(120), engine.hub.subscribe(probe.id, maxsize=1000) as sub:
            # Complete runs (seen from their first open) until each CPU has had two.
            while sum(len(r) == 4 for r in runs.values()) < 4:
                rec = await sub.receive()
                pid = rec["pre"]["pid"]
                if pid in runs or rec["pre"]["filename"] == "/bin/probed-open":
                    runs.setdefault(pid, []).append(rec)
    announced = _console_runs(guest.console_log.read_text())
    complete = {pid: recs for pid, recs in runs.items() if len(recs) == 4}
    assert len(set(complete)) == len(complete) >= 4  # $pid changes with every new process
    for pid, recs in complete.items():
        cpu = announced[pid]  # the guest printed this PID: $pid is what the process itself saw as $$
        assert [r["cpu"] for r in recs] == [cpu] * 4  # pinned there, and found as current on that CPU
        assert [r["pre"] for r in recs] == [
            {"comm": "probed-open", "pid": pid, "tid": pid, "filename": "/bin/probed-open",
             "how_flags": O_LARGEFILE | O_CLOEXEC, "how_mode": 0, "dfd": -100},
            {"comm": "probed-open", "pid": pid, "tid": pid, "filename": "/etc/hostname",
             "how_flags": O_LARGEFILE, "how_mode": 0, "dfd": -100},
            {"comm": "probed-open", "pid": pid, "tid": pid, "filename": "/dev/null",
             "how_flags": O_LARGEFILE | O_WRONLY | O_CREAT | O_TRUNC, "how_mode": 0o666, "dfd": -100},
            {"comm": "probed-open", "pid": pid, "tid": pid, "filename": "/nonexistent",
             "how_flags": O_LARGEFILE, "how_mode": 0, "dfd": -100},
        ]
    assert {announced[pid] for pid in complete} == {0, 1}


async def test_member_chains_strings_of_char_pointers_and_bitfields(linux_kaslr_guest):
    guest = linux_kaslr_guest
    async with attach(guest.target, symbols=[str(guest.kallsyms)]) as engine:
        # do_filp_open(int dfd, struct filename *pathname, const struct open_flags *op): pathname->name is a
        # char *, followed by :string; $arg2->name the same by position; op->open_flag an int member.
        probe = await engine.add_probe(
            "do_filp_open", pre=["$comm", "pathname->name:string", "name2=$arg2->name:string", "op->open_flag",
                                 "uptr=pathname->uptr:x64", "cur=$current->comm", "tgid=$current->tgid", "$pid",
                                 "name3=+0(+filename.name(%si)):string"],
            condition='comm == "probed-open" && pathname_name ~ "/etc/*"')
        with trio.fail_after(120), engine.hub.subscribe(probe.id) as sub:
            rec = await sub.receive()
    pre = rec["pre"]
    assert (pre["comm"], pre["cur"], pre["tgid"]) == ("probed-open", "probed-open", pre["pid"])
    assert pre["pathname_name"] == pre["name2"] == pre["name3"] == "/etc/hostname"
    assert pre["op_open_flag"] & 0o3 == 0  # O_RDONLY (open_flag also carries FMODE bits the kernel adds)
    assert int(pre["uptr"], 16) != 0  # the user pointer the name was copied from


async def test_errors_name_the_struct_the_parameters_and_the_boundaries(linux_kaslr_guest):
    guest = linux_kaslr_guest
    async with attach(guest.target, symbols=[str(guest.kallsyms)]) as engine:
        with pytest.raises(FetchSyntaxError) as info:
            await engine.add_probe("do_sys_openat2", pre=["how->flagz"])
        assert "struct open_how has no member 'flagz'; closest fields: flags" in info.value.reason
        assert info.value.column == 6
        with pytest.raises(FetchSyntaxError, match="do_sys_openat2 has no parameter 'fname'.*filename"):
            await engine.add_probe("do_sys_openat2", pre=["fname"])
        with pytest.raises(FetchSyntaxError, match="the string types need char \\* or char\\[\\]"):
            await engine.add_probe("do_sys_openat2", pre=["how->flags:string"])
        with pytest.raises(FetchSyntaxError, match="file->f_path is struct path \\(16 bytes\\): pick a member with [.]"):
            await engine.add_probe("vfs_read", pre=["file->f_path.dentry", "file->f_path"])
        with pytest.raises(NotAnInstructionBoundary) as boundary:
            await engine.add_probe("vfs_read+4")
        assert isinstance(boundary.value, BadSpec)
        assert (boundary.value.before, boundary.value.after) == (0, 5)
        assert "inside the instruction at vfs_read+0x0 (nop" in str(boundary.value)
        assert engine.probes() == []
        # By register, a probe on code BTF knows nothing of still works; and at a boundary past the nop.
        await engine.add_probe("vfs_read+5", pre=["%di", "$comm"])
        assert [p.name for p in engine.probes()] == ["vfs_read_0x5"]


async def test_typed_args_through_the_control_server_and_their_record_bound(linux_kaslr_guest):
    from probed.front.control import ControlServer
    from probed.records.size import RecordTooLarge, worst_case_record_bytes

    guest = linux_kaslr_guest
    async with attach(guest.target, symbols=[str(guest.kallsyms)]) as engine:
        # A limit that two integers fit and three strings do not: typed args are parsed (and so bounded) only
        # once the engine has the kernel's types, after the probe was made; refused, it goes.
        server = ControlServer(engine, max_record_bytes=worst_case_record_bytes([]) + 1000)
        with pytest.raises(RecordTooLarge):
            await server.add({"spec": "do_sys_openat2", "pre": ["$comm", "filename:ustring", "n=filename:ustring"]})
        assert engine.probes() == []
        info = await server.add({"spec": "do_sys_openat2", "pre": ["dfd", "how->flags"]})
        assert [p.name for p in engine.probes()] == [info["name"]]
