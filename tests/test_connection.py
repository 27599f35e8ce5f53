"""The RSP client against real QEMU: registers, memory, breakpoints, steps, watchpoints, monitor, threads."""

from __future__ import annotations

import capstone
import pytest
import trio

from probed.engine.target import Target
from probed.guest.symbols import SymbolStore
from probed.testing.qemu import QemuGuest
from rsp.connection import RSPClient
from rsp.errors import LocalProtocolError, RemoteError
from rsp.stop import StopReply, ThreadId


async def attach(guest) -> tuple[Target, SymbolStore]:
    symbols = SymbolStore()
    if guest.elf:
        symbols.add_file(guest.elf)
    target = Target(await RSPClient.connect(guest.target), symbols)
    await target.attach()
    return target, symbols


async def run_to(target: Target, address: int) -> StopReply:
    client = target.client
    assert await client.request(b"Z0,%x,%x" % (address, target.arch.breakpoint_kind)) == b"OK"
    await client.resume(b"c")
    with trio.fail_after(30):
        stop = await client.wait_stop()
    assert await client.request(b"z0,%x,%x" % (address, target.arch.breakpoint_kind)) == b"OK"
    return stop


async def test_breakpoint_registers_memory_and_one_step(guest):
    target, symbols = await attach(guest)
    client = target.client
    entry = symbols.lookup("probe_target").address
    stop = await run_to(target, entry)
    assert stop.signal == 5 and stop.thread == ThreadId(1)

    regs = target.layout.decode(await target.read_g())
    arch = target.arch
    assert regs[arch.pc] == entry
    # The first call is probe_target(1, 4, names[1]).
    if arch.name == "i386":
        args = await client.read_memory(regs["esp"] + 4, 8)
        assert (int.from_bytes(args[:4], "little"), int.from_bytes(args[4:], "little")) == (1, 4)
    else:
        assert (regs["rdi"], regs["rsi"]) == (1, 4)

    # One `s` moves exactly one instruction.
    code = await client.read_memory(entry, 16)
    mode = capstone.CS_MODE_32 if arch.name == "i386" else capstone.CS_MODE_64
    length = next(capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(code, entry)).size
    await client.resume(b"s")
    with trio.fail_after(10):
        assert (await client.wait_stop()).signal == 5
    assert target.pc_of(await target.read_g()) == entry + length

    # Memory writes land.
    watched = symbols.lookup("watched").address
    await client.write_memory(watched, b"\x78\x56\x34\x12")
    assert await client.read_memory(watched, 4) == b"\x78\x56\x34\x12"
    # A large write is split under QEMU's packet size (hex doubles it), and reads back whole.
    pattern = bytes(range(256)) * 20
    await client.write_memory(0x300000, pattern)
    assert await client.read_memory(0x300000, len(pattern)) == pattern
    # A large read is split under QEMU's 2048-byte limit.
    assert len(await client.read_memory(entry, 5000)) == 5000
    # An unmapped address is a typed error.
    with pytest.raises(RemoteError):
        await client.read_memory(0x20000000, 4)
    await client.aclose()


async def test_write_watchpoint_stops_with_the_address(guest):
    target, symbols = await attach(guest)
    client = target.client
    watched = symbols.lookup("watched").address
    width = target.arch.word_size
    assert await client.request(b"Z2,%x,%x" % (watched, width)) == b"OK"
    await client.resume(b"c")
    with trio.fail_after(30):
        stop = await client.wait_stop()
    assert stop.reason == "watch" and stop.watch_address == watched
    # QEMU (x86) stops after the store: the value is the first turn's, turn * 3.
    assert int.from_bytes(await client.read_memory(watched, width), "little") == 3
    write_watched = symbols.lookup("write_watched")
    pc = target.pc_of(await target.read_g())
    assert write_watched.address < pc < write_watched.address + write_watched.size
    await client.aclose()


async def test_monitor_command_output(guest_i386):
    target, _ = await attach(guest_i386)
    assert "VM status: paused" in await target.client.monitor("info status")
    await target.client.aclose()


async def test_connecting_to_a_running_guest():
    with QemuGuest("i386", stopped=False) as guest:
        client = await RSPClient.connect(guest.target)
        target = Target(client, SymbolStore())
        stop = await target.attach()
        assert stop is not None and stop.signal in (2, 5)
        assert client.pending_stops == type(client.pending_stops)()
        assert await client.request(b"qAttached") == b"1"  # QEMU attached to an existing process (the guest)
        await client.aclose()


async def test_smp_reports_both_threads(guest_smp):
    target, _ = await attach(guest_smp)
    assert target.threads == [ThreadId(1), ThreadId(2)]
    assert target.step_packet(ThreadId(2)) == b"vCont;s:02"
    await target.client.aclose()


@pytest.mark.parametrize(
    ("arch", "machine", "pc", "sp"),
    [("aarch64", ["-M", "virt", "-cpu", "cortex-a57"], "pc", "sp"), ("riscv64", ["-M", "virt"], "pc", "sp")],
)
async def test_other_architectures_layouts(arch, machine, pc, sp):
    with QemuGuest(arch, bare=True, extra_args=machine, memory="128M") as guest:
        target, _ = await attach(guest)
        assert target.arch.name == arch
        g = await target.read_g()
        present = target.layout.present(g)
        assert len(g) // 2 == sum(r.size for r in present)
        names = {r.name for r in present}
        assert {pc, sp} <= names
        regs = target.layout.decode(g)
        assert target.layout.encode(regs, len(g) // 2) == g
        await target.client.aclose()


async def test_writes_behind_land_before_later_requests_and_refusals_are_kept(guest):
    target, symbols = await attach(guest)
    client = target.client
    turns = symbols.lookup("turns").address
    await client.post([b"M%x,4:78563412" % turns])  # no waiting for its OK
    assert await client.request(b"m%x,4" % turns) == b"78563412"
    bad = b"M%x,4:00" % turns  # two digits for four bytes: QEMU refuses it
    await client.post([bad, b"M%x,4:01000000" % turns])
    assert await client.request(b"m%x,4" % turns) == b"01000000"
    assert [request for request, _ in client.deferred_errors] == [bad]
    assert client.deferred_errors[0][1][:1] == b"E"


async def test_replies_taken_one_by_one_after_one_write(guest):
    target, symbols = await attach(guest)
    client = target.client
    turns = symbols.lookup("turns").address
    await client.begin([b"g", b"m%x,4" % turns])
    assert len(await client.next_reply()) == 2 * target.layout.g_size
    with pytest.raises(LocalProtocolError):
        await client.request(b"g")  # the second reply is still to be taken: it would be taken as this one's
    assert await client.next_reply() == await client.request(b"m%x,4" % turns)
