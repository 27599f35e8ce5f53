"""The hit context handlers see: the CPU state at one moment of one hit, read lazily and in batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from probed.lang.program import STRING_MAX, read_c_string
from rsp.errors import TargetTimeout

if TYPE_CHECKING:
    from probed.engine.probes import Probe
    from probed.engine.target import Target

__all__ = ["HitContext", "RegisterView"]



class RegisterView(Mapping[str, int]):
    """Registers by name over one `g` reply, decoded one at a time as they are asked for."""

    def __init__(self, target: Target, g_payload: bytes):
        self._target = target
        self._g = g_payload
        self._cache: dict[str, int | None] = {}

    def __getitem__(self, name: str) -> int:
        try:
            return self._cache[name]  # type: ignore[return-value]
        except KeyError:
            pass
        real = self._target.arch.resolve_register(name) if name not in self._target.layout_names else name
        value = self._target.layout.value(self._g, real)
        self._cache[name] = value
        if value is None:
            raise KeyError(f"register {name} is unavailable")
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._target.g_register_names)

    def __len__(self) -> int:
        return len(self._target.g_register_names)


class HitContext:
    """What a handler gets on a hit.

    Attributes:
        probe: the probe whose handler runs.
        cpu: the index of the CPU that hit (0-based).
        phase: "pre" (before the probed instruction) or "post" (after it).
        regs: registers by name (`ctx.regs["eax"]`, kprobe aliases too: `ctx.regs["ax"]`).
        entry: in a return probe's handler, what was kept at the function's entry
            (`probed.engine.returns.EntryContext`: `regs`, `args`, `sp`, `cpu`, `return_address`...); else None.
    """

    entry = None

    def __init__(self, target: Target, cpu: int, phase: str, g_payload: bytes | None, probe: Probe | None = None):
        self._target = target
        self.cpu = cpu
        self.phase = phase
        self.probe = probe
        self._g = g_payload
        self._regs: RegisterView | None = RegisterView(target, g_payload) if g_payload is not None else None
        self.reads = 0
        self._read_now: Callable[[int, int], bytes | None] | None = None  # guest RAM's, bound to this stop

    # -- registers ----------------------------------------------------------------------------------

    @property
    def regs(self) -> RegisterView:
        if self._regs is None:
            raise RuntimeError("registers were not read for this hit; use `await ctx.registers()`")
        return self._regs

    async def registers(self) -> RegisterView:
        """The registers, read with one `g` the first time they are needed."""
        if self._regs is None:
            with trio.CancelScope(shield=True):  # see `read_many`
                self._g = await self._target.read_g(timeout=getattr(getattr(self._target, "client", None), "timeout", None))
            self._regs = RegisterView(self._target, self._g)
        return self._regs

    @property
    def pc(self) -> int:
        return self.regs[self._target.arch.pc]

    @property
    def retval(self) -> int:
        """The return value register (meaningful in a return probe's handler)."""
        return self.regs[self._target.arch.return_register]

    # -- memory -------------------------------------------------------------------------------------

    async def read_many(self, requests: Sequence[tuple[int, int]]) -> list[bytes | Exception]:
        """Several reads in one round trip; a failed read is returned as its exception."""
        self.reads += len(requests)
        read_now = self._reader()
        if read_now is not None:
            local: list[bytes | Exception] = []
            for address, length in requests:
                data = read_now(address, length)
                if data is None:
                    break  # (the rest with it, below: where RAM cannot answer, the stub does)
                local.append(data)
            else:
                return local
        # This context lives for one stop: reads share its registers (page tables) and a cache.
        # A handler cancelled at its time limit must not cut a request short (its reply would then be
        # taken for the next request's): the read finishes, bounded by the target's own time limit.
        client = getattr(self._target, "client", None)
        if client is None:  # a stand-in target (unit tests): nothing to protect
            return await self._target.read_many(requests, registers=self._g, scope=self)
        with trio.CancelScope(shield=True), trio.move_on_after(client.timeout):
            return await self._target.read_many(requests, registers=self._g, scope=self, timeout=client.timeout)
        client.protocol.abandon()
        raise TargetTimeout(f"the target did not answer a handler's read within {client.timeout:g} s")

    def read_now(self, address: int, length: int) -> bytes | None:
        """Guest memory read at once from guest RAM, or None when it must be read with `read_many` (the stub
        answers it, or it is checked against the stub)."""
        read_now = self._reader()
        data = read_now(address, length) if read_now is not None else None
        if data is not None:
            self.reads += 1
        return data

    def _reader(self) -> Callable[[int, int], bytes | None] | None:
        """The target's `read_now` (guest RAM), bound to this stop (None without it or registers)."""
        if self._read_now is None:
            read_now = getattr(self._target, "read_now", None)
            if read_now is None or self._g is None:
                return None
            self._read_now = partial(read_now, registers=self._g, scope=self)
        return self._read_now

    @property
    def reads_are_cheap(self) -> bool:
        """Reads cost no round trip to the stub (guest RAM is read directly)."""
        memory = getattr(self._target, "memory", None)
        return bool(memory is not None and memory.direct)

    async def read(self, address: int, length: int) -> bytes:
        """Read guest memory.

        Raises:
            RemoteError: the target refused the read (an unmapped address).
        """
        (result,) = await self.read_many([(address, length)])
        if isinstance(result, Exception):
            raise result
        return result

    async def read_u(self, address: int, size: int | None = None) -> int:
        """Read an unsigned integer of `size` bytes (default: the word size), in target byte order."""
        size = size or self._target.arch.word_size
        return int.from_bytes(await self.read(address, size), "little")

    async def read_string(self, address: int, limit: int = STRING_MAX) -> str:
        """Read a NUL-terminated string (at most `limit` bytes), decoded as UTF-8 with replacement.

        Raises:
            RemoteError: the first byte cannot be read.
        """

        def read(addr: int, length: int):
            data = yield (addr, length)
            if isinstance(data, Exception):
                raise data
            return data

        reader = read_c_string(read, address, limit, Exception)
        request = next(reader)
        while True:
            (data,) = await self.read_many([request])
            try:
                request = reader.send(data)
            except StopIteration as done:
                return done.value

    def symbolize(self, address: int) -> str | None:
        """`sym+0xoff` for an address in the loaded symbols, else None."""
        return self._target.symbolize(address)

    def symstr(self, address: int) -> str | None:
        """`sym+0xoff/0xsize` (kprobe_events' symstr) for an address in the loaded symbols, else None."""
        where = self._target.symbolize(address)
        if where is None:
            return None
        name, _, off = where.partition("+")
        try:
            size = self._target.symbols.lookup(name).size
        except Exception:  # UnknownSymbol: a name symbolize made up cannot be looked up
            return where
        return f"{name}+{off or '0x0'}/{size:#x}"

    def __repr__(self) -> str:
        return f"<HitContext {self.phase} cpu{self.cpu} probe={getattr(self.probe, 'name', None)}>"

