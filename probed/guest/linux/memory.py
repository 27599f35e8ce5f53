"""Reading guest memory for the Linux guest model: one small interface, and its gdbstub implementation.

Everything in `probed.guest.linux` reads the guest through `GuestMemory` (an async `read(address, size)`),
so a faster path (reading guest RAM straight from the host) can replace the gdbstub one without touching the
readers. `read_batch` answers many small reads in one go where the reader can (the gdbstub pipelines them)
and says which addresses are not mapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from probed.errors import TargetError

__all__ = ["GuestMemory", "GuestMemoryError", "RspMemory", "BytesMemory", "read_batch"]

CHUNK = 256 * 1024
"""The biggest single request `RspMemory` sends in one pipelined write (128 `m` packets of 2048 bytes)."""


class GuestMemoryError(TargetError):
    """The guest has nothing readable at an address (not mapped, or the target refused)."""


@runtime_checkable
class GuestMemory(Protocol):
    """Guest virtual memory, as the running CPU sees it."""

    async def read(self, address: int, size: int) -> bytes:
        """`size` bytes at `address`.

        Raises:
            GuestMemoryError: some of it cannot be read.
        """
        ...


async def read_batch(memory: GuestMemory, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
    """Many reads at once: each span's bytes, or None where it cannot be read."""
    batch = getattr(memory, "read_batch", None)
    if batch is not None:
        return await batch(spans)
    out: list[bytes | None] = []
    for address, size in spans:
        try:
            out.append(await memory.read(address, size))
        except GuestMemoryError:
            out.append(None)
    return out


class RspMemory:
    """Guest memory through the gdbstub's `m` packets (2048 bytes each), pipelined.

    Only for use while the engine task holds the guest stopped (attach time, a probe's handler, a request).

    Args:
        target: the engine's `probed.engine.target.Target`.
    """

    def __init__(self, target):
        self.target = target
        self.bytes_read = 0

    async def read(self, address: int, size: int) -> bytes:
        out = bytearray()
        for start in range(address, address + size, CHUNK):
            length = min(CHUNK, address + size - start)
            (data,) = await self.target.read_many([(start, length)])
            if isinstance(data, Exception):
                raise GuestMemoryError(f"cannot read {length} bytes at {start:#x}: {data}")
            out += data
        self.bytes_read += len(out)
        return bytes(out)

    async def read_batch(self, spans: Sequence[tuple[int, int]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        # Keep each pipelined write to about CHUNK bytes of answers.
        group: list[tuple[int, int]] = []
        total = 0
        for span in [*spans, None]:
            if span is None or (group and total + span[1] > CHUNK):
                for data in await self.target.read_many(group):
                    out.append(None if isinstance(data, Exception) else data)
                    self.bytes_read += 0 if isinstance(data, Exception) else len(data)
                group, total = [], 0
            if span is not None:
                group.append(span)
                total += span[1]
        return out


class BytesMemory:
    """Memory from byte images at given addresses (a kernel ELF's sections, a test's made-up tables).

    Args:
        regions: (address, bytes) pairs.
    """

    def __init__(self, regions: Sequence[tuple[int, bytes]]):
        self.regions = sorted(regions)

    async def read(self, address: int, size: int) -> bytes:
        for start, data in self.regions:
            if start <= address and address + size <= start + len(data):
                return data[address - start : address - start + size]
        raise GuestMemoryError(f"nothing at {address:#x} (+{size})")
