"""The GDB stub spoken to in plain RSP (our own client standing in for GDB), next to the same guest direct.

Two identical guests; one client talks to QEMU directly, the other to probed's stub in
front of the second guest. Whatever the stub does to be quick (stop replies with every register,
simulated instructions written behind, memory served from what it read at the stop), the client must see
exactly what QEMU shows directly.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import capstone
import pytest
import trio

from probed.engine.breakhits import SPURIOUS_RETRIES
from probed.engine.engine import Engine
from probed.testing.qemu import QemuGuest
from rsp.connection import RSPClient
from rsp.stop import StopReply
from stub.server import expedited, serve_gdb


@asynccontextmanager
async def through_stub(guest: QemuGuest, tmp_path):
    """An engine on `guest`, its stub, and a client connected to the stub."""
    engine = Engine(guest.target, symbol_files=[str(guest.elf)], stopped=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        sock = tmp_path / "gdb.sock"
        await nursery.start(serve_gdb, engine, f"unix:{sock}")
        client = await RSPClient.connect(f"unix:{sock}")
        try:
            assert (await client.request(b"?"))[:3] == b"T05"
            yield engine, client
        finally:
            await client.request(b"D")
            await client.aclose()
            nursery.cancel_scope.cancel()


async def stop_after(client: RSPClient, command: bytes) -> StopReply:
    await client.resume(command)
    with trio.fail_after(30):
        stop = await client.wait_stop()
    assert isinstance(stop, StopReply) and stop.signal == 5, stop
    return stop


async def step_doing_something(direct: RSPClient, before: bytes) -> tuple[StopReply, bytes]:
    """A step straight to QEMU, done again while it changed no register (at most SPURIOUS_RETRIES times).

    QEMU 7.2 now and then ends a step without running the instruction, and always does on the step after
    one that hit a watchpoint; the stub does its steps again then (GDB gets a step that did a step), so
    the client talking to QEMU directly does the same here.
    """
    for _ in range(SPURIOUS_RETRIES + 1):
        stop = await stop_after(direct, b"s")
        after = await direct.request(b"g")
        if after != before or stop.reason is not None:
            break
    return stop, after


async def same_steps(direct: RSPClient, client: RSPClient, engine: Engine, count: int) -> tuple[int, int]:
    """Step both `count` times, comparing what each client sees; returns how many steps hit a watchpoint,
    and at how many the two guests' stacks were compared."""
    layout = engine.target.layout
    carried = {layout.registers[name].regnum for name in expedited(engine.arch)}
    own_stack = engine.symbols.lookup("stack0_top").address
    compared = 0
    watched = 0
    g = await direct.request(b"g")
    for n in range(count):
        want, g = await step_doing_something(direct, g)
        got = await stop_after(client, b"s")
        # The stop reply carries sp, fp and pc as `g` has them; GDB's `g` gets the rest, from the stop.
        assert got.registers == {k: v for k, v in layout.expedited(g).items() if k in carried}, f"step {n + 1}"
        assert len(got.registers) == 3, f"step {n + 1}"
        assert await client.request(b"g") == g, f"step {n + 1}"
        # The stack, where a simulated push writes: as QEMU has it; and, on the guest's own stack (whose
        # bytes the guest wrote), as the other guest has it (the firmware's stack holds what its timers
        # left there, which differs from run to run).
        sp = layout.value(g, engine.arch.sp)
        read = b"m%x,20" % (max(sp, 16) - 16)
        seen = await client.request(read)
        assert seen == await engine.call_stopped(lambda read=read: engine.client.request(read)), f"step {n + 1}"
        if own_stack - 16384 <= sp - 16 and sp + 16 <= own_stack:
            assert seen == await direct.request(read), f"step {n + 1}"
            compared += 1
        assert not want.registers
        assert (got.reason, got.watch_address) == (want.reason, want.watch_address), f"step {n + 1}"
        watched += want.reason is not None
    return watched, compared


async def test_a_continues_stop_carries_every_register_and_a_steps_three(tmp_path):
    """GDB shows the frame it stopped in after a continue and reads every register for it: they come with
    the stop reply. After a step it looks at sp, fp and pc only."""
    with QemuGuest("i386") as guest:
        async with through_stub(guest, tmp_path) as (engine, client):
            layout = engine.target.layout
            entry = engine.symbols.lookup("probe_target").address
            assert await client.request(b"Z0,%x,1" % entry) == b"OK"
            stop = await stop_after(client, b"c")
            g = await client.request(b"g")
            every = layout.expedited(g)
            assert stop.registers == every and len(every) > 3
            assert layout.value(g, engine.arch.pc) == entry
            assert await client.request(b"z0,%x,1" % entry) == b"OK"
            step = await stop_after(client, b"s")
            carried = {layout.registers[name].regnum for name in expedited(engine.arch)}
            assert step.registers == {k: v for k, v in layout.expedited(await client.request(b"g")).items() if k in carried}
            assert len(step.registers) == 3


