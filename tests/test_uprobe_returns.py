"""Return probes on user functions (uretprobes) on the real Debian kernel: several processes at once started
after the probe (static and static-pie), a copy of the program under another name, recursion, entry and
return probes on one function, a process killed inside a probed call, bad specs.

The programs (tests/linux/uprogs/utarget.c) call utarget(i, i * i) (returns a + b), uname_len(argv[0])
(returns its length) and udepth(i) (recursive: n + udepth(n - 1), udepth(0) = 0) for i = 1..N;
`PROG N hold` first prints its PID and waits for SIGUSR1; `PROG N twice` makes its calls, then prints its
PID and waits, then makes them again; `PROG N threads`: two threads make them at once, thread t calling
utarget(100 * t + i, i * i).
"""

from __future__ import annotations

import pytest

from probed.api import attach
from probed.errors import BadSpec, FetchSyntaxError
from probed.guest.userfile import UserElf
from tests.linux.probing import by_pid, none_left, shell, take, uprog_copy

pytestmark = pytest.mark.linux

RET_ARGS = ["$comm", "$pid", "$tid", "a=$arg1:s64", "b=$arg2:s64", "ret=$retval:s64"]


@pytest.fixture(scope="module")
def linux_guest(own_linux_guest):
    """A guest of this module's own (what other modules left running would change the counts)."""
    return own_linux_guest


def _sums(n: int) -> list[dict]:
    return [{"a": i, "b": i * i, "ret": i + i * i} for i in range(1, n + 1)]


def _depth_returns(n: int) -> list[tuple[int, int]]:
    """(n at entry, udepth's return) of every udepth return for i = 1..n, in the order they return."""
    return [(k, k * (k + 1) // 2) for i in range(1, n + 1) for k in range(i + 1)]


async def test_returns_in_several_processes_with_their_entry_args(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        static = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), retprobe=True,
                                        pre=RET_ARGS)
        pie = await engine.add_probe("/bin/utarget-pie:utarget", file_copy=uprog_copy("utarget-pie"), retprobe=True,
                                     pre=RET_ARGS)
        length = await engine.add_probe("/bin/utarget:uname_len", file_copy=uprog_copy("utarget"), retprobe=True,
                                        pre=["$pid", "s=$arg1:ustring", "len=$retval:s64"])
        with engine.hub.subscribe() as sub:
            await shell(linux_guest, "utarget 3 & utarget-pie 3 & ucopy 3 & utarget 2 & wait")
            records = await take(sub, (3 + 2) * 2 + 3)
            await none_left(engine, sub)
        stats = engine.stats()
        for probe in (static, pie, length):
            await engine.remove_probe(probe.id)
        assert engine.stats()["breakpoints"] == 0
    assert {r["kind"] for r in records} == {"return"}
    static_runs = by_pid([r for r in records if r["probe"] == static.id])
    pie_runs = by_pid([r for r in records if r["probe"] == pie.id])
    assert sorted(len(r) for r in static_runs.values()) == [2, 3] and len(pie_runs) == 1
    for runs, comm, elf in ((static_runs, "utarget", UserElf(uprog_copy("utarget"))),
                            (pie_runs, "utarget-pie", UserElf(uprog_copy("utarget-pie")))):
        for pid, recs in runs.items():
            assert [{k: r["pre"][k] for k in ("a", "b", "ret")} for r in recs] == _sums(len(recs))
            assert {(r["pre"]["comm"], r["pre"]["tid"]) for r in recs} == {(comm, pid)}
            # where: the return site, in the file (the static program's file offset is its address - 4 MiB).
            if comm == "utarget":
                assert [r["where"] for r in recs] == [f"/bin/utarget:{elf.symbolize(int(r['pc'], 16) - 0x400000)}"
                                                      for r in recs]
            assert all(r["where"].startswith(f"/bin/{comm}:") and "utarget+" not in r["where"] for r in recs)
            assert all(r["duration_ns"] > 0 and r["entry_seq"] is None for r in recs)
            # func: the function's address in that process (the PIE's random base), pc: where it returned.
            (func,) = {int(r["func"], 16) for r in recs}
            assert func % 4096 == elf.resolve("utarget") % 4096
            assert all(int(r["pc"], 16) != func for r in recs)
    assert (int(next(iter(pie_runs.values()))[0]["func"], 16)) >= 1 << 40
    lengths = by_pid([r for r in records if r["probe"] == length.id])
    assert set(lengths) == set(static_runs)
    for recs in lengths.values():
        assert [(r["pre"]["s"], r["pre"]["len"]) for r in recs] == [("utarget", 7)] * len(recs)
    assert stats["return_instances"] == 0 and stats["reaped"] == 0
    assert stats["user"]["return_addresses"] == 0 and stats["user"]["addresses"] == 0  # all exited


async def test_a_copy_running_through_an_armed_return_address_passes_silently(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        probe = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), retprobe=True,
                                       pre=RET_ARGS)
        with engine.hub.subscribe(probe.id) as sub:
            # utarget returns through main's call site (armed, and kept armed while utarget lives), holds,
            # and ucopy (the same bytes at the same addresses) runs there four times; then utarget again.
            await shell(linux_guest, "utarget 3 twice | { read pid; ucopy 4; kill -USR1 $pid; }")
            records = await take(sub, 6)
            await none_left(engine, sub)
        user = engine.stats()["user"]
        assert user["silent_returns"] == 4 and user["silent_stops"] == 4  # ucopy's 4 returns, 4 entries
        assert user["return_addresses"] == 0 and engine.stats()["return_instances"] == 0
    assert [{k: r["pre"][k] for k in ("a", "b", "ret")} for r in records] == _sums(3) * 2
    assert {r["pre"]["comm"] for r in records} == {"utarget"}


