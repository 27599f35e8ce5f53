"""Breakpoint probes on real QEMU guests, through the library API.

The guests call `probe_target(n, 3n + 1, names[n % 4])` on turn n, and `calls` counts the calls, so every
hit can be checked exactly.
"""

from __future__ import annotations

import pytest
import trio

from probed.api import attach
from probed.errors import BadSpec, FetchSyntaxError, TargetError, UnknownSymbol

NAMES = ["alpha", "beta", "gamma", "delta"]


async def take(engine, probe, n):
    """The first n records of a probe (the guest must be held before this, so none are missed)."""
    out = []
    with trio.fail_after(60):
        with engine.hub.subscribe(probe.id, maxsize=n + 100) as sub:
            await engine.resume()
            while len(out) < n:
                out.append(await sub.receive())
    return out


async def test_every_hit_has_the_arguments_the_guest_passed(guest):
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
        probe = await engine.add_probe(
            "probe_target", pre=["a=$arg1:s32", "b=$arg2:s32", "name=+0($arg3):string", "calls=@calls:u32"]
        )
        records = await take(engine, probe, 40)
    for n, rec in enumerate(records, start=1):
        assert rec["seq"] == n
        assert rec["pre"] == {"a": n, "b": 3 * n + 1, "name": NAMES[n % 4], "calls": n - 1}
        assert rec["error"] is None
        assert rec["where"] == "probe_target"


async def test_post_handler_sees_the_instruction_done(guest):
    reg = "ax"
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
        insn = engine.symbols.lookup("reg_change_insn").address
        probe = await engine.add_probe(
            "reg_change_insn", pre=[f"v=%{reg}:u32", "pc=%ip:u64"], post=[f"v=%{reg}:u32", "pc=%ip:u64"]
        )
        records = await take(engine, probe, 5)
    for rec in records:
        assert rec["pre"] == {"v": 0x11111111, "pc": insn}
        assert rec["post"] == {"v": 0x22222222, "pc": insn + 5}
        assert rec["pc"] == hex(insn)


async def test_hits_equal_the_guest_counter_after_running(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        probe = await engine.add_probe("probe_target", pre=["calls=@calls:u32"])
        records = await take(engine, probe, 200)
        await engine.hold()
        # Through the engine (it owns the connection, and watches it while the guest is held).
        address = engine.symbols.lookup("calls").address
        raw = await engine.call_stopped(lambda: engine.target.client.read_memory(address, 4))
        calls_now = int.from_bytes(raw, "little")
    # Hit k saw calls == k - 1; when the guest was held it had made `hits` or `hits - 1` calls
    # (held between a hit and the increment in the function body).
    assert [r["pre"]["calls"] for r in records] == list(range(200))
    assert calls_now in (probe.hits, probe.hits - 1)


async def test_two_handlers_share_one_hook_point(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        first = await engine.add_probe("probe_target", name="first", pre=["a=$arg1:s32"])
        second = await engine.add_probe("probe_target", name="second", pre=["b=$arg2:s32"], priority=5)
        assert engine.stats()["breakpoints"] == 1
        with engine.hub.subscribe(maxsize=100) as sub:
            await engine.resume()
            got = [await sub.receive() for _ in range(6)]
        # Higher priority runs first; one stop serves both.
        assert [r["name"] for r in got] == ["second", "first"] * 3
        for n in range(3):
            s, f = got[2 * n], got[2 * n + 1]
            assert s["stop"] == f["stop"]
            assert s["pre"] == {"b": 3 * (n + 1) + 1} and f["pre"] == {"a": n + 1}
        await engine.remove_probe("second")
        assert engine.stats()["breakpoints"] == 1
        await engine.remove_probe(first.id)
        assert engine.stats()["breakpoints"] == 0
        assert second not in engine.probes()


async def test_add_disable_enable_remove_while_running(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)]) as engine:
        probe = await engine.add_probe("probe_target", pre=["a=$arg1:s32"])
        with engine.hub.subscribe(probe.id, maxsize=1000) as sub:
            first = [await sub.receive() for _ in range(5)]
            a = [r["pre"]["a"] for r in first]
            assert a == list(range(a[0], a[0] + 5))
            await engine.disable_probe(probe.id)
            hits = probe.hits
            assert engine.stats()["breakpoints"] == 0
            # A second probe shows the guest went on while the first was disabled.
            other = await engine.add_probe("elsewhere")
            with engine.hub.subscribe(other.id) as osub:
                for _ in range(3):
                    await osub.receive()
            assert probe.hits == hits
            await engine.enable_probe(probe.id)
            rec = await sub.receive()
            while rec["seq"] <= hits:  # records published before the disable took effect
                rec = await sub.receive()
            assert rec["seq"] == hits + 1
            await engine.remove_probe(probe.id)
            await engine.remove_probe(other.id)
        assert engine.stats()["breakpoints"] == 0


