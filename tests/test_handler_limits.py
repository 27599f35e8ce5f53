"""Python handlers past their time limit, on real QEMU (issue 10.4): the hit is a fault, the guest goes on,
other probes count exactly; a handler's time is never blamed on the target.

The bundled guest calls `probe_target(n, ...)` then `elsewhere(n)` on turn n.
"""

from __future__ import annotations

import threading

import trio

from probed.api import attach
from probed.errors import BadSpec

FAULTS = 3  # fault_limit for these tests: the slow probe is disabled after this many in a row


async def _records(sub, n: int, seconds: float = 60) -> list[dict]:
    out = []
    with trio.fail_after(seconds):
        while len(out) < n:
            out.append(await sub.receive())
    return out


async def _slow_probe_and_a_counter(guest, slow, n: int = 30):
    """`slow` on probe_target (limit 0.3 s), a fetch probe on `elsewhere`; n records of the latter."""
    async with attach(guest.target, symbols=[str(guest.elf)], stopped=True, fault_limit=FAULTS) as engine:
        stuck = await engine.add_probe("probe_target", name="slow", pre=slow, timeout=0.3)
        counter = await engine.add_probe("elsewhere", name="counter", pre=["t=$arg1:s32"])
        with engine.hub.subscribe(stuck.id, maxsize=1000) as slow_sub, engine.hub.subscribe(counter.id) as sub:
            await engine.resume()
            counted = await _records(sub, n)
            slow_records = await _records(slow_sub, FAULTS)
        return engine.stats(), stuck.state, stuck.faults, slow_records, counted


def _check(stats, state, faults, slow_records, counted, what: str) -> None:
    assert faults == FAULTS
    assert state.startswith(f"disabled: {FAULTS} handler faults in a row (last: HandlerTimeout")
    for rec in slow_records:
        assert rec["error"] == f"pre: HandlerTimeout: the handler ran past its time limit of 0.3 s ({what})"
    # The counter saw every turn, in order: the guest ran on past each slow hit.
    assert [r["pre"]["t"] for r in counted] == list(range(1, len(counted) + 1))
    assert [r["seq"] for r in counted] == list(range(1, len(counted) + 1))
    assert all(r["error"] is None for r in counted)
    assert stats["faults"] == FAULTS


async def test_an_async_handler_past_its_limit_is_cancelled(guest_i386):
    async def sleeper(ctx):
        await trio.sleep(60)

    _check(*await _slow_probe_and_a_counter(guest_i386, sleeper), "it was cancelled")


async def test_a_sync_handler_that_never_returns_is_abandoned(guest_i386):
    release = threading.Event()  # only so the abandoned threads end with the test

    def spin(ctx):
        while not release.is_set():
            pass

    try:
        _check(*await _slow_probe_and_a_counter(guest_i386, spin),
               "its worker thread is abandoned and runs on")
    finally:
        release.set()


async def test_a_slow_handler_is_not_blamed_on_the_target(guest_i386):
    """A handler taking longer than the target's own time limit (1 s here) but within its own (5 s)."""

    async def slow(ctx):
        await trio.sleep(1.5)
        return {"eip": ctx.regs["eip"]}

    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)], stopped=True, timeout=1.0) as engine:
        probe = await engine.add_probe("probe_target", pre=slow, post=["a=$arg1:s32"], timeout=5)
        with engine.hub.subscribe(probe.id) as sub:
            await engine.resume()
            records = await _records(sub, 2)
        assert engine.service.reconnects == 0
        assert engine.state in ("running", "stopped")
    address = engine.symbols.lookup("probe_target").address
    assert [(r["error"], r["pre"]) for r in records] == [(None, {"eip": address})] * 2


async def test_a_bad_time_limit_is_refused(guest_i386):
    async with attach(guest_i386.target, symbols=[str(guest_i386.elf)]) as engine:
        for bad in (-1, "3", float("nan")):
            try:
                await engine.add_probe("probe_target", pre=lambda ctx: None, timeout=bad)
            except BadSpec as exc:
                assert "a handler time limit is a number of seconds" in str(exc)
            else:
                raise AssertionError(f"timeout={bad!r} was accepted")
        assert engine.probes() == []
