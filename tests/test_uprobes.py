"""User-space probes on the real Debian kernel: static and static-pie programs, a copy of one under another
name, several processes at once started after the probe, a program removed while it runs, two probes in
one file, the first-fetch double stop, and GDB attached meanwhile.

The programs (tests/linux/uprogs/utarget.c) call utarget(i, i * i) and uname_len(argv[0]) for i = 1..N;
`PROG N hold` first prints its PID and waits for SIGUSR1, so its file is mapped while other programs run.
"""

from __future__ import annotations

import pytest

from probed.api import attach
from probed.errors import BadSpec, UnknownSymbol
from tests.linux.probing import by_pid, none_left, shell, take, uprog_copy

pytestmark = pytest.mark.linux

ARGS = ["$comm", "$pid", "a=$arg1:s64", "b=$arg2:s64"]


@pytest.fixture(scope="module")
def linux_guest(own_linux_guest):
    """A guest of this module's own: what other modules' tests left running in the session's guest would
    change what these tests count."""
    return own_linux_guest


def _calls(n: int) -> list[tuple[int, int]]:
    return [(i, i * i) for i in range(1, n + 1)]


async def test_static_pie_and_copy_at_once(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        static = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), pre=ARGS)
        pie = await engine.add_probe("/bin/utarget-pie:utarget", file_copy=uprog_copy("utarget-pie"), pre=ARGS)
        assert engine.uprobes.stats()["addresses"] == 0  # nothing maps them yet: only the kernel hooks are set
        with engine.hub.subscribe() as sub:
            await shell(linux_guest, "utarget 3 & utarget-pie 3 & ucopy 3 & utarget 2 & wait")
            records = await take(sub, 3 + 3 + 2)
            await none_left(engine, sub)
        stats = engine.uprobes.stats()
        await engine.remove_probe(static.id)
        await engine.remove_probe(pie.id)
        assert engine.stats()["breakpoints"] == 0  # the kernel hooks went with the last user probe
    static_runs = by_pid([r for r in records if r["probe"] == static.id])
    pie_runs = by_pid([r for r in records if r["probe"] == pie.id])
    assert sorted(len(r) for r in static_runs.values()) == [2, 3] and len(pie_runs) == 1
    for runs, comm in ((static_runs, "utarget"), (pie_runs, "utarget-pie")):
        for pid, recs in runs.items():
            assert [r["pre"] for r in recs] == [{"comm": comm, "pid": pid, "a": a, "b": b}
                                                for a, b in _calls(len(recs))]
            assert {r["where"] for r in recs} == {f"/bin/{comm}:utarget"}
    assert len(set(static_runs) | set(pie_runs)) == 3
    assert int(pie_runs[next(iter(pie_runs))][0]["pc"], 16) >= 1 << 40  # the PIE's random base, not its link address
    assert stats["addresses"] == 0  # every process exited: no user breakpoint left


async def test_copy_running_at_the_probed_address_never_fires(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        probe = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), pre=ARGS)
        with engine.hub.subscribe(probe.id) as sub:
            # utarget holds its mapping (the breakpoint armed) while ucopy, the same bytes, runs there.
            await shell(linux_guest, "utarget 3 hold | { read pid; ucopy 4; kill -USR1 $pid; }")
            records = await take(sub, 3)
            await none_left(engine, sub)
        assert engine.uprobes.silent == 4  # ucopy stopped at the very address four times, silently
        assert [(r["pre"]["comm"], r["pre"]["a"], r["pre"]["b"]) for r in records] == \
            [("utarget", a, b) for a, b in _calls(3)]


async def test_a_process_running_before_the_probe_is_found_in_its_vmas(linux_guest):
    # The held process maps utarget-pie (at a random base) before the probe exists: adding the probe reads
    # every process's VMAs (the mm's maple tree) and arms the address this one mapped.
    pid = int(await shell(linux_guest, "rm -f /tmp/uf; mkfifo /tmp/uf; (utarget-pie 3 hold > /tmp/uf &); "
                                        "read pid < /tmp/uf; echo $pid"))
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        probe = await engine.add_probe("/bin/utarget-pie:utarget", file_copy=uprog_copy("utarget-pie"), pre=ARGS)
        assert engine.uprobes.stats()["addresses"] == 1
        with engine.hub.subscribe(probe.id) as sub:
            await shell(linux_guest, f"kill -USR1 {pid}")
            records = await take(sub, 3)
    assert [r["pre"] for r in records] == [{"comm": "utarget-pie", "pid": pid, "a": a, "b": b} for a, b in _calls(3)]


async def test_program_removed_while_it_runs(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        await shell(linux_guest, "cp /bin/utarget /tmp/ut")
        probe = await engine.add_probe("/tmp/ut:utarget", file_copy=uprog_copy("utarget"), pre=ARGS)
        with engine.hub.subscribe(probe.id) as sub:
            # The held process runs after its file is gone; a new file at the same path is another inode.
            await shell(linux_guest, "/tmp/ut 3 hold | { read pid; rm /tmp/ut; cp /bin/utarget /tmp/ut; "
                                      "/tmp/ut 2; kill -USR1 $pid; }; rm /tmp/ut")
            records = await take(sub, 3)
            await none_left(engine, sub)
        assert [(r["pre"]["comm"], r["pre"]["a"], r["pre"]["b"]) for r in records] == \
            [("ut", a, b) for a, b in _calls(3)]
        assert engine.uprobes.stats()["addresses"] == 0


async def test_two_probes_in_one_file_by_offset_and_symbol_and_the_double_stop(linux_guest):
    elf_offset = _elf_offsets(uprog_copy("utarget"))
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        # _start is the first instruction run: its page is not present yet, so it stops twice for one run.
        start = await engine.add_probe("/bin/utarget:_start", file_copy=uprog_copy("utarget"), pre=["$comm"])
        name = await engine.add_probe(f"/bin/utarget:{elf_offset['uname_len']:#x}",
                                      pre=["$comm", "s=$arg1:ustring", "p=+0($arg1):u8"])
        with engine.hub.subscribe() as sub:
            silent = engine.uprobes.silent
            await shell(linux_guest, "utarget 2")
            records = await take(sub, 3)
            await none_left(engine, sub)
        assert engine.uprobes.silent - silent == 1
    assert [(r["probe"], r["pre"]) for r in records] == [
        (start.id, {"comm": "utarget"}),
        (name.id, {"comm": "utarget", "s": "utarget", "p": ord("u")}),
        (name.id, {"comm": "utarget", "s": "utarget", "p": ord("u")}),
    ]
    assert records[1]["where"] == f"/bin/utarget:{elf_offset['uname_len']:#x}"


async def test_bad_user_specs(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        with pytest.raises(UnknownSymbol) as err:
            await engine.add_probe("/bin/utarget:utargt", file_copy=uprog_copy("utarget"))
        assert "utarget" in err.value.suggestions
        with pytest.raises(BadSpec, match="--file-copy"):
            await engine.add_probe("/bin/utarget:utarget")
        with pytest.raises(BadSpec, match="dentry cache"):
            await engine.add_probe("/bin/nosuchprogram:0x1000")
        assert engine.probes() == [] and engine.stats()["breakpoints"] == 0


def _elf_offsets(path: str) -> dict[str, int]:
    from probed.guest.userfile import UserElf

    elf = UserElf(path)
    return {name: elf.resolve(name) for name in ("utarget", "uname_len", "_start")}