async def test_a_handler_that_raises_is_recorded_then_disabled(guest_i386):
    def broken(ctx):
        raise ValueError("no good")

    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True, fault_limit=4) as engine:
        probe = await engine.add_probe("probe_target", pre=broken)
        records = await take(engine, probe, 4)
        assert [r["error"] for r in records] == ["pre: ValueError: no good"] * 4
        await engine.hold()  # any request runs after the engine has acted on the fault limit
        assert probe.state.startswith("disabled: 4 handler faults in a row")
        assert probe.faults == 4
        assert engine.stats()["breakpoints"] == 0


async def test_python_handlers_read_memory(guest_i386):
    async def name_of(ctx):
        sp = ctx.regs["esp"]
        ptr = await ctx.read_u(sp + 12, 4)
        return {"name": await ctx.read_string(ptr), "cpu": ctx.cpu, "where": ctx.symbolize(ctx.pc)}

    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        probe = await engine.add_probe("probe_target", pre=name_of)
        records = await take(engine, probe, 8)
    assert [r["pre"] for r in records] == [
        {"name": NAMES[n % 4], "cpu": 0, "where": "probe_target"} for n in range(1, 9)
    ]


async def test_smp_reports_the_cpu_that_hit(guest_smp):
    async with attach(guest_smp.target, symbols=[str(guest_smp.elf)], stopped=True) as engine:
        probe = await engine.add_probe("probe_target", pre=["a=$arg1:u32"])
        by_cpu: dict[int, list[int]] = {0: [], 1: []}
        with trio.fail_after(120):
            with engine.hub.subscribe(probe.id, maxsize=10000) as sub:
                await engine.resume()
                while len(by_cpu[0]) < 20 or len(by_cpu[1]) < 20:
                    rec = await sub.receive()
                    by_cpu[rec["cpu"]].append(rec["pre"]["a"])
    # Each CPU's own sequence, hit by hit, with nothing missed and nothing counted twice.
    assert by_cpu[0] == list(range(1, len(by_cpu[0]) + 1))
    assert by_cpu[1] == list(range(0x100001, 0x100001 + len(by_cpu[1])))


async def test_bad_input_gets_clear_errors_and_changes_nothing(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)]) as engine:
        with pytest.raises(UnknownSymbol) as info:
            await engine.add_probe("probe_targt")
        assert "probe_target" in info.value.suggestions
        with pytest.raises(FetchSyntaxError) as info:
            await engine.add_probe("probe_target", pre=["a=+4(%esp:s32"])
        assert info.value.column > 0
        with pytest.raises(BadSpec):
            await engine.add_probe("probe_target+0x10000")
        with pytest.raises(BadSpec):
            await engine.add_probe("calls")  # data, not code
        with pytest.raises(TargetError):
            await engine.add_probe("0x20000000")  # nothing mapped there (64 MiB of RAM)
        assert engine.probes() == []
        assert engine.stats()["breakpoints"] == 0
        # The guest still runs: a probe added now fires.
        probe = await engine.add_probe("elsewhere")
        with engine.hub.subscribe(probe.id) as sub:
            with trio.fail_after(30):
                await sub.receive()


async def test_a_dead_target_is_a_clear_error(tmp_path):
    with pytest.raises(TargetError, match="cannot connect"):
        async with attach(f"unix:{tmp_path}/nothing.sock"):
            pass
