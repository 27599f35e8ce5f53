"""The Python library API: attach to a guest and hang Python callables (or fetch args) on it.

    import trio
    from probed.api import attach

    async def main():
        async with attach("unix:/tmp/gdb.sock", symbols=["guest.elf"]) as engine:
            def args(ctx):                      # runs before the probed instruction
                return {"eax": ctx.regs["eax"]}

            async def name(ctx):                # handlers may await reads
                sp = ctx.regs["esp"]
                return await ctx.read_string(await ctx.read_u(sp + 12))

            probe = await engine.add_probe("probe_target", pre=name, post=args)
            with engine.hub.subscribe(probe.id) as hits:
                async for record in hits:
                    print(record["seq"], record["pre"], record["post"])

    trio.run(main)

A handler gets a `probed.lang.context.HitContext`: `ctx.regs[name]` (target-description names and kprobe
aliases), `await ctx.read(addr, n)`, `await ctx.read_u(addr, size)`, `await ctx.read_string(addr)`,
`ctx.symbolize(addr)`, `ctx.cpu`, `ctx.pc`, `ctx.probe`, `ctx.phase`. It returns a JSON-serialisable value,
which the hit record carries as `pre` or `post`. An exception is recorded in that hit's `error`; after
`fault_limit` faults in a row the probe is disabled. A handler runs within a time limit (`add_probe(...,
timeout=SECONDS)`, else the engine's `handler_timeout`, 5 s): past it the hit is a fault too; a plain
function runs in a worker thread, abandoned past its limit (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from probed.engine.engine import Engine
from probed.engine.probes import Probe
from probed.guest.linux.kernel import LinuxKernel, use_linux
from probed.lang.context import HitContext
from probed.records.aggregate import Aggregation
from probed.records.events import Subscription

__all__ = ["Aggregation", "Engine", "HitContext", "Probe", "Subscription", "aggregate", "attach"]


def aggregate(engine: Engine, func: str, *, probe: Probe | int | str | None = None, field: str | None = None,
              by: Sequence[str] = (), backlog: bool = False) -> Aggregation:
    """A bpftrace-style map over the engine's hit records, counted as they are published.

        with aggregate(engine, "hist", probe=probe, field="len") as hist:
            ...
            print(format_map(hist.snapshot()))      # probed.records.maps_text

    Args:
        func: count, sum, min, max, avg, stats or hist.
        probe: whose records (a Probe, an id or a name); None for every probe's.
        field: the value (not for count): a fetched field, or `duration_ns`, `cpu`, ...
        by: the keys: fetched fields, `probe`, `cpu`, ...
        backlog: start with the records still in the ring buffer.

    Returns:
        The attached `Aggregation` (`rows()`, `snapshot()`); `close()` it, or use it as a context manager.
    """
    probe_id = None
    if probe is not None:
        probe_id = probe.id if isinstance(probe, Probe) else engine.find_probe(probe).id
    return Aggregation(func, probe=probe_id, field=field, by=tuple(by)).attach(engine.hub, backlog=backlog)


@asynccontextmanager
async def attach(target: str, *, symbols: Sequence[str] = (), linux: bool | LinuxKernel = False,
                 **options) -> AsyncIterator[Engine]:
    """Attach an engine to `target` for the duration of the block.

    On exit every probe's breakpoint is removed, the guest resumes, and the connection is closed.

    Args:
        target: `tcp:HOST:PORT` or `unix:PATH` of QEMU's gdbstub.
        symbols: symbol files, `PATH[@BIAS]`.
        linux: the guest is an x86_64 Linux kernel (`probed --linux`): True, or a configured
            `probed.guest.linux.kernel.LinuxKernel` (its cache, progress callback). Its KASLR slide is found,
            symbol files are rebased, or symbols are read from the guest; modules are followed.
        **options: passed to `Engine` (`stopped`, `hw_slots`, `buffer`, `fault_limit`, `timeout`,
            `handler_timeout`, `reconnect`: a lost connection is waited for and picked up again unless
            `reconnect=False`; see docs/operations.md).
    """
    try:
        async with trio.open_nursery() as nursery:
            engine = Engine(target, symbol_files=symbols, **options)
            if linux:
                use_linux(engine, linux if isinstance(linux, LinuxKernel) else None)
            await nursery.start(engine.run)
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside nested groups (the caller's, or the engine's), else the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group
