"""Guest RAM read directly on a real Linux kernel (Debian 12's 6.1, 4-level paging): kernel text, data,
the direct map, the vmalloc'd task stack, and the user half (the process's code, stack and the file name it
passes to openat), each read equal to the stub's `m` byte for byte, faults included. The guest's RAM is a
memfd QEMU maps shared (as for virtiofs), read both ways: mapped into probed, and with `pread` on
`/proc/PID/mem` as QEMU's default RAM is."""

from __future__ import annotations

import random

import pytest
import trio

from probed.api import attach
from rsp.errors import RemoteError
from tests.linux.conftest_linux import boot_linux_guest

pytestmark = pytest.mark.linux

THREAD_SIZE = 16 << 10  # x86_64 without KASAN
PT_REGS = 168  # sizeof(struct pt_regs); ip at 128, sp at 152


@pytest.fixture(scope="module")
def linux_guest(tmp_path_factory):
    """A guest of this module's own (what other modules' tests left running in the session's guest would
    change what these tests count), its RAM a shared memfd."""
    yield from boot_linux_guest(tmp_path_factory, shared_ram=True)


def _same(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return isinstance(a, RemoteError) and isinstance(b, RemoteError) and str(a) == str(b)
    return a == b


@pytest.mark.parametrize(("mode", "mapped"), [("auto", True), ("proc-mem", False)])
async def test_linux_kernel_and_user_reads_equal_m(linux_guest, mode, mapped):
    rng = random.Random(615)
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)], guest_memory=mode) as engine:
        target = engine.target
        memory = target.memory
        assert memory.direct, memory.reason
        assert memory.ram.mapped is mapped
        syms = engine.symbols
        results: list = []

        async def handler(ctx):
            if results:
                return None
            regs = await ctx.registers()
            top = (regs["rsp"] | (THREAD_SIZE - 1)) + 1
            user_ip = await ctx.read_u(top - PT_REGS + 128)
            user_sp = await ctx.read_u(top - PT_REGS + 152)
            direct_map = await ctx.read_u(syms.lookup("page_offset_base").address)
            places = {
                "kernel text": [(syms.lookup(n).address, 64) for n in ("do_sys_openat2", "schedule", "vfs_read")],
                "kernel data": [(syms.lookup(n).address, 8) for n in ("jiffies", "init_task", "linux_banner")],
                "direct map": [(direct_map + rng.randrange(0, 600 << 20), rng.choice([8, 256, 4096, 9000]))
                               for _ in range(150)],
                "task stack": [(regs["rsp"] - rng.randrange(-256, 8192), 64) for _ in range(40)],
                "user file name": [(regs["rsi"] + d, 64) for d in range(-4096, 4096, 128)],
                "user code": [(user_ip + rng.randrange(-65536, 65536), 32) for _ in range(60)],
                # Above the user's sp is its live stack (mapped); how far below or above that goes depends on
                # which process opened, so the readable share is only asserted where it must be mapped.
                "user stack": [(user_sp + rng.randrange(0, 1024), 64) for _ in range(40)]
                + [(user_sp + rng.randrange(-8192, 16384), 128) for _ in range(20)],
                "unmapped": [(0, 8), (0x10, 8), (0xFFFF800000000000, 8), (1 << 47, 8), (0xFFFFFFFFFFFFF000, 8)],
            }
            for what, requests in places.items():
                mine = await ctx.read_many(requests)
                theirs = await target.read_many_stub(requests)
                bad = [hex(a) for (a, _), m, t in zip(requests, mine, theirs, strict=True) if not _same(m, t)]
                results.append((what, len(requests), bad, sum(isinstance(t, bytes) for t in theirs)))
            return None

        before = dict(memory.stats)
        probe = await engine.add_probe("do_sys_openat2", pre=handler)
        with trio.fail_after(60):
            with engine.hub.subscribe(probe.id) as sub:
                record = await sub.receive()
        assert record["error"] is None
        assert memory.direct, memory.reason  # no check on the way found a difference
        direct = memory.stats["direct"] - before["direct"]
    for what, count, bad, readable in results:
        assert bad == [], what
        if what != "unmapped":
            assert readable >= count // 2, what  # most of each kind exists, so bytes were compared
    assert direct >= 300
