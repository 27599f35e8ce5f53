"""GDB through probed's stub when QEMU or GDB goes away, on real QEMU with real GDB (issue 10.2, 10.7)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from tests import test_gdb
from tests.test_gdb import Gdb, symbol

stubbed = test_gdb.stubbed  # the fixture: probed --stopped --gdb-listen on the i386 guest


def _call(daemon, method: str) -> object:
    """One request on the control socket, from this process (polling with probectl would measure
    probectl's start-up)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.control))
        sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, "the daemon hung up"
            reply += chunk
    return json.loads(reply)["result"]


def _hits(daemon) -> int:
    return {p["name"]: p for p in _call(daemon, "list")}["count"]["hits"]


def _poll(predicate, seconds: float) -> float:
    """Poll until `predicate` holds; how long it took (the deadline fails the test)."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < seconds, "not within the deadline"
        time.sleep(0.005)
    return time.monotonic() - began


def test_gdb_killed_while_it_holds_the_guest(stubbed):
    """GDB stopped at its breakpoint holds the guest; killed, the guest runs on at once."""
    stubbed.ctl("add", "-n", "count", "probe_target")
    gdb = Gdb(stubbed.elf, stubbed.gdb_socket)
    gdb.mi("-break-insert elsewhere")
    assert gdb.run("-exec-continue")["frame"]["func"] == "elsewhere"
    status = json.loads(stubbed.ctl("status", "--json").stdout)
    assert status["guest"] == "stopped for GDB"
    held = _hits(stubbed)
    os.kill(gdb.ctl.gdb_process.pid, signal.SIGKILL)
    gdb.ctl.gdb_process.wait()
    took = _poll(lambda: _hits(stubbed) >= held + 3, 10)
    print(f"GDB killed while holding the guest: the probe hit 3 more times within {took * 1000:.0f} ms")
    assert took < 2.0
    stats = json.loads(stubbed.ctl("stats", "--json").stdout)
    assert stats["breakpoints"] == 1  # GDB's is gone, the probe's stays


def _records(daemon) -> list[dict]:
    out = daemon.ctl("events", "--probe", "count", "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_gdb_stays_attached_across_a_qemu_restart(stubbed, guest_i386):
    """QEMU killed while GDB holds the guest: probed notices at once (nobody talks to QEMU meanwhile),
    waits, and on the restarted QEMU sets GDB's breakpoint and the probe's again and keeps the guest held
    for GDB; GDB's continue runs the new guest to its breakpoint, and the probe's seq goes on."""
    stubbed.ctl("add", "-n", "count", "probe_target", "a=$arg1:s32")
    gdb = Gdb(stubbed.elf, stubbed.gdb_socket)
    gdb.mi("-break-insert depth_sum")
    assert gdb.run("-exec-continue")["frame"]["func"] == "depth_sum"
    guest_i386.kill()
    _poll(lambda: _call(stubbed, "status")["state"] == "waiting for the target", 10)
    guest_i386.restart()
    _poll(lambda: _call(stubbed, "status")["guest"] == "stopped for GDB", 10)
    stop = gdb.run("-exec-continue")
    assert stop["frame"]["func"] == "depth_sum"
    assert gdb.pc() == symbol(stubbed, "depth_sum")
    # The old guest's call 1 (seq 1), then the new guest's call 1 (seq 2), before its depth_sum.
    assert [(r["seq"], r["pre"]["a"]) for r in _records(stubbed)] == [(1, 1), (2, 1)]
    gdb.mi("-break-delete")
    assert gdb.mi("-exec-continue")["message"] == "running"
    _poll(lambda: _hits(stubbed) >= 5, 10)
    gdb.close()
