"""Return probes (kretprobes) on real QEMU guests, through the library API.

The guests call `depth_sum(turn % 4)` on CPU 0 once per turn: turn % 4 + 1 nested calls, returning
0, 1, 3, 6 from the innermost out, with `$arg1` 0, 1, 2, 3 at their entries. CPU 1 of the SMP guest calls
`probe_target(0x100000 + k, k, ...)` (returns a + b) while CPU 0 calls `probe_target(n, 3n + 1, ...)`.
"""

from __future__ import annotations

import pytest
import trio

from probed.api import attach
from probed.errors import BadSpec, FetchSyntaxError

word = {"i386": "s32", "x86_64": "s64"}


def depth_returns(turns: range) -> list[tuple[int, int]]:
    """(n at entry, return value) of every depth_sum return in these turns, in the order they return."""
    out = []
    for turn in turns:
        for n in range(turn % 4 + 1):  # the innermost call returns first
            out.append((n, n * (n + 1) // 2))
    return out


async def take(engine, n, probe=None):
    out = []
    with trio.fail_after(90):
        with engine.hub.subscribe(probe.id if probe is not None else None, maxsize=n + 1000) as sub:
            await engine.resume()
            while len(out) < n:
                out.append(await sub.receive())
    return out


async def test_return_values_at_every_depth_in_order(guest):
    t = word[guest.arch]
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
        func = engine.symbols.lookup("depth_sum").address
        probe = await engine.add_probe("depth_sum", retprobe=True, pre=[f"ret=$retval:{t}", f"n=$arg1:{t}"])
        expected = depth_returns(range(1, 13))
        records = await take(engine, len(expected), probe)
        assert engine.stats()["reaped"] == 0
    assert [(r["pre"]["n"], r["pre"]["ret"]) for r in records] == expected
    assert [r["seq"] for r in records] == list(range(1, len(expected) + 1))
    for r in records:
        assert r["kind"] == "return"
        assert r["func"] == hex(func)
        assert r["error"] is None
        assert r["entry_seq"] is None
        assert isinstance(r["duration_ns"], int) and r["duration_ns"] > 0
        # The pc is the return address: in depth_sum itself (the recursive call) or in its caller.
        assert r["where"].split("+")[0] in ("depth_sum", "cpu0_main")
    # The outermost call returns to the loop; every inner one returns into depth_sum.
    outer = {r["pc"] for r, (n, _) in zip(records, expected, strict=True) if n == 3}
    inner = {r["pc"] for r, (n, _) in zip(records, expected, strict=True) if n < 3}
    assert len(outer) == 1 and len(inner) == 2  # main's return address, and depth_sum's (inner and from main)


async def test_entry_and_return_probes_on_one_function_count_the_same(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        entry = await engine.add_probe("depth_sum", name="entry", pre=["n=$arg1:s32"])
        ret = await engine.add_probe("depth_sum", name="ret", retprobe=True, pre=["n=$arg1:s32", "r=$retval:s32"])
        await engine.add_probe("elsewhere", name="turn", pre=["t=$arg1:s32"])
        assert engine.stats()["breakpoints"] == 2  # one at depth_sum for both probes, one at elsewhere
        records = []
        with trio.fail_after(90), engine.hub.subscribe(maxsize=10000) as sub:
            await engine.resume()
            while True:
                rec = await sub.receive()
                if rec["name"] == "turn" and rec["pre"]["t"] == 9:
                    break
                records.append(rec)
            await engine.hold()
            # Held somewhere later: every entry so far either returned or is a call still in flight.
            assert entry.hits - ret.hits == engine.stats()["return_instances"] >= 0
        assert engine.stats()["reaped"] == 0
    # Records come in hit order: before turn 9's `elsewhere`, depth_sum ran turns 1..8, and every call
    # entered and returned.
    calls = sum(t % 4 + 1 for t in range(1, 9))
    entries = [r for r in records if r["name"] == "entry"]
    returns = [r for r in records if r["name"] == "ret"]
    assert len(entries) == len(returns) == calls
    assert [(r["pre"]["n"], r["pre"]["r"]) for r in returns] == depth_returns(range(1, 9))
    # Each return names the entry record of its call.
    by_seq = {r["seq"]: r for r in entries}
    for r in returns:
        assert by_seq[r["entry_seq"]]["pre"]["n"] == r["pre"]["n"]
        assert by_seq[r["entry_seq"]]["stop"] < r["stop"]


async def test_both_cpus_return_their_own_sums(guest_smp):
    async with attach(guest_smp.target, symbols=[str(guest_smp.elf)], stopped=True) as engine:
        probe = await engine.add_probe(
            "probe_target", retprobe=True, pre=["a=$arg1:s32", "b=$arg2:s32", "sum=$retval:s32", "calls=@calls:u32"]
        )
        records = await take(engine, 300, probe)
    by_cpu = {0: [], 1: []}
    for r in records:
        by_cpu[r["cpu"]].append(r["pre"])
    assert by_cpu[0] and by_cpu[1]
    for pre in by_cpu[0] + by_cpu[1]:
        assert pre["sum"] == pre["a"] + pre["b"]
    # CPU 0's calls n = 1, 2, ... (b = 3n + 1); CPU 1's k = 1, 2, ... (a = 0x100000 + k, b = k), each in order.
    assert [(p["a"], p["b"]) for p in by_cpu[0]] == [(n, 3 * n + 1) for n in range(1, len(by_cpu[0]) + 1)]
    assert [(p["a"], p["b"]) for p in by_cpu[1]] == [(0x100000 + k, k) for k in range(1, len(by_cpu[1]) + 1)]


async def test_a_python_return_handler_sees_the_entry(guest_x86_64):
    def handler(ctx):
        return {"ret": ctx.retval, "n": ctx.entry.regs["rdi"], "sp_moved": ctx.regs["rsp"] - ctx.entry.sp,
                "ra": ctx.pc == ctx.entry.return_address}

    async with attach(guest_x86_64.target, symbols=[str(guest_x86_64.elf)], stopped=True) as engine:
        probe = await engine.add_probe("depth_sum", retprobe=True, pre=handler)
        expected = depth_returns(range(1, 5))
        records = await take(engine, len(expected), probe)
    assert [(r["pre"]["n"], r["pre"]["ret"]) for r in records] == expected
    assert {r["pre"]["sp_moved"] for r in records} == {8}  # `ret` popped the return address
    assert all(r["pre"]["ra"] for r in records)


async def test_maxactive_bounds_calls_in_flight(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        probe = await engine.add_probe("depth_sum", retprobe=True, maxactive=2, pre=["n=$arg1:s32", "r=$retval:s32"])
        # Turns 1..4 nest 2, 3, 4, 1 calls; only the two outermost of each are kept (the entries past the
        # limit are missed), and those return last.
        records = await take(engine, 2 + 2 + 2 + 1, probe)
        assert probe.missed >= 0 + 1 + 2
    kept = [(r["pre"]["n"], r["pre"]["r"]) for r in records]
    assert kept == [(0, 0), (1, 1), (1, 1), (2, 3), (2, 3), (3, 6), (0, 0)]


async def test_bad_return_probes_get_clear_errors(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        with pytest.raises(BadSpec, match="without an offset"):
            await engine.add_probe("depth_sum+3", retprobe=True)
        with pytest.raises(BadSpec, match="no post-handler"):
            await engine.add_probe("depth_sum", retprobe=True, post=[])
        with pytest.raises(BadSpec, match="maxactive is for return probes"):
            await engine.add_probe("depth_sum", maxactive=3)
        with pytest.raises(BadSpec, match="maxactive must be"):
            await engine.add_probe("depth_sum", retprobe=True, maxactive=-1)
        with pytest.raises(FetchSyntaxError, match="only for return probes"):
            await engine.add_probe("depth_sum", pre=["r=$retval"])
        assert engine.probes() == [] and engine.stats()["breakpoints"] == 0
        # Removing a return probe with calls in flight takes its return breakpoints too.
        probe = await engine.add_probe("depth_sum", retprobe=True, pre=["r=$retval:s32"])
        await take(engine, 3, probe)
        await engine.hold()
        await engine.remove_probe(probe.id)
        assert engine.stats()["breakpoints"] == 0 and engine.stats()["return_instances"] == 0
