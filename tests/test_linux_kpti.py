"""Linux guests with kernel page-table isolation (KPTI, `pti=on`) on the real Debian kernel.

At a user-mode stop the CPU runs on the process's user PGD, which maps almost none of the kernel: QEMU's `m`
refuses the per-CPU `current_task`, and CR3 is the kernel PGD + 4 KiB. These tests show the guest is in
that state, then that kernel probes, user probes (`$comm`, `$pid`, `$tid`, `:ustring`, address spaces by
CR3) and kernel reads at user stops come out exact, through guest RAM and through the gdbstub alone.
"""

from __future__ import annotations

import pytest
import trio

from probed.api import attach
from probed.engine.target import Target
from probed.guest.symbols import SymbolStore
from rsp.connection import RSPClient
from rsp.errors import RemoteError
from tests.linux.conftest_linux import boot_linux_guest
from tests.linux.probing import none_left, shell, take, uprog_copy

pytestmark = pytest.mark.linux

MODES = ["auto", "gdbstub"]
USER_PGD_BIT = 1 << 12
GUARD_HOLE = 0xFFFF_8000_0000_0000  # the kernel half's first bytes: mapped in no Linux page table


@pytest.fixture(scope="module")
def kpti_guest(tmp_path_factory):
    """One guest for this module, booted with `pti=on` (QEMU's default CPU does not turn KPTI on itself)."""
    yield from boot_linux_guest(tmp_path_factory, cmdline="pti=on")


async def test_the_guest_runs_with_kpti(kpti_guest):
    log = await shell(kpti_guest, "dmesg")
    assert "Kernel/User page tables isolation: enabled" in log


@pytest.mark.parametrize("mode", MODES)
async def test_user_probes_with_kpti(kpti_guest, mode):
    async with attach(kpti_guest.target, symbols=[str(kpti_guest.kallsyms)], guest_memory=mode) as engine:
        args = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"),
                                      pre=["$comm", "$pid", "$tid", "a=$arg1:s64", "b=$arg2:s64"])
        name = await engine.add_probe("/bin/utarget-pie:uname_len", file_copy=uprog_copy("utarget-pie"),
                                      pre=["$comm", "$pid", "s=$arg1:ustring"])
        with engine.hub.subscribe() as sub:
            pids = (await shell(kpti_guest, "utarget 3 & a=$!; utarget-pie 2 & b=$!; wait; echo $a $b")).split()
            records = await take(sub, 3 + 2)
            await none_left(engine, sub)
        kpti_reads = engine.target.memory.stats["kpti"]
    static, pie = int(pids[0]), int(pids[1])
    assert [r["pre"] for r in records if r["probe"] == args.id] == [
        {"comm": "utarget", "pid": static, "tid": static, "a": a, "b": a * a} for a in (1, 2, 3)]
    assert [r["pre"] for r in records if r["probe"] == name.id] == [
        {"comm": "utarget-pie", "pid": pie, "s": "utarget-pie"}] * 2
    assert kpti_reads > 0  # $comm and $pid were read through the kernel PGD


@pytest.mark.parametrize("mode", MODES)
async def test_kernel_reads_at_a_user_stop(kpti_guest, mode):
    seen: list[dict] = []
    async with attach(kpti_guest.target, symbols=[str(kpti_guest.kallsyms)], guest_memory=mode) as engine:
        banner = engine.symbols.lookup("linux_banner").address

        async def handler(ctx):
            regs = ctx.regs
            current = engine.types.current
            percpu = regs[current.user_register] + current.percpu_offset
            wanted = [(percpu, 8), (banner, 14), (GUARD_HOLE, 8), (regs["rsp"], 16)]
            raw = await engine.target.read_many_stub(wanted)  # QEMU's `m`: walks CR3, the user PGD
            ours = await ctx.read_many(wanted)
            task = int.from_bytes(ours[0], "little")
            comm = (await ctx.read(task + current.comm, current.comm_size)).split(b"\0")[0]
            # Without the stop's registers (as the Linux model reads): small and bulk reads alike.
            bare = await engine.target.read_many([(percpu, 8), (banner, 14), (banner, 4096)])
            seen.append({"cr3": regs["cr3"], "cpl": regs["cs"] & 3, "raw": raw, "ours": ours, "comm": comm,
                         "bare": bare})

        probe = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), pre=handler)
        with engine.hub.subscribe(probe.id) as sub:
            await shell(kpti_guest, "utarget 1")
            (record,) = await take(sub, 1)
    assert record["error"] is None
    (hit,) = seen
    assert hit["cpl"] == 3 and hit["cr3"] & USER_PGD_BIT  # user mode, on the user PGD
    assert isinstance(hit["raw"][0], RemoteError)  # the condition KPTI makes: `m` cannot read current_task
    assert hit["comm"] == b"utarget"  # ...and through the kernel PGD it is the hitting task
    assert hit["ours"][1] == b"Linux version "
    assert isinstance(hit["raw"][2], RemoteError) and isinstance(hit["ours"][2], RemoteError)  # never made up
    assert hit["ours"][3] == hit["raw"][3]  # the user half: the CPU's own page tables
    assert hit["bare"][:2] == hit["ours"][:2] and hit["bare"][2].startswith(b"Linux version ")


@pytest.mark.parametrize("mode", MODES)
async def test_kernel_probe_with_comm_and_user_string(kpti_guest, mode):
    async with attach(kpti_guest.target, symbols=[str(kpti_guest.kallsyms)], guest_memory=mode) as engine:
        probe = await engine.add_probe("do_sys_openat2", pre=["$comm", "$pid", "$tid", "f=+0(%si):ustring"],
                                       condition='f ~ "/kpti-*"')
        with engine.hub.subscribe(probe.id) as sub:
            pid = int(await shell(kpti_guest, "cat /kpti-nothing 2>/dev/null & p=$!; wait; echo $p"))
            (record,) = await take(sub, 1)
            await none_left(engine, sub)
    assert record["pre"] == {"comm": "cat", "pid": pid, "tid": pid, "f": "/kpti-nothing"}


