"""What the tests that probe the Linux guest share: the host copies of the test programs, the guest's shell
from trio, and taking records from a subscription."""

from __future__ import annotations

import pytest
import trio

from probed.testing.qemu import CACHE
from tests.linux.uprogs import uprog_path


def uprog_copy(name: str) -> str:
    """The host copy of test program `name` (tests/linux/uprogs), as `--file-copy` takes it."""
    return str(uprog_path(CACHE / "linux", name))


async def shell(guest, command: str) -> str:
    """`guest.shell(command)` without blocking trio."""
    return await trio.to_thread.run_sync(guest.shell, command)


async def take(sub, count: int) -> list[dict]:
    """The next `count` records of `sub` (within a bound that only a hung guest would reach)."""
    with trio.fail_after(90):
        return [await sub.receive() for _ in range(count)]


async def none_left(engine, sub) -> None:
    """Nothing more was published: a request of ours round-trips through the engine first."""
    await engine.call_stopped(lambda: trio.sleep(0))
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()


def by_pid(records: list[dict]) -> dict[int, list[dict]]:
    """Records by the `pid` their pre-handler fetched, each process's in order."""
    out: dict[int, list[dict]] = {}
    for rec in records:
        out.setdefault(rec["pre"]["pid"], []).append(rec)
    return out


def drain(sub) -> list[dict]:
    """The records `sub` holds now."""
    records = []
    while True:
        try:
            records.append(sub.receive_nowait())
        except trio.WouldBlock:
            return records
