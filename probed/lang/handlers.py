"""Probe handlers: fetch-language programs and Python callables, behind one small interface.

A handler runs with a `HitContext` and returns a JSON-serialisable value. The engine asks each handler
what it needs (`needs_memory`) so that a hit costs only the packets its handlers need: a handler that
reads only registers lets the engine send the register read and the single-step in one write.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import trio

from .compat import CompatProgram, compat_arch, is_compat

__all__ = ["FetchHandler", "Handler", "HandlerTimeout", "PythonHandler", "make_handler", "make_handlers"]


class HandlerTimeout(Exception):
    """A Python handler ran past its probe's time limit (the hit is a fault; the guest goes on)."""

    def __init__(self, seconds: float, sync: bool):
        self.seconds = seconds
        self.sync = sync
        what = "its worker thread is abandoned and runs on" if sync else "it was cancelled"
        super().__init__(f"the handler ran past its time limit of {seconds:g} s ({what})")


class Handler:
    """What the engine runs on a hit."""

    needs_registers: bool = True
    needs_memory: bool = True
    description: str = ""

    async def run(self, ctx: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class FetchHandler(Handler):
    """A handler made of kprobe_events fetch args (`dfd=%di:s32 name=+0(%si):string`).

    On user code of an x86_64 guest it holds a second program for 32-bit (compat) processes, run on the
    hits whose registers say so (probed.lang.compat).
    """

    def __init__(self, args: Sequence[str], arch: Any, symbols: Any, env: Any = None):
        from .fetch import parse_fetchargs

        self.args = list(args)
        self.env = env
        self.program = parse_fetchargs(self.args, arch, symbols, env)
        self.compat: Any = None
        if env is not None and env.user and arch.name == "x86_64":
            parsed = parse_fetchargs(self.args, compat_arch(arch), symbols, env)
            self.compat = CompatProgram(parsed.fields_spec, parsed.arch)
        self.fields = tuple(self.program.fields)
        programs = [p for p in (self.program, self.compat) if p is not None]
        self.needs_registers = any(p.needs_registers for p in programs)
        self.needs_memory = any(p.needs_memory for p in programs)
        self.description = " ".join(self.args)

    def rebuilt(self, arch: Any, symbols: Any) -> FetchHandler:
        """The same fetch args compiled again against `symbols` (`@SYM` is compiled to an address: after
        the symbols moved, a guest that rebooted at another KASLR slide, the old address is wrong)."""
        return FetchHandler(self.args, arch, symbols, self.env)

    async def run(self, ctx: Any) -> dict[str, Any]:
        if not self.fields:
            return {}
        program = self.program
        if self.compat is not None and is_compat(await ctx.registers()):  # a user hit has its registers already
            program = self.compat
        entry = getattr(ctx, "entry", None)
        if entry is not None and program.entry_args:
            # A return probe: `$argN` (and parameters by name) are the values kept at the function's entry.
            return await program.bind(entry.args).evaluate(ctx)
        return await program.evaluate(ctx)


class PythonHandler(Handler):
    """A Python callable `fn(ctx)`; it may be a coroutine function (to `await ctx.read(...)`).

    Time limit (`limit` seconds, `run_limited`): a coroutine function runs in the engine's task inside a
    cancel scope, cancelled at the limit. A plain function runs in a worker thread
    (`trio.to_thread.run_sync`, `abandon_on_cancel=True`): past the limit the engine stops waiting for it
    and goes on; Python cannot kill a thread, so one that never returns keeps running (and holding a CPU
    and the GIL now and then) until the daemon exits; whatever it returns later is dropped. With no limit
    (`math.inf` or 0), a plain function runs inline in the engine's task, as fast as it gets, unbounded.
    """

    needs_memory = True  # it may read anything: the engine reads before it steps

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self.description = getattr(fn, "__qualname__", repr(fn))
        self.is_async = inspect.iscoroutinefunction(fn)

    async def run(self, ctx: Any) -> Any:
        result = self.fn(ctx)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def run_limited(self, ctx: Any, limit: float) -> Any:
        """`run` bounded by `limit` seconds.

        Raises:
            HandlerTimeout: the handler did not finish in time.
        """
        if not limit or limit == math.inf:
            return await self.run(ctx)
        with trio.move_on_after(limit):
            if self.is_async:
                return await self.run(ctx)
            result = await trio.to_thread.run_sync(self.fn, ctx, abandon_on_cancel=True,
                                                   thread_name=f"probed handler {self.description}")
            if inspect.isawaitable(result):
                result = await result
            return result
        raise HandlerTimeout(limit, sync=not self.is_async)


def make_handler(
    spec: Sequence[str] | Callable[[Any], Any] | Handler | None, arch: Any, symbols: Any, env: Any = None
) -> Handler | None:
    """A handler from fetch args, a callable, or a ready Handler; None stays None.

    Args:
        env: a `FetchEnv` (the probed function, the kernel's types), or None.
    """
    if spec is None or isinstance(spec, Handler):
        return spec
    if callable(spec):
        return PythonHandler(spec)
    if isinstance(spec, str):
        spec = spec.split()
    return FetchHandler(list(spec), arch, symbols, env)


async def make_handlers(
    specs: Sequence[Any], arch: Any, symbols: Any, *, function: str | None = None, offset: int = 0,
    load_types: Callable[[], Awaitable[Any]] | None = None, user: bool = False, retprobe: bool = False,
) -> list[Handler | None]:
    """Handlers for a probe on `function+offset`, loading the kernel's types only if a fetch arg needs them.

    Args:
        load_types: returns the kernel's types (KernelTypes), or raises LookupError saying why there are none;
            called at most once, and only when a fetch arg uses `$comm`, a parameter name or `->`.
        user: the probe is on user-space code (FetchEnv.user).
        retprobe: the first spec is a return probe's handler (`$retval`; `$argN` kept from the entry).

    Raises:
        FetchSyntaxError: as `parse_fetchargs`, with the reason types could not be had when that is the cause.
    """
    from .fetch import FetchEnv, TypesNeeded

    env = FetchEnv(function=function, at_entry=offset == 0, user=user)

    def handlers(env: FetchEnv) -> list[Handler | None]:
        return [make_handler(s, arch, symbols, replace(env, retprobe=retprobe and i == 0)) for i, s in enumerate(specs)]

    try:
        return handlers(env)
    except TypesNeeded:
        if load_types is None:
            raise
    try:
        env = replace(env, types=await load_types())
    except LookupError as exc:  # NoKernelTypes: not Linux, no BTF, not readable
        env = replace(env, types_error=str(exc))
    return handlers(env)