def _link_address(path: str, name: str) -> int:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        (sym,) = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
        return sym["st_value"]


async def _stop_in_user_mode(guest, nursery) -> int:
    """Leave the guest paused at the first instruction of utarget() (user mode, on its user PGD), with no
    debugger connected (QEMU keeps a paused guest paused when the gdbstub client goes); its CR3. The shell
    command that ran utarget answers in `nursery` once the guest runs again."""
    address = _link_address(uprog_copy("utarget"), "utarget")  # static, not PIE: the link address
    client = await RSPClient.connect(guest.target)
    target = Target(client, SymbolStore())
    await target.attach()
    assert await client.request(b"Z0,%x,1" % address) == b"OK"
    await client.resume(b"c")
    nursery.start_soon(shell, guest, "utarget 1")  # stopped at utarget(): it answers when the guest runs
    with trio.fail_after(60):
        await client.wait_stop()
    assert await client.request(b"z0,%x,1" % address) == b"OK"
    await client.aclose()
    client = await RSPClient.connect(guest.target)  # connecting again: still there
    target = Target(client, SymbolStore())
    await target.attach()
    g = await target.read_g()
    value = target.layout.value
    assert (value(g, "rip"), value(g, "cs") & 3) == (address, 3)
    await client.aclose()
    return value(g, "cr3")


@pytest.mark.parametrize("mode", MODES)
async def test_linux_attach_while_user_code_runs(kpti_guest, mode):
    # `probed --linux` with no symbol file, attaching at a user-mode stop: finding _text and reading kallsyms
    # from guest memory are kernel reads on the user PGD.
    expected = {}
    for line in kpti_guest.kallsyms.read_text().splitlines():
        address, _, name = line.split()[:3]
        if name in ("linux_banner", "do_sys_openat2"):
            expected[name] = int(address, 16)
    async with trio.open_nursery() as nursery:
        cr3 = await _stop_in_user_mode(kpti_guest, nursery)
        assert cr3 & USER_PGD_BIT
        async with attach(kpti_guest.target, linux=True, guest_memory=mode) as engine:
            assert {n: engine.symbols.lookup(n).address for n in expected} == expected
            assert engine.linux.slide == 0  # nokaslr
            assert engine.target.memory.stats["kpti"] > 0  # read through the kernel PGD


async def test_kernel_probe_in_the_entry_code_still_on_the_user_pgd(kpti_guest):
    # entry_SYSCALL_64+3 runs after swapgs (GS is the kernel's) and before the switch to the kernel PGD: a
    # kernel-mode stop on the user PGD. Every syscall of one process is seen there and in do_syscall_64.
    # (Guest RAM only: every syscall of the guest stops here; the stub's path is the one tested above.)
    fields = ["$comm", "$pid", "cr3=%cr3:u64"]
    async with attach(kpti_guest.target, symbols=[str(kpti_guest.kallsyms)]) as engine:
        entry = await engine.add_probe("entry_SYSCALL_64+3", pre=fields, condition='comm == "kpti-sys"')
        syscall = await engine.add_probe("do_syscall_64", pre=fields, condition='comm == "kpti-sys"')
        with engine.hub.subscribe() as sub:
            pid = int(await shell(kpti_guest, "cp /bin/utarget /tmp/kpti-sys; /tmp/kpti-sys 1 & p=$!; wait; echo $p"))
            await engine.call_stopped(lambda: trio.sleep(0))
            records = []
            while True:
                try:
                    records.append(sub.receive_nowait())
                except trio.WouldBlock:
                    break
    at_entry = [r["pre"] for r in records if r["probe"] == entry.id]
    in_kernel = [r["pre"] for r in records if r["probe"] == syscall.id]
    assert len(at_entry) == len(in_kernel) >= 3
    assert {(r["comm"], r["pid"]) for r in at_entry + in_kernel} == {("kpti-sys", pid)}
    assert all(r["cr3"] & USER_PGD_BIT for r in at_entry)
    assert not any(r["cr3"] & USER_PGD_BIT for r in in_kernel)


async def test_user_return_probes_with_kpti(kpti_guest):
    # The task read at the entry and at the return (the per-CPU `current`) goes through the kernel's PGD;
    # the address space is the kernel PGD of the pair, as for entry probes.
    async with attach(kpti_guest.target, symbols=[str(kpti_guest.kallsyms)]) as engine:
        probe = await engine.add_probe("/bin/utarget:utarget", file_copy=uprog_copy("utarget"), retprobe=True,
                                       pre=["$comm", "$tid", "a=$arg1:s64", "ret=$retval:s64"])
        with engine.hub.subscribe(probe.id) as sub:
            await shell(kpti_guest, "utarget 3 & ucopy 3 & utarget 2 & wait")
            records = await take(sub, 5)
            await none_left(engine, sub)
        assert engine.stats()["return_instances"] == 0 and engine.stats()["user"]["return_addresses"] == 0
    by_tid: dict[int, list[tuple[int, int]]] = {}
    for r in records:
        assert r["pre"]["comm"] == "utarget"
        by_tid.setdefault(r["pre"]["tid"], []).append((r["pre"]["a"], r["pre"]["ret"]))
    assert sorted(by_tid.values()) == [[(1, 2), (2, 6)], [(1, 2), (2, 6), (3, 12)]]