async def test_threads_of_one_process_each_get_their_own_returns(linux_guest):
    def handler(ctx):  # a Python handler: the entry's registers and the return value
        return {"n": ctx.entry.regs["rdi"], "sum": ctx.retval, "sp_ok": ctx.regs["rsp"] == ctx.entry.sp + 8}

    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        sums = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), retprobe=True,
                                      pre=RET_ARGS)
        depth = await engine.add_probe("/bin/utarget:udepth", file_copy=uprog_copy("utarget"), retprobe=True,
                                       pre=handler)
        with engine.hub.subscribe() as sub:
            await shell(linux_guest, "utarget 3 threads")
            records = await take(sub, 2 * (3 + len(_depth_returns(3))))
            await none_left(engine, sub)
        assert engine.stats()["reaped"] == 0 and engine.stats()["return_instances"] == 0
    by_tid: dict[int, list[dict]] = {}
    for r in records:
        if r["probe"] == sums.id:
            by_tid.setdefault(r["pre"]["tid"], []).append(r["pre"])
    assert len(by_tid) == 2 and len({p["pid"] for recs in by_tid.values() for p in recs}) == 1
    assert sorted(recs[0]["a"] // 100 for recs in by_tid.values()) == [1, 2]
    for recs in by_tid.values():
        base = recs[0]["a"] // 100 * 100
        assert [(p["a"], p["b"], p["ret"]) for p in recs] == [(base + i, i * i, base + i + i * i) for i in (1, 2, 3)]
        assert recs[0]["tid"] != recs[0]["pid"]  # (the threads, not the main one)
    depths = [r["pre"] for r in records if r["probe"] == depth.id]
    # Both threads' recursions, each in its own order (they may interleave between calls).
    assert sorted((d["n"], d["sum"]) for d in depths) == sorted(_depth_returns(3) * 2)
    assert all(d["sp_ok"] for d in depths)


async def test_recursion_with_an_entry_probe_on_the_same_function(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        entry = await engine.add_probe("/bin/utarget-pie:udepth", file_copy=uprog_copy("utarget-pie"),
                                       pre=["$pid", "n=$arg1:s64"])
        ret = await engine.add_probe("/bin/utarget-pie:udepth", file_copy=uprog_copy("utarget-pie"), retprobe=True,
                                     pre=["$pid", "n=$arg1:s64", "sum=$retval:s64"])
        calls = len(_depth_returns(3))
        with engine.hub.subscribe() as sub:
            await shell(linux_guest, "utarget-pie 3 & utarget-pie 3 & wait")
            records = await take(sub, 4 * calls)
            await none_left(engine, sub)
        assert engine.stats()["return_instances"] == 0 and engine.stats()["reaped"] == 0
    entries = by_pid([r for r in records if r["probe"] == entry.id])
    returns = by_pid([r for r in records if r["probe"] == ret.id])
    assert len(returns) == 2 and set(entries) == set(returns)
    for pid, recs in returns.items():
        assert [(r["pre"]["n"], r["pre"]["sum"]) for r in recs] == _depth_returns(3)
        # Each return names the entry record of its own call: the same pid and the same n.
        by_seq = {r["seq"]: r for r in entries[pid]}
        assert [by_seq[r["entry_seq"]]["pre"]["n"] for r in recs] == [n for n, _ in _depth_returns(3)]


async def test_a_process_killed_inside_a_probed_call_leaves_nothing_behind(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        main = await engine.add_probe("/bin/utarget:main", file_copy=uprog_copy("utarget"), retprobe=True,
                                      pre=["$pid", "ret=$retval:s32"])
        with engine.hub.subscribe(main.id) as sub:
            # main is in flight (waiting for SIGUSR1) when the process is killed: it never returns.
            out = await shell(linux_guest, "utarget 1 hold | { read pid; kill -KILL $pid; echo $pid; }")
            (pid,) = [int(w) for w in out.split() if w.isdigit()]  # (and the shell says "Killed")
            await shell(linux_guest, "utarget 1")  # and one that returns
            (record,) = await take(sub, 1)
            await none_left(engine, sub)
        stats = engine.stats()
        assert stats["return_instances"] == 0 and stats["reaped"] == 1
        assert stats["user"]["return_addresses"] == 0 and stats["return_points"] == 0
        await engine.remove_probe(main.id)
        assert engine.stats()["breakpoints"] == 0
    assert record["pre"]["ret"] == 0 and record["pre"]["pid"] != pid


async def test_bad_user_return_specs(linux_guest):
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        with pytest.raises(BadSpec, match="entry"):
            await engine.add_probe("/bin/utarget:utarget+0x4", file_copy=uprog_copy("utarget"), retprobe=True)
        with pytest.raises(BadSpec, match="post-handler"):
            await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), retprobe=True, post=[])
        with pytest.raises(BadSpec, match="maxactive"):
            await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), retprobe=True,
                                   maxactive=5000)
        with pytest.raises(BadSpec, match="maxactive is for return probes"):
            await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), maxactive=3)
        with pytest.raises(FetchSyntaxError, match="only for return probes"):
            await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), pre=["$retval"])
        assert engine.probes() == [] and engine.stats()["breakpoints"] == 0


