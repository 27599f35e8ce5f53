"""The engine's public API as explicit Protocols: what the control socket, the stub and stand-ins rely on.

`EngineAPI` is what `probed.front.control` (and the library, `probed.api`) call; `DebuggerAPI` is what the
GDB stub (`stub.server`) calls. `probed.engine.engine.Engine` implements both; a test stand-in implements
`EngineAPI`, and tests/test_engine_api.py checks that each one's methods have the Protocol's signatures,
so a fake cannot drift from the real engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["DebuggerAPI", "EngineAPI", "ProbeInfo", "protocol_mismatches"]


@runtime_checkable
class ProbeInfo(Protocol):
    """A probe as the front-ends see it."""

    id: int
    name: str
    spec: str

    def info(self) -> dict[str, Any]:
        """The row `probectl list` shows."""
        ...


@runtime_checkable
class EngineAPI(Protocol):
    """Probes: add, remove, enable, list; counters; the hold; symbol biases; the record hub.

    Attributes:
        hub: the `probed.records.events.EventHub` hit records are published to.
        symbols: the `probed.guest.symbols.SymbolStore` (its `files()` are listed by `probectl symbols`).
    """

    hub: Any
    symbols: Any

    async def add_probe(
        self,
        spec: str,
        *,
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        hw: bool = False,
        internal: bool = False,
        file_copy: str | None = None,
        file_offset: int | None = None,
        retprobe: bool = False,
        maxactive: int = 0,
        timeout: float | None = None,
    ) -> ProbeInfo: ...

    async def add_watch(
        self,
        spec: str,
        *,
        length: int | None = None,
        access: str = "w",
        name: str | None = None,
        pre: Any = None,
        post: Any = None,
        condition: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> ProbeInfo: ...

    async def remove_probe(self, ref: int | str) -> None: ...

    async def remove_all(self) -> int: ...

    async def enable_probe(self, ref: int | str) -> None: ...

    async def disable_probe(self, ref: int | str) -> None: ...

    async def resume(self) -> None: ...

    async def hold(self) -> None: ...

    async def set_bias(self, file: str, bias: int) -> list[Any]: ...

    def probes(self) -> list[Any]: ...

    def find_probe(self, ref: int | str) -> Any: ...

    def stats(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def hooks(self, glob: str = "*") -> list[dict[str, Any]]: ...


@runtime_checkable
class DebuggerAPI(Protocol):
    """GDB's requests, as the stub makes them (see `probed.gdbside.side`).

    Attributes:
        target: the attached `probed.engine.target.Target` (threads, register layout, the client).
        arch: the target's `rsp.arch.Arch`.
    """

    target: Any
    arch: Any

    async def call_stopped(self, fn: Callable[[], Awaitable[Any]]) -> Any: ...

    async def debugger_attach(self, link: Any) -> Any: ...

    async def debugger_detach(self, link: Any) -> None: ...

    async def debugger_request(self, payloads: Sequence[bytes]) -> list[bytes]: ...

    async def debugger_read_memory(self, address: int, length: int) -> bytes: ...

    def debugger_insert(self, ztype: int, address: int, kind: int) -> None: ...

    def debugger_remove(self, ztype: int, address: int, kind: int) -> None: ...

    async def debugger_resume(self, action: str, thread: Any = None) -> None: ...

    async def debugger_interrupt(self, link: Any) -> None: ...


def protocol_mismatches(protocol: type, implementation: object) -> list[str]:
    """How `implementation` (an instance) differs from `protocol`: missing methods or attributes, a
    sync/async mismatch, other parameter names, kinds or defaults. Empty when it conforms."""
    import inspect

    problems = []
    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        impl = getattr(type(implementation), name, None)
        if impl is None:
            problems.append(f"{name}: missing")
            continue
        if inspect.iscoroutinefunction(member) != inspect.iscoroutinefunction(impl):
            problems.append(f"{name}: {'async' if inspect.iscoroutinefunction(member) else 'sync'} in the protocol")
        want = [(p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(impl).parameters.values()]
        if want != have:
            problems.append(f"{name}: {inspect.signature(impl)} is not {inspect.signature(member)}")
    for name in getattr(protocol, "__annotations__", {}):
        if not hasattr(implementation, name):
            problems.append(f"{name}: attribute missing")
    return problems
