"""User probes while a real GDB debugs the Linux guest through probed's stub (GDB driven with pygdbmi)."""

from __future__ import annotations

import json
import threading

import pytest

from probed.guest.userfile import UserElf
from probed.testing.qemu import CACHE
from tests.daemon import Daemon
from tests.linux.uprogs import uprog_path
from tests.test_gdb import Gdb

pytestmark = pytest.mark.linux


@pytest.fixture
def stubbed_linux(linux_guest, tmp_path):
    class Kernel:
        target = linux_guest.target
        elf = linux_guest.kallsyms

    sock = tmp_path / "gdb.sock"
    daemon = Daemon(Kernel, tmp_path, "--gdb-listen", f"unix:{sock}")
    daemon.gdb_socket = sock
    yield daemon
    try:
        daemon.stop()  # its breakpoints go (a daemon killed outright would leave the session's guest stopped)
    finally:
        daemon.kill()


def test_user_probes_fire_while_gdb_debugs(linux_guest, stubbed_linux):
    copy = uprog_path(CACHE / "linux", "utarget")
    stubbed_linux.ctl("add", "-n", "u", "--file-copy", str(copy), "/bin/utarget:utarget", "$comm", "a=$arg1:s64",
                      "b=$arg2:s64")
    gdb = Gdb(copy, stubbed_linux.gdb_socket)  # the program's ELF: GDB knows `utarget` at its link address
    try:
        assert gdb.mi("-exec-continue")["message"] == "running"
        linux_guest.shell("utarget 3 & ucopy 3 & wait")  # runs under GDB's continue
        assert [(r["pre"]["comm"], r["pre"]["a"], r["pre"]["b"]) for r in stubbed_linux.records("u", 3)] == \
            [("utarget", 1, 1), ("utarget", 2, 4), ("utarget", 3, 9)]

        gdb.mi("-exec-interrupt")
        gdb.stopped()
        # GDB's own breakpoint at the probed place: both see the call; GDB stops in the process that runs it.
        gdb.mi("-break-insert *utarget")
        address = UserElf(copy).resolve("utarget") + 0x400000  # the static program's load address, page 0
        shell = threading.Thread(target=linux_guest.shell, args=("utarget 2",))
        assert gdb.mi("-exec-continue")["message"] == "running"
        shell.start()
        try:
            stop = gdb.stopped()
            assert stop["reason"] == "breakpoint-hit", (stop, hex(gdb.pc()))
            assert gdb.pc() == address and gdb.value("$rdi") == 1 and gdb.value("$rsi") == 1
            gdb.mi("-break-delete")
            assert gdb.mi("-exec-continue")["message"] == "running"
        finally:
            shell.join(timeout=120)
        assert not shell.is_alive()
        records = stubbed_linux.records("u", 5)
        assert [(r["pre"]["a"], r["pre"]["b"]) for r in records[3:]] == [(1, 1), (2, 4)]  # once each
        gdb.mi("-target-detach")
    finally:
        gdb.close()
    stats = json.loads(stubbed_linux.ctl("stats", "--json").stdout)
    assert stats["user"]["addresses"] == 0


def test_a_user_return_probe_while_gdb_finishes_the_same_call(linux_guest, stubbed_linux):
    copy = uprog_path(CACHE / "linux", "utarget")
    stubbed_linux.ctl("add", "-r", "-n", "ur", "--file-copy", str(copy), "/bin/utarget:utarget", "a=$arg1:s64",
                      "ret=$retval:s64")
    gdb = Gdb(copy, stubbed_linux.gdb_socket)
    try:
        assert gdb.mi("-exec-continue")["message"] == "running"
        linux_guest.shell("utarget 2 & ucopy 2 & wait")
        assert [(r["pre"]["a"], r["pre"]["ret"]) for r in stubbed_linux.records("ur", 2)] == [(1, 2), (2, 6)]

        gdb.mi("-exec-interrupt")
        gdb.stopped()
        # GDB stops at the entry and runs to the return (its own breakpoint at our return address): it
        # gets the stop and the return value; the probe reports the same return once.
        gdb.mi("-break-insert *utarget")
        shell = threading.Thread(target=linux_guest.shell, args=("utarget 2",))
        assert gdb.mi("-exec-continue")["message"] == "running"
        shell.start()
        try:
            stop = gdb.stopped()
            assert stop["reason"] == "breakpoint-hit" and gdb.value("$rdi") == 1
            gdb.mi("-break-delete")
            stop = gdb.run("-exec-finish")
            assert stop["reason"] == "function-finished", stop
            assert gdb.value("$rax") == 2 and stop["frame"]["func"] == "calls_from"
            assert gdb.mi("-exec-continue")["message"] == "running"
        finally:
            shell.join(timeout=120)
        assert not shell.is_alive()
        records = stubbed_linux.records("ur", 4)
        assert [(r["pre"]["a"], r["pre"]["ret"]) for r in records[2:]] == [(1, 2), (2, 6)]
        gdb.mi("-target-detach")
    finally:
        gdb.close()
    stats = json.loads(stubbed_linux.ctl("stats", "--json").stdout)
    assert stats["return_instances"] == 0 and stats["user"]["return_addresses"] == 0
