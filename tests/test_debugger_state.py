"""The stub's helpers that need no guest: the memory snapshot GDB's reads are served from, and reading
the CPU's code width from QEMU's monitor."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from probed.gdbside.debugger import MemorySnapshot
from probed.sim.cpumode import bits_key, flat_data, parse_cs_bits

READS = st.lists(st.tuples(st.integers(0, 240), st.integers(1, 40)), max_size=10)
WRITES = st.lists(st.tuples(st.integers(0, 240), st.binary(min_size=1, max_size=16)), max_size=4)


@given(st.binary(min_size=300, max_size=300), READS, WRITES, READS)
def test_the_snapshot_answers_exactly_what_memory_holds(memory, remembered, writes, asked):
    """Memory stays still while GDB holds the guest, but for the engine's own writes (simulated
    instructions), which land in memory and in the snapshot alike."""
    memory = bytearray(memory)
    snap = MemorySnapshot()
    for address, length in remembered:
        snap.put(address, length, memory[address : address + length].hex().encode())
    for address, data in writes:
        memory[address : address + len(data)] = data
        snap.patch([(address, data)])
    for address, length in asked:
        got = snap.get(address, length)
        if got is not None:
            assert bytes.fromhex(got.decode()) == memory[address : address + length]
        else:
            # It may decline a read that spans two remembered ones, never one inside a single one.
            assert not any(a <= address and address + length <= a + n for a, n in remembered)


def test_failed_reads_are_answered_again_and_everything_goes_on_clear():
    snap = MemorySnapshot()
    snap.put(0x1000, 4, b"E14")
    snap.put(0x2000, 2, b"abcd")
    assert snap.get(0x1000, 4) == b"E14" and snap.get(0x1000, 2) is None
    assert snap.get(0x2001, 1) == b"cd" and snap.code_at(0x2001, 16) == b"\xcd"
    snap.put(0x3000, 2, b"zz")  # not hex: not remembered
    assert snap.get(0x3000, 2) is None
    snap.clear()
    assert not snap and snap.get(0x2000, 2) is None


SEGMENTS = """ES =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]
SS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]
DS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]
"""
REAL_MODE = """CPU#0
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =f000 ffff0000 0000ffff 00009b00
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000
EFER=0000000000000000
"""
PROTECTED_32 = """CPU#1
EIP=00100054 EFL=00000006 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =0008 00000000 ffffffff 00cf9b00 DPL=0 CS32 [-RA]
CR0=00000011 CR2=00000000 CR3=00000000 CR4=00000000
EFER=0000000000000000
""" + SEGMENTS
LONG_64 = """CPU#0
RIP=0000000000100054 RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =0008 0000000000000000 00000000 00209800 DPL=0 CS64 [---]
CR0=80000011 CR2=0000000000000000 CR3=0000000000101000 CR4=00000020
EFER=0000000000000500
""" + SEGMENTS
COMPAT_32 = LONG_64.replace("00209800 DPL=0 CS64", "00cf9b00 DPL=0 CS32")
VM86 = PROTECTED_32.replace("EFL=00000006", "EFL=00020006")


def test_code_width_from_the_monitor():
    """What QEMU 7.2 prints (`info registers`): real mode, 32-bit, long mode and compatibility mode."""
    assert [parse_cs_bits(s) for s in (REAL_MODE, PROTECTED_32, LONG_64, COMPAT_32, VM86)] == [16, 32, 64, 32, 16]
    assert bits_key(LONG_64) == (8, 0x10, 0x10, 0x10, True) and bits_key(PROTECTED_32) == (8, 0x10, 0x10, 0x10, False)
    # 32-bit code is simulated over flat data segments only.
    assert flat_data(PROTECTED_32)
    assert not flat_data(PROTECTED_32.replace("DS =0010 00000000", "DS =0010 00100000"))
