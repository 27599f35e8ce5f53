"""bench/stub_floor: the floor stubs that bench/gdb_proxy.py --floors measures are real stubs: GDB through
either sees what it sees straight to QEMU (a floor that skipped work would make a flattering baseline)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probed.testing.qemu import QemuGuest

BENCH = Path(__file__).resolve().parent.parent / "bench"
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


@contextlib.contextmanager
def floor(guest: QemuGuest, workdir: Path, native: Path | None):
    listen = workdir / "floor.sock"
    argv = [sys.executable, str(BENCH / "stub_floor.py"), "--target", guest.target, "--listen", f"unix:{listen}"]
    proc = subprocess.Popen(argv + (["--native", str(native)] if native else []), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == "ready", proc.stderr.read()
        yield str(listen)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def straight() -> list[str]:
    with QemuGuest("i386", stopped=True, gdb="unix") as guest:
        return run_gdb(guest, guest.target.split(":", 1)[1])


@pytest.mark.parametrize("build", ["python", "C"])
def test_gdb_through_a_floor_sees_what_it_sees_straight(build, straight, tmp_path):
    native = None
    if build == "C":
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler")
        native = tmp_path / "stub_floor"
        subprocess.run([cc, "-O2", "-o", str(native), str(BENCH / "stub_floor.c")], check=True)
    with QemuGuest("i386", stopped=True, gdb="unix") as guest, floor(guest, tmp_path, native) as where:
        lines = run_gdb(guest, where)
    # The third stop at `elsewhere` is its call with x = 3, in turn 2 (the same as tests/test_guests.py's).
    assert straight[1].startswith("@ 3 2 ")
    assert lines == straight
    assert len(lines) == 3
