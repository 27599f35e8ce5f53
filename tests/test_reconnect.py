"""Losing QEMU and getting it back, on real QEMU (issue 10.2): probes kept, re-armed, guest resumed, seq on.

The bundled guest calls `probe_target(n, 3n + 1, ...)` on turn n, so each record says which call it saw.
"""

from __future__ import annotations

import json
import os
import signal
import time

import trio

from probed.api import attach
from tests.daemon import Daemon

FREEZE_SECONDS = 15


async def _until(predicate, seconds: float, what: str) -> None:
    """Poll `predicate` (no sleep stands in for it: the deadline fails the test)."""
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.01)


async def _records(sub, n: int, seconds: float = 30) -> list[dict]:
    out = []
    with trio.fail_after(seconds):
        while len(out) < n:
            out.append(await sub.receive())
    return out


async def test_qemu_killed_and_restarted_on_the_same_socket(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        probe = await engine.add_probe("probe_target", pre=["a=$arg1:s32"])
        with engine.hub.subscribe(probe.id, maxsize=100_000) as sub:
            await engine.resume()
            before = await _records(sub, 20)
            guest_i386.kill()
            await _until(lambda: engine.status()["state"] == "waiting for the target", 10, "waiting")
            assert engine.guest.state.value == "waiting for the target"
            assert len(engine.probes()) == 1
            guest_i386.restart()  # listening again when this returns
            listening = trio.current_time()
            # Everything the old guest hit after `before` (and a hit cut short, with its error), then the
            # new guest's first call, a == 1.
            after = []
            with trio.fail_after(30):
                while not after or after[-1]["error"] is not None or after[-1]["pre"]["a"] != 1:
                    after.append(await sub.receive())
            back_in = trio.current_time() - listening
        status = engine.status()
    print(f"probes firing again {back_in * 1000:.0f} ms after QEMU listened again")
    assert back_in < 2.0
    records = before + after
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # seq continues, no gap
    old = [r["pre"]["a"] for r in records[:-1] if r["error"] is None]
    assert old == list(range(1, len(old) + 1))
    assert status["reconnects"] == 1


async def test_qemu_frozen_15_s_then_continued(guest_i386):
    """SIGSTOP in the middle of a hit (from the handler itself, so the freeze lands where the engine waits
    for an answer): the engine gives up on the connection after its timeout, waits, and picks QEMU up again
    when it runs; the guest runs and the probes fire with `seq` going on."""
    pid = guest_i386.pid
    frozen_at: list[bool] = []

    def freeze(ctx):
        if ctx.probe.hits == 10:
            os.kill(pid, signal.SIGSTOP)
            frozen_at.append(True)
        return None

    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True) as engine:
        probe = await engine.add_probe("probe_target", pre=["a=$arg1:s32", "calls=@calls:u32"])
        # post=[]: the probed instruction is single-stepped, so the engine waits for an answer from QEMU.
        await engine.add_probe("probe_target", name="freezer", pre=freeze, post=[])
        try:
            with engine.hub.subscribe(probe.id, maxsize=100_000) as sub:
                await engine.resume()
                first = await _records(sub, 10)
                await _until(lambda: frozen_at, 10, "the freeze")
                await _until(lambda: engine.state == "waiting for the target", 15, "waiting")
                await trio.sleep(FREEZE_SECONDS - engine.timeout)  # the fault under test: frozen 15 s in all
                os.kill(pid, signal.SIGCONT)
                rest = await _records(sub, 30, seconds=30)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert engine.service.reconnects == 1
    records = first + rest
    assert [r["seq"] for r in records] == list(range(1, 41))
    # Hit 10 was cut short by the freeze (published with the reason and its pre values). QEMU, continued,
    # may still run the step it had been sent (call 10 goes on) or not (call 10 is hit again).
    cut = [r for r in records if r["error"] is not None]
    assert [r["seq"] for r in cut] == [10]
    assert "lost" in cut[0]["error"] and cut[0]["pre"]["a"] == 10
    calls = [r["pre"]["a"] for r in records]
    assert calls in (list(range(1, 41)), [*range(1, 11), *range(10, 40)])
    assert [r["pre"]["calls"] for r in records] == [a - 1 for a in calls]  # the guest ran on, call by call
    assert guest_i386.alive()


async def test_requests_while_waiting_are_refused_clearly(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)]) as engine:
        guest_i386.kill()
        await _until(lambda: engine.state == "waiting for the target", 10, "waiting")
        try:
            await engine.add_probe("probe_target")
        except Exception as exc:  # noqa: BLE001 - the type and message are what is checked
            error = exc
        assert type(error).__name__ == "TargetError"
        assert "waiting" in str(error)
        guest_i386.restart()
        await _until(lambda: engine.state != "waiting for the target", 5, "reconnected")
        probe = await engine.add_probe("probe_target", pre=["a=$arg1:s32"])
        with engine.hub.subscribe(probe.id) as sub:
            (rec,) = await _records(sub, 1)
        assert rec["error"] is None


def _status(daemon) -> dict:
    return json.loads(daemon.ctl("status", "--json").stdout)


def _poll(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.02)


def test_the_daemon_waits_for_qemu_and_says_so(guest_i386, tmp_path):
    daemon = Daemon(guest_i386, tmp_path)
    try:
        daemon.ctl("add", "-n", "count", "probe_target", "a=$arg1:s32")
        daemon.ctl("events", "--probe", "count", "--count", "5")
        guest_i386.kill()
        _poll(lambda: _status(daemon)["state"] == "waiting for the target", 10)
        status = _status(daemon)
        assert status["guest"] == "waiting for the target" and status["probes"] == 1
        out = daemon.ctl("add", "probe_target", check=None)
        assert out.returncode != 0 and "waiting for it" in out.stderr
        guest_i386.restart()
        _poll(lambda: _status(daemon)["state"] != "waiting for the target", 5)
        hits = json.loads(daemon.ctl("list", "--json").stdout)[0]["hits"]
        daemon.ctl("events", "--probe", "count", "--count", str(hits + 5))  # firing again, the guest runs
        assert _status(daemon)["reconnects"] == 1
    finally:
        assert daemon.stop() == 0

