"""The target as the engine sees it: one RSP connection plus what was learnt when attaching.

Attaching reads QEMU's target description (and what it includes), builds the register layout and picks the
arch. QEMU answers `p`/`P` only after a debugger has read `target.xml` (it sets `gdb_has_xml` then), so the
description is read first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from probed.errors import TargetError
from probed.guest.symbols import SymbolStore
from rsp.arch import Arch, arch_for
from rsp.connection import MAX_MEMORY_READ, RSPClient, raise_for_reply
from rsp.errors import RemoteError, RSPError
from rsp.registers import RegisterLayout
from rsp.stop import StopReply, ThreadId, parse_stop_reply, parse_thread_id
from rsp.tdesc import TargetDescription, includes_of, parse_target_description

__all__ = ["Target"]

log = logging.getLogger(__name__)

CLIENT_FEATURES = b"qSupported:swbreak+;hwbreak+;vContSupported+;xmlRegisters=i386"


class Target:
    """The attached target: connection, register layout, arch, threads and symbols."""

    def __init__(self, client: RSPClient, symbols: SymbolStore):
        self.client = client
        self.symbols = symbols
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
        for item in reply.decode().split(";"):
            if item.endswith(("+", "-")):
                self.features[item[:-1]] = item.endswith("+")
            elif "=" in item:
                k, _, v = item.partition("=")
                self.features[k] = v
        if self.features.get("qXfer:features:read") is not True:
            raise TargetError("the target does not offer its target description (qXfer:features:read)")
        await self._read_description()
        vcont = await self.client.request(b"vCont?")
        self.vcont_step = b";s" in vcont
        stop = await self.client.request(b"?")
        self.client.pending_stops.clear()  # the T02 QEMU sends when we connect to a running guest
        await self.refresh_threads()
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
        reply = await self.client.request(b"qfThreadInfo")
        while reply.startswith(b"m"):
            threads += [parse_thread_id(t) for t in reply[1:].split(b",") if t]
            reply = await self.client.request(b"qsThreadInfo")
        self.threads = threads or [ThreadId(1)]
        return self.threads

    # -- reads --------------------------------------------------------------------------------------

    async def read_g(self) -> bytes:
        """The register block of the current thread (the one that stopped)."""
        reply = await self.client.request(b"g")
        raise_for_reply(b"g", reply)
        return reply

    async def read_many(self, requests: Sequence[tuple[int, int]]) -> list[bytes | Exception]:
        """Several memory reads in one write; a refused read comes back as its exception."""
        packets: list[bytes] = []
        spans: list[tuple[int, int]] = []
        for address, length in requests:
            first = len(packets)
            for a in range(address, address + max(length, 0), MAX_MEMORY_READ):
                packets.append(b"m%x,%x" % (a, min(MAX_MEMORY_READ, address + length - a)))
            spans.append((first, len(packets)))
        replies = await self.client.pipeline(packets) if packets else []
        out: list[bytes | Exception] = []
        for first, end in spans:
            try:
                data = bytearray()
                for i in range(first, end):
                    raise_for_reply(packets[i], replies[i])
                    data += bytes.fromhex(replies[i].decode("ascii"))
                out.append(bytes(data))
            except (RSPError, ValueError) as exc:
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
            return b"s"
        return b"vCont;s:" + thread.encode()
