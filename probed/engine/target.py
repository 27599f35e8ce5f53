"""The target as the engine sees it: one RSP connection plus what was learnt when attaching.

Attaching reads QEMU's target description (and what it includes), builds the register layout and picks the
arch. QEMU answers `p`/`P` only after a debugger has read `target.xml` (it sets `gdb_has_xml` then), so the
description is read first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from probed.errors import TargetError
from probed.guest.memory import GuestMemory, open_guest_memory
from probed.guest.symbols import SymbolStore
from rsp.arch import Arch, arch_for
from rsp.connection import MAX_MEMORY_READ, RSPClient
from rsp.errors import ConnectionClosed, RemoteError, RSPError, TargetTimeout, UnsupportedPacket
from rsp.features import build_qsupported, parse_qsupported_reply
from rsp.packets import (
    VContAction,
    halt_reason,
    parse_hex_data,
    parse_thread_list,
    raise_for_error,
    read_memory,
    read_registers,
    step,
    thread_info_first,
    thread_info_next,
    vcont,
    vcont_query,
)
from rsp.registers import RegisterLayout
from rsp.stop import StopReply, ThreadId, parse_stop_reply
from rsp.tdesc import TargetDescription, includes_of, parse_target_description

__all__ = ["Target", "attach_target"]

log = logging.getLogger(__name__)

CLIENT_FEATURES = build_qsupported({"swbreak": True, "hwbreak": True, "vContSupported": True, "xmlRegisters": "i386"})


class Target:
    """The attached target: connection, register layout, arch, threads and symbols."""

    def __init__(self, client: RSPClient, symbols: SymbolStore, *, guest_memory: str = "auto", qemu_pid: int | None = None):
        self.client = client
        self.symbols = symbols
        self._memory_options = (guest_memory, qemu_pid)
        self.memory: GuestMemory | None = None  # how memory is read (set up at attach): RAM directly, or `m`
        self.features: dict[str, str | bool] = {}
        self.tdesc: TargetDescription | None = None
        self.layout: RegisterLayout | None = None
        self.arch: Arch | None = None
        self.threads: list[ThreadId] = []
        self.layout_names: frozenset[str] = frozenset()
        self.g_register_names: tuple[str, ...] = ()
        self.vcont_step = True

    async def attach(self) -> StopReply | None:
        """Learn the target; returns the stop the guest is in (`?` also clears QEMU's stale breakpoints)."""
        reply = await self.client.checked(CLIENT_FEATURES)
        self.features = dict(parse_qsupported_reply(reply))
        if self.features.get("qXfer:features:read") is not True:
            raise TargetError("the target does not offer its target description (qXfer:features:read)")
        await self._read_description()
        actions = await self.client.request(vcont_query())
        self.vcont_step = b";s" in actions
        stop = await self.client.request(halt_reason())
        self.client.pending_stops.clear()  # the T02 QEMU sends when we connect to a running guest
        await self.refresh_threads()
        self.memory = await open_guest_memory(self, *self._memory_options)
        event = parse_stop_reply(stop)
        return event if isinstance(event, StopReply) else None

    async def _read_description(self) -> None:
        documents: dict[str, str] = {}
        todo = ["target.xml"]
        while todo:
            annex = todo.pop()
            if annex in documents:
                continue
            text = (await self.client.read_xfer("features", annex)).decode()
            documents[annex] = text
            todo.extend(includes_of(text))
        self.tdesc = parse_target_description(documents)
        self.layout = RegisterLayout(self.tdesc)
        self.arch = arch_for(self.tdesc)
        self.layout_names = frozenset(r.name for r in self.tdesc.registers)
        self.g_register_names = tuple(r.name for r in self.tdesc.registers if r.offset is not None)

    async def refresh_threads(self) -> list[ThreadId]:
        """Ask for the thread (vCPU) list."""
        threads: list[ThreadId] = []
        try:
            part, done = parse_thread_list(await self.client.request(thread_info_first()))
            threads += part
            while not done:
                part, done = parse_thread_list(await self.client.request(thread_info_next()))
                threads += part
        except UnsupportedPacket:
            log.debug("no thread list: one CPU assumed")
        self.threads = threads or [ThreadId(1)]
        return self.threads

    # -- reads --------------------------------------------------------------------------------------

    async def read_g(self, *, timeout: float | None = None) -> bytes:
        """The register block of the current thread (the one that stopped)."""
        packet = read_registers()
        reply = await self.client.request(packet, timeout=timeout)
        raise_for_error(reply, packet)
        return reply

    async def read_many(
        self, requests: Sequence[tuple[int, int]], *, registers: bytes | None = None, scope: object = None,
        timeout: float | None = None,
    ) -> list[bytes | Exception]:
        """Several memory reads, from guest RAM directly where it can be read (`probed.guest.memory`), else
        through the stub (`read_many_stub`); a refused read comes back as its exception.

        Args:
            registers: the `g` block of the CPU that stopped, at this stop (page tables for direct reads).
            scope: an object living for this stop only (a hit's context): reads sharing it share a cache.
            timeout: for reads through the stub, the time limit on the reply.
        """
        if self.memory is not None:
            return await self.memory.read_many(requests, registers, scope)
        return await self.read_many_stub(requests, timeout=timeout)

    def read_now(self, address: int, length: int, registers: bytes | None, scope: object = None) -> bytes | None:
        """One read from guest RAM right now, or None when it needs `read_many` (see `GuestMemory.read_now`)."""
        if self.memory is None or registers is None:
            return None
        return self.memory.read_now(address, length, registers, scope)

    async def address_space(self, registers: bytes) -> int | None:
        """The stop's address space as Linux's `mm->pgd` names it (physical), from its `g` block: CR3's root
        without PCID/NOFLUSH bits, a KPTI user PGD taken to its kernel PGD (`probed.guest.memory.kpti`)."""
        if self.memory is None:
            return None
        return await self.memory.address_space(registers)

    async def read_many_stub(
        self, requests: Sequence[tuple[int, int]], *, timeout: float | None = None
    ) -> list[bytes | Exception]:
        """Several memory reads through the stub's `m` in one write, each cut into `MAX_MEMORY_READ` pieces
        (the one chunked memory reader of probed/); a refused read comes back as its exception."""
        packets: list[bytes] = []
        spans: list[tuple[int, int]] = []
        for address, length in requests:
            first = len(packets)
            for a in range(address, address + max(length, 0), MAX_MEMORY_READ):
                packets.append(read_memory(a, min(MAX_MEMORY_READ, address + length - a)))
            spans.append((first, len(packets)))
        replies = await self.client.pipeline(packets, timeout=timeout) if packets else []
        out: list[bytes | Exception] = []
        for first, end in spans:
            try:
                data = bytearray()
                for i in range(first, end):
                    data += parse_hex_data(replies[i], packets[i])
                out.append(bytes(data))
            except RSPError as exc:
                if isinstance(exc, RemoteError):
                    exc = RemoteError(exc.code, exc.text, exc.request)
                out.append(exc)
        return out

    def symbolize(self, address: int) -> str | None:
        return self.symbols.symbolize(address)

    def pc_of(self, g_payload: bytes) -> int:
        value = self.layout.value(g_payload, self.arch.pc)
        if value is None:
            raise TargetError("the target did not report the program counter")
        return value

    def step_packet(self, thread: ThreadId | None) -> bytes:
        """Single-step only the CPU that stopped: `vCont;s:TID` leaves the other vCPUs stopped."""
        if thread is None or not self.vcont_step or len(self.threads) <= 1:
            return step()
        return vcont([VContAction("s", thread)])


async def attach_target(
    address: str, symbols: SymbolStore, *, timeout: float, target: Target | None = None, **memory_options
) -> Target:
    """Connect to the target at `address` and learn it; the connection is closed if this fails.

    Reconnecting passes the `Target` it had: it is kept (with the new client), so whatever holds it (a guest
    model's memory reader, say) goes on with the new connection. `memory_options` are `Target`'s.

    Raises:
        TargetError: nothing answers there, or it cannot be attached.
    """
    try:
        client = await RSPClient.connect(address, timeout=timeout)
    except ConnectionClosed as exc:
        raise TargetError(str(exc)) from exc
    if target is None:
        target = Target(client, symbols, **memory_options)
    target.client = client
    if target.memory is not None:  # reconnecting: the old QEMU's memory (maybe a dead process's)
        target.memory.close()
        target.memory = None
    try:
        try:
            await target.attach()
        except TargetTimeout as exc:
            raise TargetError(
                f"cannot attach to {address}: it does not answer ({exc}); "
                "QEMU serves one debugger at a time: is another one attached?"
            ) from exc
        except RSPError as exc:
            raise TargetError(f"cannot attach to {address}: {exc}") from exc
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await client.aclose()
        raise
    return target