async def run_both_to(direct: RSPClient, client: RSPClient, address: int) -> None:
    for c in (direct, client):
        assert await c.request(b"Z0,%x,1" % address) == b"OK"
        await stop_after(c, b"c")
        assert await c.request(b"z0,%x,1" % address) == b"OK"


@pytest.mark.parametrize("arch", ["i386", "x86_64"])
async def test_stepping_through_the_stub_shows_what_qemu_shows(arch, tmp_path):
    with QemuGuest(arch) as direct_guest, QemuGuest(arch) as guest:
        direct = await RSPClient.connect(direct_guest.target)
        async with through_stub(guest, tmp_path) as (engine, client):
            # From the guest's entry on (the firmware before it waits on timers: not the same twice).
            # On x86_64 that is 32-bit code, not the target's width (`push ebx` is not `push rbx`):
            # stepped, never simulated.
            await run_both_to(direct, client, engine.symbols.lookup("_start").address)
            await same_steps(direct, client, engine, 1000)
            if arch == "x86_64":
                assert engine.simulated == 0
            # The guest's C code, where most steps are simulated.
            await run_both_to(direct, client, engine.symbols.lookup("probe_target").address)
            simulated = engine.simulated
            _, compared = await same_steps(direct, client, engine, 1000)
            assert engine.simulated - simulated > 500
            assert compared == 1000  # the guest's C code runs on its own stack
            # Reads came from guest RAM (after a simulated write, from QEMU: RAM has it only once it is sent).
            assert engine.target.memory.direct and engine.target.memory.stats["direct"] > 0
        await direct.aclose()


async def test_a_watchpoint_sees_every_store_while_gdb_steps(tmp_path):
    """With a watchpoint set, instructions that touch memory are single-stepped, never simulated: the
    CPU's access is what triggers the watchpoint."""
    with QemuGuest("i386") as direct_guest, QemuGuest("i386") as guest:
        direct = await RSPClient.connect(direct_guest.target)
        async with through_stub(guest, tmp_path) as (engine, client):
            await run_both_to(direct, client, engine.symbols.lookup("probe_target").address)
            turns = engine.symbols.lookup("turns").address
            for c in (direct, client):
                assert await c.request(b"Z2,%x,4" % turns) == b"OK"
            watched, compared = await same_steps(direct, client, engine, 1000)
            assert watched > 0 and compared == 1000
            # Each step after a watchpoint hit ran nothing at first (QEMU), and was done again.
            assert engine.spurious_steps > 0
            for c in (direct, client):
                assert await c.request(b"z2,%x,4" % turns) == b"OK"
        await direct.aclose()


async def test_a_probe_stepped_right_after_a_watchpoint_hit(tmp_path):
    """QEMU's step after a step that hit a watchpoint runs nothing; a probe's step there is done again,
    so the probe fires once, its post-handler sees the instruction done, and GDB's step moves on."""
    with QemuGuest("i386") as guest:
        async with through_stub(guest, tmp_path) as (engine, client):
            # The store into `watched`, and the instruction after it.
            fn = engine.symbols.lookup("write_watched")
            code = bytes.fromhex((await client.request(b"m%x,%x" % (fn.address, fn.size))).decode())
            insns = list(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32).disasm(code, fn.address))
            store = next(i for i in insns if i.mnemonic == "mov" and i.op_str.startswith("dword ptr [0x"))
            after = store.address + store.size
            following = next(i for i in insns if i.address == after)
            assert await client.request(b"Z0,%x,1" % store.address) == b"OK"
            await stop_after(client, b"c")
            assert await client.request(b"z0,%x,1" % store.address) == b"OK"
            watched = engine.symbols.lookup("watched").address
            assert await client.request(b"Z2,%x,4" % watched) == b"OK"
            assert (await stop_after(client, b"s")).reason == "watch"  # the store, stepped
            probe = await engine.add_probe(hex(after), post=["ip=%ip:x32"])
            with engine.hub.subscribe(probe.id) as records:
                await stop_after(client, b"s")
                record = records.receive_nowait()
            assert engine.target.pc_of(await client.request(b"g")) == after + following.size
            assert record["post"] == {"ip": hex(after + following.size)} and probe.hits == 1
            assert engine.spurious_steps == 1
            assert await client.request(b"z2,%x,4" % watched) == b"OK"