async def test_uprobe_events_return_lines_load_fire_and_save_back(linux_guest):
    from probed.front.kprobe_events import parse_text
    from probed.front.probe_files import apply_lines, save_text

    elf = UserElf(uprog_copy("utarget"))
    lines = [f"r:uprobes/sum_ret /bin/utarget:{elf.resolve('utarget'):#x} a=$arg1:s64 ret=$retval:s64",
             f"p:uprobes/len_ret /bin/utarget:{elf.resolve('uname_len'):#x}%return len=$retval:s64"]
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        groups: dict[int, str] = {}
        added = await apply_lines(engine, parse_text("\n".join(lines)), groups)
        assert [p["name"] for p in added["added"]] == ["sum_ret", "len_ret"]
        with engine.hub.subscribe() as sub:
            await shell(linux_guest, "utarget 2")
            records = await take(sub, 4)
            await none_left(engine, sub)
        saved = save_text(engine.probes(), groups)
    assert [(r["name"], r["pre"]) for r in records] == [
        ("sum_ret", {"a": 1, "ret": 2}), ("len_ret", {"len": 7}), ("sum_ret", {"a": 2, "ret": 6}), ("len_ret", {"len": 7})
    ]
    assert [line for line in saved.splitlines() if not line.startswith("#")] == [lines[0], "r" + lines[1][1:].replace("%return", "")]


async def test_returns_in_a_32bit_process_by_the_i386_abi(linux_guest):
    # utarget32 (static i386, cdecl: the return address and every argument on the stack, 4 bytes each)
    # calls utarget32(i, i * i, -i), which returns i * i.
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        probe = await engine.add_probe("/bin/utarget32:utarget32", file_copy=uprog_copy("utarget32"), retprobe=True,
                                       pre=["$comm", "a=$arg1:s32", "b=$arg2:s32", "c=$arg3:s32", "ret=$retval:s32"])
        with engine.hub.subscribe(probe.id) as sub:
            await shell(linux_guest, "utarget32 3")
            records = await take(sub, 3)
            await none_left(engine, sub)
        assert engine.stats()["return_instances"] == 0
    assert [r["pre"] for r in records] == [{"comm": "utarget32", "a": i, "b": i * i, "c": -i, "ret": i * i}
                                           for i in (1, 2, 3)]
    assert all(int(r["pc"], 16) < 1 << 32 for r in records)  # the 4-byte return address
