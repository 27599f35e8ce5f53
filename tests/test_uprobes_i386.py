"""User probes in 32-bit (compat) processes on the real Debian x86_64 kernel (CONFIG_IA32_EMULATION): the
i386 user ABI chosen at each hit, beside a 64-bit process probed at the same time.

utarget32 (tests/linux/uprogs/utarget32.c, static i386) calls utarget32(i, i * i, -i) and uname32(argv[0])
for i = 1..N; the 64-bit utarget calls utarget(i, i * i). The 64-bit program runs as a copy at a path of this
module's own, so no process other tests left in the session's guest runs it.
"""

from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_32, Cs

from probed.api import attach
from probed.guest.userfile import UserElf
from tests.linux.probing import none_left, shell, take, uprog_copy

pytestmark = pytest.mark.linux


def _functions(path: str) -> dict[str, tuple[int, int]]:
    """The copy's functions: name -> (virtual address, size), as linked (utarget32 is not PIE)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: (s["st_value"], s["st_size"]) for s in table.iter_symbols() if s["st_info"]["type"] == "STT_FUNC"}


async def _ret_offset(elf: UserElf, symbol: str) -> int:
    """The offset of the first `ret` in a function of the 32-bit copy, from its start."""
    (code,) = await elf.read_many([(elf.resolve(symbol), 64)])
    return next(i.address for i in Cs(CS_ARCH_X86, CS_MODE_32).disasm(code, 0) if i.mnemonic == "ret")


async def test_i386_abi_in_32bit_processes_beside_a_64bit_one(linux_guest):
    copy32 = UserElf(uprog_copy("utarget32"))
    assert copy32.arch_name == "i386"
    functions = _functions(uprog_copy("utarget32"))
    ret = await _ret_offset(copy32, "utarget32")
    async with attach(linux_guest.target, symbols=[str(linux_guest.kallsyms)]) as engine:
        await shell(linux_guest, "cp /bin/utarget /tmp/ui64")
        entry = await engine.add_probe(
            "/bin/utarget32:utarget32", file_copy=uprog_copy("utarget32"),
            pre=["$comm", "$pid", "a=$arg1:s32", "b=$arg2:s32", "c=$arg3:s32", "x=$arg3", "ra=+0(%sp):u32"])
        # By offset from the symbol: checked to start an instruction by decoding the copy as i386 code.
        sums = await engine.add_probe(f"/bin/utarget32:utarget32+{ret:#x}", file_copy=uprog_copy("utarget32"),
                                      pre=["$pid", "sum=%ax:s32", "ip=%ip:u64"])
        names = await engine.add_probe("/bin/utarget32:uname32", file_copy=uprog_copy("utarget32"),
                                       pre=["$pid", "s=$arg1:ustring", "first=+0($arg1):u8"])
        wide = await engine.add_probe("/tmp/ui64:utarget", file_copy=uprog_copy("utarget"),
                                      pre=["$comm", "$pid", "a=$arg1:s64", "b=$arg2:s64"])
        with engine.hub.subscribe() as sub:
            await shell(linux_guest, "utarget32 3 & /tmp/ui64 2 & utarget32 2 & wait; rm /tmp/ui64")
            records = await take(sub, 3 * (3 + 2) + 2)
            await none_left(engine, sub)
        assert engine.uprobes.stats()["addresses"] == 0
    by_pid: dict[int, list[tuple]] = {}
    for r in records:
        pre = dict(r["pre"])
        by_pid.setdefault(pre.pop("pid"), []).append((r["probe"], pre))
    assert sorted(len(v) for v in by_pid.values()) == [2, 6, 9]
    start_c, start_c_size = functions["start_c"]
    for seen in by_pid.values():
        if seen[0][0] == wide.id:
            assert seen == [(wide.id, {"comm": "ui64", "a": i, "b": i * i}) for i in (1, 2)]
            continue
        expected = []
        for i in range(1, len(seen) // 3 + 1):
            ra = seen[3 * (i - 1)][1]["ra"]
            assert start_c < ra < start_c + start_c_size  # the 32-bit return address, from the user stack
            expected += [
                (entry.id, {"comm": "utarget32", "a": i, "b": i * i, "c": -i, "x": f"{(-i) & 0xFFFFFFFF:#x}", "ra": ra}),
                (sums.id, {"sum": i * i, "ip": functions["utarget32"][0] + ret}),
                (names.id, {"s": "utarget32", "first": ord("u")}),
            ]
        assert seen == expected
