"""Watchpoints (kwatch) and hardware breakpoints, and the debug-register slots they share."""

from __future__ import annotations

import pytest
import trio

from probed.api import attach
from probed.errors import BadSpec, SlotsExhausted, UnknownSymbol


async def records_of(engine, probe, n):
    with trio.fail_after(60):
        with engine.hub.subscribe(probe.id, maxsize=n + 100) as sub:
            await engine.resume()
            return [await sub.receive() for _ in range(n)]


async def read_word(engine, name):
    address = engine.symbols.lookup(name).address
    data = await engine.call_stopped(lambda: engine.target.client.read_memory(address, engine.arch.word_size))
    return int.from_bytes(data, "little")


async def test_write_watch_sees_every_write_with_old_and_new(guest):
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True) as engine:
        probe = await engine.add_watch("watched", pre=["w=@writes:u32"])
        records = await records_of(engine, probe, 12)
        await engine.hold()
        writes = await read_word(engine, "writes")
    write_watched = engine.symbols.lookup("write_watched")
    for n, rec in enumerate(records, start=1):
        assert rec["kind"] == "watch" and rec["access"] == "write"
        assert rec["addr"] == hex(engine.symbols.lookup("watched").address)
        assert (rec["old"], rec["new"]) == (3 * (n - 1), 3 * n)
        # QEMU stops after the store; the record names the storing instruction itself.
        assert rec["where"].startswith("write_watched+")
        assert write_watched.address < int(rec["pc"], 16) < write_watched.address + write_watched.size
        # The store happened, its `writes++` not yet.
        assert rec["pre"] == {"w": n - 1}
    assert len({r["pc"] for r in records}) == 1
    # Every write was seen: hits equal the guest's own count (held after a store, before its count, or not).
    assert writes in (probe.hits, probe.hits - 1)


async def test_read_and_access_watches(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        reads = await engine.add_watch("read_me", access="r")
        got = await records_of(engine, reads, 5)
        assert [(r["access"], r["value"], r["old"], r["new"]) for r in got] == [("read", 0x5EED, None, None)] * 5
        assert {r["where"] for r in got} == {"read_watched"}  # its first instruction reads read_me
        await engine.hold()
        assert await read_word(engine, "reads") in (reads.hits, reads.hits - 1)
        await engine.remove_probe(reads.id)

        anyway = await engine.add_watch("watched", access="rw")
        got = await records_of(engine, anyway, 3)
        assert {r["access"] for r in got} == {"access"}


async def test_hardware_breakpoint_counts_like_a_software_one(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        hw = await engine.add_probe("probe_target", name="hw", hw=True, pre=["a=$arg1:u32"])
        sw = await engine.add_probe("probe_target", name="sw", pre=["a=$arg1:u32"])
        assert engine.stats()["slots"][0]["owner"] == "probe"
        with trio.fail_after(60):
            with engine.hub.subscribe(maxsize=1000) as sub:
                await engine.resume()
                got = [await sub.receive() for _ in range(20)]
        await engine.hold()
        assert hw.hits == sw.hits
        by_name = {"hw": [], "sw": []}
        for r in got:
            by_name[r["name"]].append(r["pre"]["a"])
        assert by_name["hw"] == by_name["sw"] == list(range(1, 11))
        await engine.remove_probe("hw")
        assert engine.slots.free_count == 4


async def test_slots_run_out_and_come_back(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], hw_slots=4) as engine:
        held = [await engine.add_watch(name) for name in ("watched", "writes", "read_me", "reads")]
        with pytest.raises(SlotsExhausted) as info:
            await engine.add_probe("elsewhere", hw=True)
        assert len(info.value.holders) == 4 and "watch watched" in info.value.holders[0]
        await engine.disable_probe(held[1].id)
        hbp = await engine.add_probe("elsewhere", hw=True)
        with pytest.raises(SlotsExhausted):
            await engine.enable_probe(held[1].id)
        await engine.remove_probe(hbp.id)
        await engine.enable_probe(held[1].id)
        owners = [s["owner"] for s in engine.stats()["slots"]]
        assert owners == ["probe"] * 4


async def test_bad_watches_are_refused(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)]) as engine:
        with pytest.raises(BadSpec, match="not aligned"):
            await engine.add_watch("watched+1", length=4)
        with pytest.raises(BadSpec, match="1, 2 or 4 bytes on i386"):
            await engine.add_watch("watched", length=8)
        with pytest.raises(BadSpec, match="1, 2 or 4"):
            await engine.add_watch("watched", length=3)
        with pytest.raises(UnknownSymbol):
            await engine.add_watch("no_such_global")
        with pytest.raises(BadSpec, match="access"):
            await engine.add_watch("watched", access="x")
        assert engine.probes() == [] and engine.slots.free_count == 4


async def test_a_probe_on_an_instruction_that_a_watchpoint_sees(guest_i386):
    """A probe without a post-handler gets past its instruction by simulating it, but not an instruction
    that touches memory while a watchpoint is set: the CPU's own access must trigger the watchpoint."""
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        probe = await engine.add_probe("read_watched")  # its first instruction reads read_me
        reads = await engine.add_watch("read_me", access="r")
        await records_of(engine, reads, 20)
        await engine.hold()
    # Held just after a probe hit and before its load, or not: never a load the watchpoint missed.
    assert reads.hits <= probe.hits <= reads.hits + 1
