"""probed and probectl as a user runs them: real processes, a real QEMU guest."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import trio

from probed.guest.symbols import SymbolStore
from rsp.connection import RSPClient
from tests.daemon import Daemon

NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture
def daemon(guest_i386, tmp_path):
    d = Daemon(guest_i386, tmp_path, "--stopped")
    yield d
    d.kill()


def test_add_probes_and_read_exact_hits(daemon):
    assert daemon.ctl("add", "-n", "args", "probe_target", "a=$arg1:s32", "b=$arg2:s32",
                      "name=+0($arg3):string", "--post", "sp=%sp:u32", "ip=%ip:symbol").stdout.strip() == "1"
    assert daemon.ctl("add", "probe_target", "c=@calls:u32", "--if", "c >= 2").stdout.strip() == "2"
    daemon.ctl("resume")
    out = daemon.ctl("events", "--probe", "args", "--count", "6", "--json").stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    for n, r in enumerate(records, start=1):
        assert r["pre"] == {"a": n, "b": 3 * n + 1, "name": NAMES[n % 4]}
        assert r["post"]["ip"] == "probe_target+0x1"
        assert r["where"] == "probe_target" and r["cpu"] == 0 and r["error"] is None
    # The filter: probe 2 reports only hits where calls >= 2, i.e. from the third call on.
    filtered = [json.loads(line) for line in daemon.ctl("events", "--probe", "2", "--count", "2", "--json").stdout.splitlines()]
    assert [r["pre"]["c"] for r in filtered] == [2, 3]
    assert filtered[0]["stop"] == records[2]["stop"]

    listing = json.loads(daemon.ctl("list", "--json").stdout)
    assert [sorted(p) for p in listing] == [sorted(["id", "name", "spec", "address", "hits", "missed", "faults", "state"])] * 2
    assert listing[0]["name"] == "args" and listing[0]["state"] == "enabled"
    human = daemon.ctl("events", "--probe", "args", "--count", "1").stdout
    assert human.startswith('#1 args cpu0 pc=0x') and 'name="beta"' in human

    daemon.ctl("disable", "args")
    assert json.loads(daemon.ctl("list", "--json").stdout)[0]["state"] == "disabled"
    daemon.ctl("rm", "--all")
    assert daemon.ctl("list").stdout.strip() == "no probes"
    assert "probe_target" in daemon.ctl("hooks", "probe_*").stdout
    assert daemon.stop() == 0
    assert sum(1 for _ in daemon.events.open()) >= 8


def test_errors_are_clear_and_change_nothing(daemon):
    out = daemon.ctl("add", "probe_targt", check=1)
    assert "unknown symbol 'probe_targt'" in out.stderr and "probe_target" in out.stderr
    out = daemon.ctl("add", "probe_target", "a=+4(%sp:s32", check=1)
    assert "column 9: expected )" in out.stderr and "^" in out.stderr
    out = daemon.ctl("add", "probe_target", "a=%ax", "--if", "a ==", check=1)
    assert "filter error at column 5" in out.stderr
    out = daemon.ctl("rm", "nothing", check=1)
    assert "no probe 'nothing'" in out.stderr
    assert daemon.ctl("list", "--json").stdout.strip() == "[]"
    assert daemon.ctl("add", check=2).returncode == 2


def test_control_socket_is_owner_only_and_single(daemon, guest_i386, tmp_path):
    mode = stat.S_IMODE(os.stat(daemon.control).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(daemon.control.parent).st_mode) == 0o700
    second = subprocess.run(
        [sys.executable, "-m", "probed.front.daemon", "--target", guest_i386.target, "--control", str(daemon.control)],
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 1 and "another daemon listens" in second.stderr


def test_probectl_without_a_daemon(tmp_path):
    out = subprocess.run([sys.executable, "-m", "probed.front.cli", "--control", str(tmp_path / "none.sock"), "list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert "no daemon at" in out.stderr


def test_sigterm_leaves_the_guest_running_without_breakpoints(daemon, guest_i386):
    daemon.ctl("add", "probe_target", "a=$arg1")
    daemon.ctl("resume")
    daemon.ctl("events", "--count", "3")
    assert daemon.stop() == 0

    async def check():
        symbols = SymbolStore()
        symbols.add_file(guest_i386.elf)
        client = await RSPClient.connect(guest_i386.target)
        await client.request(b"qSupported")
        await client.read_xfer("features", "target.xml")  # QEMU answers `p` only after this
        # No `?` here: it would delete the breakpoints this test looks for.
        turns = symbols.lookup("turns").address
        elsewhere = symbols.lookup("elsewhere").address
        before = int.from_bytes(await client.read_memory(turns, 4), "little")
        # probe_target runs before elsewhere in every turn: a breakpoint left there would stop us first.
        assert await client.request(b"Z0,%x,1" % elsewhere) == b"OK"
        for _ in range(2):
            await client.resume(b"c")
            with trio.fail_after(30):
                await client.wait_stop()
            regs = await client.request(b"p8")
            assert int.from_bytes(bytes.fromhex(regs.decode()), "little") == elsewhere
            await client.resume(b"s")  # past the breakpoint: `c` from it would stop there again at once
            with trio.fail_after(30):
                await client.wait_stop()
        after = int.from_bytes(await client.read_memory(turns, 4), "little")
        assert after > before  # the guest kept running after the daemon left
        await client.request(b"D")
        await client.aclose()

    trio.run(check)


def test_the_daemon_says_when_its_target_dies(tmp_path):
    """With --no-reconnect (by default it waits for the target: tests/test_reconnect.py)."""
    from probed.testing.qemu import QemuGuest

    guest = QemuGuest("i386").start()
    try:
        daemon = Daemon(guest, tmp_path, "--no-reconnect")
    finally:
        guest.close()  # QEMU goes away under the running daemon
    assert daemon.wait(timeout=60) == 1
    assert daemon.stderr().strip().splitlines()[-1].startswith("probed: the target went away")
    assert not daemon.control.exists()


def test_symbols_relocation_moves_probes(daemon):
    daemon.ctl("add", "-n", "p", "probe_target+1")
    before = json.loads(daemon.ctl("list", "--json").stdout)[0]["address"]
    files = json.loads(daemon.ctl("symbols", "--json").stdout)
    assert [(f["name"], f["bias"]) for f in files] == [("guest", "0x0")]
    moved = json.loads(daemon.ctl("symbols", "guest@0x1000", "--json").stdout)
    assert [p["address"] for p in moved["moved"]] == [hex(int(before, 16) + 0x1000)]
    daemon.ctl("symbols", "guest@0")
    assert json.loads(daemon.ctl("list", "--json").stdout)[0]["address"] == before
    status = json.loads(daemon.ctl("status", "--json").stdout)
    assert (status["arch"], status["state"], status["probes"]) == ("i386", "stopped", 1)


def test_events_follow_streams_until_interrupted(daemon):
    daemon.ctl("add", "-n", "t", "probe_target", "a=+4(%sp):s32", "b=+8(%sp):s32")
    follower = subprocess.Popen(
        [sys.executable, "-m", "probed.front.cli", "--control", str(daemon.control), "events", "--follow", "--json",
         "--probe", "t"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        daemon.ctl("resume")
        records = [json.loads(follower.stdout.readline()) for _ in range(3)]
        assert [(r["seq"], r["pre"]) for r in records] == [(n, {"a": n, "b": 3 * n + 1}) for n in (1, 2, 3)]
        follower.send_signal(signal.SIGINT)  # how a person ends `probectl events -f`
        assert follower.wait(timeout=30) == 0
        assert follower.stderr.read() == ""
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        follower.stdout.close()
        follower.stderr.close()
    assert daemon.ctl("status", "--json").returncode == 0  # the daemon outlives its followers


def test_a_follower_that_vanishes_does_not_hurt_the_daemon(daemon):
    daemon.ctl("add", "-n", "p", "probe_target", "a=$arg1:u32")
    daemon.ctl("resume")
    for how in (signal.SIGTERM, signal.SIGKILL):
        follower = subprocess.Popen(
            [sys.executable, "-m", "probed.front.cli", "--control", str(daemon.control), "events", "--follow", "--json"],
            stdout=subprocess.PIPE, text=True,
        )
        assert json.loads(follower.stdout.readline())["name"] == "p"  # it streams...
        follower.send_signal(how)  # ...and goes away mid-stream
        follower.wait(timeout=30)
        follower.stdout.close()
    assert json.loads(daemon.ctl("list", "--json").stdout)[0]["state"] == "enabled"
    assert daemon.stop() == 0


def test_return_probes_from_probectl(daemon):
    assert daemon.ctl("add", "-r", "-n", "sums", "depth_sum", "n=$arg1:s32", "sum=$retval:s32").stdout.strip() == "1"
    assert daemon.ctl("add", "--return", "--maxactive", "1", "-n", "one", "depth_sum").stdout.strip() == "2"
    out = daemon.ctl("add", "depth_sum", "r=$retval", check=1)
    assert "column 3: $retval is only for return probes" in out.stderr
    out = daemon.ctl("add", "-r", "depth_sum+1", check=1)
    assert "without an offset" in out.stderr
    out = daemon.ctl("add", "--maxactive", "3", "depth_sum", check=1)
    assert "maxactive is for return probes" in out.stderr
    daemon.ctl("resume")
    records = [json.loads(x) for x in daemon.ctl("events", "--probe", "sums", "--count", "5", "--json").stdout.splitlines()]
    # Turn 1: depth_sum(1) -> depth_sum(0): returns 0 then 1; turn 2: 0, 1, 3.
    assert [(r["pre"]["n"], r["pre"]["sum"]) for r in records] == [(0, 0), (1, 1), (0, 0), (1, 1), (2, 3)]
    assert all(r["kind"] == "return" for r in records)
    listing = {p["name"]: p for p in json.loads(daemon.ctl("list", "--json").stdout)}
    assert listing["sums"]["retprobe"] is True and listing["sums"]["maxactive"] == 10
    assert listing["one"]["maxactive"] == 1 and listing["one"]["missed"] >= 1 + 2  # turns 1 and 2: 1 + 2 nested
    human = daemon.ctl("events", "--probe", "sums", "--count", "1").stdout
    assert human.startswith("#1 sums cpu0 returned to pc=0x") and "(depth_sum+0x" in human and "n=0 sum=0" in human
    assert daemon.stop() == 0
