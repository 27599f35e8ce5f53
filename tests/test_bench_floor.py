"""bench/stub_floor: the floor stubs that bench/gdb_proxy.py --floors measures are real stubs: GDB through
either sees what it sees straight to QEMU (a floor that skipped work would make a flattering baseline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from probed.testing.qemu import QemuGuest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import stub_floor  # noqa: E402

COMMANDS = [
    "tbreak cpu0_main",
    "continue",
    "stepi 25",
    'printf "@ %#lx %#lx\\n", $pc, $sp',
    "break elsewhere",
    "continue",
    "continue",
    "continue",
    'printf "@ %ld %lu %#lx\\n", x, turns, $pc',
    'printf "@ %#x %#x\\n", *(unsigned *)$sp, *((unsigned *)$sp + 1)',
]


def run_gdb(guest: QemuGuest, where: str) -> list[str]:
    argv = ["gdb", "-batch", "-nx", str(guest.elf), "-ex", f"target remote {where}"]
    for command in COMMANDS:
        argv += ["-ex", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return [line for line in done.stdout.splitlines() if line.startswith("@ ")]


@pytest.fixture(scope="module")
def straight() -> list[str]:
    with QemuGuest("i386", stopped=True, gdb="unix") as guest:
        return run_gdb(guest, guest.target.split(":", 1)[1])


@pytest.mark.parametrize("build", ["python", "C"])
def test_gdb_through_a_floor_sees_what_it_sees_straight(build, straight, tmp_path):
    native = None
    if build == "C":
        native = stub_floor.build_native(tmp_path)
        if native is None:
            pytest.skip("no C compiler")
    with QemuGuest("i386", stopped=True, gdb="unix") as guest, stub_floor.serving(guest.target, tmp_path, native) as where:
        lines = run_gdb(guest, where)
    # The third stop at `elsewhere` is its call with x = 3, in turn 2 (the same as tests/test_guests.py's).
    assert straight[1].startswith("@ 3 2 ")
    assert lines == straight
    assert len(lines) == 3
