"""The daemon's own death and its peers' misbehaviour, on a real QEMU guest with real probed processes.

QMP (`query-status`) says whether the guest's CPUs run, without the gdbstub's `?` (which would clear the
breakpoints the test looks for).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from probed.front.cli import DaemonError
from probed.guest.symbols import SymbolStore
from probed.testing.daemon import (
    DaemonProcess,
    qmp_args,
    qmp_pc,
    qmp_read_u32,
    qmp_status,
    rss_bytes,
    wait_for,
)
from probed.testing.qemu import QemuGuest


class Guest:
    def __init__(self, qemu: QemuGuest, qmp: Path, tmp: Path):
        self.qemu, self.qmp, self.tmp = qemu, qmp, tmp
        self.control = tmp / "ctl" / "control.sock"
        self.events = tmp / "hits.jsonl"

    def daemon(self, *extra: str, ready: bool = True) -> DaemonProcess:
        return DaemonProcess(self.qemu.target, self.control, "--symbols", str(self.qemu.elf), *extra, ready=ready)

    def running(self) -> bool:
        return qmp_status(self.qmp)["running"]


@pytest.fixture
def guest() -> Iterator[Guest]:
    # A short directory: unix socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="psv") as tmp:
        qmp = Path(tmp) / "qmp.sock"
        qemu = QemuGuest("i386", extra_args=qmp_args(qmp))
        try:
            qemu.start()
            yield Guest(qemu, qmp, Path(tmp))
        finally:
            qemu.close()


def address_of(elf: Path, name: str) -> int:
    symbols = SymbolStore()
    symbols.add_file(elf)
    return symbols.lookup(name).address


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_kill9_then_restart_rearms_probes_and_resumes_the_guest(guest):
    # A second symbol file, loaded at a wrong bias and then moved: the restarted daemon must use the new bias.
    other = guest.tmp / "other.elf"
    other.write_bytes(guest.qemu.elf.read_bytes())
    args = ("--events", str(guest.events), "--symbols", f"{other}@0x1000")
    with guest.daemon(*args) as first:
        first.ctl("symbols", "other@0")
        first.ctl("add", "-n", "calls", "guest:probe_target", "c=@calls:u32")
        first.ctl("add", "-n", "other", "other:elsewhere", "x=$arg1:u32")
        first.ctl("disable", "other")
        first.ctl("add", "-n", "gone", "guest:elsewhere")
        first.ctl("rm", "gone")
        before = _records(first.ctl("events", "--probe", "calls", "--count", "5", "--json").stdout)
        assert [r["pre"]["c"] for r in before] == list(range(before[0]["pre"]["c"], before[0]["pre"]["c"] + 5))
        listed = first.json("list")
        first.kill()
    # The seed fact: a daemon killed outright leaves the guest stopped (at its next breakpoint).
    assert guest.running() is False
    assert stat_mode(guest.events) == 0o600
    # Where it stopped, read through QEMU's monitor: at probe_target's breakpoint, the call's record is
    # still to come (c == calls); anywhere else (killed within a hit), the next call's is (calls + 1).
    calls = qmp_read_u32(guest.qmp, address_of(guest.qemu.elf, "calls"))
    at_probe = qmp_pc(guest.qmp) == int(listed[0]["address"], 16)
    first_c = calls if at_probe else calls + 1

    with guest.daemon(*args) as second:
        wait_for(guest.running, timeout=10)
        assert {f["name"]: f["bias"] for f in second.json("symbols")} == {"guest": "0x0", "other": "0x0"}
        after = _records(second.ctl("events", "--probe", "calls", "--count", "5", "--json").stdout)
        relisted = second.json("list")
        assert [(p["id"], p["name"], p["spec"], p["address"], p["state"]) for p in relisted] == [
            (p["id"], p["name"], p["spec"], p["address"], p["state"]) for p in listed
        ]
        assert [p["state"] for p in relisted] == ["enabled", "disabled"]
        # The count goes on from where the guest stopped: no call run without the probe, none missed.
        cs = [r["pre"]["c"] for r in after]
        assert cs == list(range(cs[0], cs[0] + 5))
        assert cs[0] == first_c
        assert [r["seq"] for r in after] == [1, 2, 3, 4, 5]
        assert "2 probe(s) re-added" in second.text()
        assert second.stop() == 0
    assert guest.running() is True


def test_restart_without_state_clears_the_dead_daemons_breakpoints(guest):
    with guest.daemon("--no-state") as first:
        first.ctl("add", "probe_target")
        first.ctl("events", "--count", "3", "--json")
        first.kill()
    assert guest.running() is False
    with guest.daemon("--no-state") as second:
        wait_for(guest.running, timeout=10)
        second.ctl("add", "-n", "e", "elsewhere")
        second.ctl("events", "--probe", "e", "--count", "20", "--json")
        second.ctl("disable", "e")
        stats = second.json("stats")
        # Every stop was a hit of the new probe, or an interrupt for the add (and for the disable, unless it
        # came while a hit held the guest): nothing stopped the guest at the old probe_target breakpoint, which
        # the guest passes once before each elsewhere() call.
        assert stats["stops"] - stats["hits"] in (1, 2) and stats["hits"] >= 20
        assert not (guest.control.parent / "state.json").exists()
        assert second.stop() == 0


def test_control_connections_that_send_garbage_or_hang_up_do_not_end_the_daemon(guest):
    with guest.daemon() as daemon:
        daemon.ctl("add", "-n", "calls", "probe_target", "c=@calls:u32")
        wait_for(guest.running, timeout=10)

        def send(data: bytes, *, read: bool = False) -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(guest.control))
                s.sendall(data)
                if read:
                    s.shutdown(socket.SHUT_WR)
                    return s.makefile("rb").read()
                return b""

        assert b"-32700" in send(b"\xff\xfe\x00garbage\n", read=True)
        assert b"-32600" in send(b"[1, 2, 3]\n", read=True)
        send(b'{"jsonrpc": "2.0", "id": 1, "method": "add", "params": {"spec": "elsew')  # cut mid-request
        send(b'{"jsonrpc": "2.0", "id": 1, "method": "add", "params": {"spec": "elsewhere", "name": "e"}}\n')  # gone before the reply
        send(b'{"jsonrpc": "2.0", "id": 2, "method": "events", "params": {"follow": true}}\n')  # a follower that leaves
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            send(b"x" * (8 << 20))  # a line past the limit: the daemon hangs up on it
        assert daemon.proc.poll() is None
        status = daemon.json("status")
        assert status["probes"] in (1, 2)  # the request cut before its reply may or may not have been done
        records = _records(daemon.ctl("events", "--probe", "calls", "--count", "3", "--json").stdout)
        assert len(records) == 3  # the guest runs and the probe fires
        assert daemon.stop() == 0
    assert guest.running() is True


def test_names_with_control_characters_or_all_digits_are_refused(guest):
    refused = [
        ("123", "all digits"),
        ("٣٤", "all digits"),  # Arabic-Indic digits: int() reads them as 34
        ("bad\nname", "U+000A"),
        ("\x1b[31mred", "U+001B"),
        ("evil\u202etxt", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("zero\u200bwidth", "U+200B ZERO WIDTH SPACE"),
        ("two words", "U+0020 SPACE"),
    ]
    with guest.daemon("--no-state") as daemon:
        out = daemon.ctl("add", "-n", "evil\u202etxt", "probe_target", check=1)
        assert "U+202E RIGHT-TO-LEFT OVERRIDE at column 5" in out.stderr and "\u202e" not in out.stderr
        for name, reason in refused:
            with pytest.raises(DaemonError) as err:
                daemon.call("add", {"spec": "probe_target", "name": name})
            message = err.value.error["message"]
            assert reason in message and message.isprintable(), (name, message)
        assert daemon.call("list") == []
        daemon.call("add", {"spec": "probe_target", "name": "caf\u00e9_2"})  # letters of any script are fine
        wait_for(guest.running, timeout=10)
        assert daemon.stop() == 0


def test_a_64_by_4k_record_probe_keeps_memory_bounded(guest):
    big = [f"f{i}=+0(%sp):x32[1024]" for i in range(64)]  # "0x..." strings: larger records than u32
    with guest.daemon("--no-state", "--buffer-bytes", "4M") as daemon:
        too_big = [f"f{i}=+0(%sp):u64[1024]" for i in range(64)]
        out = daemon.ctl("add", "probe_target", *too_big, check=1)
        assert "over the limit of 1048576" in out.stderr and "u64[1024]" in out.stderr
        daemon.ctl("add", "-n", "big", "probe_target", *big)
        baseline = rss_bytes(daemon.proc.pid)
        # Each record is about 450 KB of JSON: 100 of them unbounded grow the daemon by about 47 MiB (measured
        # with --buffer-bytes 1G), and by far more when kept as Python lists, as the ring did before.
        wait_for(lambda: daemon.call("stats")["records"] >= 100, timeout=120, interval=0.2)
        stats = daemon.call("stats")
        assert stats["buffer_bytes"] <= 4 << 20 and stats["buffer_dropped"] > 0
        assert stats["buffer_records"] + stats["buffer_dropped"] == stats["records"]
        grown = rss_bytes(daemon.proc.pid) - baseline
        assert grown < 25 << 20, f"RSS grew by {grown >> 20} MiB"
        assert daemon.stop() == 0


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_a_return_probe_is_restored_as_a_return_probe(guest):
    with guest.daemon() as first:
        first.ctl("add", "-r", "--maxactive", "3", "-n", "sums", "guest:depth_sum", "n=$arg1:s32", "s=$retval:s32")
        assert first.stop() == 0
    with guest.daemon() as second:
        (probe,) = second.json("list")
        assert (probe["name"], probe["retprobe"], probe["maxactive"]) == ("sums", True, 3)
        records = _records(second.ctl("events", "--probe", "sums", "--count", "6", "--json").stdout)
        assert all(r["kind"] == "return" and r["pre"]["s"] == r["pre"]["n"] * (r["pre"]["n"] + 1) // 2 for r in records)
        assert second.stop() == 0
