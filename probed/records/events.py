"""Hit records and their fan-out: a ring buffer of recent records and bounded subscriptions.

A slow reader never stalls the guest: each subscription has a bounded buffer, and a record that does not
fit is dropped for that subscriber and counted (`Subscription.missed`, and the probe's `missed`, as kprobes
counts `nmissed`).

Both are bounded in bytes as well as in records, the bytes being those of each record's JSON: the ring keeps
records encoded (so its memory is close to its byte count) and drops the oldest to make room; a
subscription drops the new record when it would go over its bytes (it always takes one record when empty,
so a record larger than its bound still reaches a reader that keeps up).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

__all__ = ["BUFFER_BYTES", "EventHub", "HitRecord", "RECORD_KINDS", "SUBSCRIPTION_BYTES", "Subscription", "encode_record"]

BUFFER_BYTES = 64 << 20
"""The ring buffer's default bound, in bytes of JSON."""
SUBSCRIPTION_BYTES = 16 << 20
"""A subscription's default bound, in bytes of JSON."""

RECORD_KINDS = ("break", "watch", "return", "user")
"""What hit: a breakpoint probe, a watchpoint, a function's return (return probes), a user-space probe."""


@dataclass
class HitRecord:
    """One probe's record of one hit, created at the hit: its `seq` and `time_ns` are taken then.

    Taking them at the hit (not when the record is published) keeps `seq` unique and in hit order even when
    a hit is published late, e.g. parked while GDB holds the guest at the same place.

    `extra` holds the fields of a kind beyond the common ones (a watch's `access`, `addr`, `old`, `new`,
    `value`; a return's `func`, `duration_ns`...), in the order they appear in the published record.
    """

    probe: int
    name: str
    kind: str
    seq: int
    stop: int
    cpu: int
    pc: int | None
    where: str | None
    time_ns: int = field(default_factory=time.time_ns)
    pre: Any = None
    post: Any = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"a hit record's kind is one of {', '.join(RECORD_KINDS)}, not {self.kind!r}")

    def add_error(self, error: str | None) -> None:
        if error:
            self.error = f"{self.error}; {error}" if self.error else error

    def as_dict(self) -> dict[str, Any]:
        """The record as published (one JSON object; see docs/records.md)."""
        record: dict[str, Any] = {
            "probe": self.probe,
            "name": self.name,
            "kind": self.kind,
            "seq": self.seq,
            "stop": self.stop,
            "time_ns": self.time_ns,
            "cpu": self.cpu,
        }
        record.update(self.extra)
        record["pc"] = f"{self.pc:#x}" if self.pc is not None else None
        record["where"] = self.where
        record["pre"] = self.pre
        record["post"] = self.post
        record["error"] = self.error
        return record


_ENCODER = json.JSONEncoder(separators=(", ", ": "), default=repr)  # (made once: `json.dumps` with options makes one a call)


def encode_record(record: dict[str, Any]) -> str:
    """One hit record as a line of JSON (no newline)."""
    return _ENCODER.encode(record)


class Subscription:
    """A bounded stream of records for one reader; iterate it with `async for`.

    Attributes:
        probe: the probe id it follows, or None for all.
        missed: records dropped because the reader was behind.
        maxsize: how many records it holds at most.
        max_bytes: how many bytes of JSON it holds at most.
        queued_bytes: bytes of JSON held now.
    """

    def __init__(self, hub: EventHub, probe: int | None, maxsize: int, max_bytes: int = SUBSCRIPTION_BYTES):
        self._hub = hub
        self.probe = probe
        self.missed = 0
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._queued = 0
        # Unbounded channel: the bounds are kept here, in records and in bytes.
        self._send, self._receive = trio.open_memory_channel[tuple[dict[str, Any], int]](float("inf"))

    def _offer(self, record: dict[str, Any], size: int, line: str | None = None) -> bool:
        if self._queued >= self.maxsize or (self._queued and self.queued_bytes + size > self.max_bytes):
            self.missed += 1
            return False
        try:
            # The JSON text made once at publish travels along: writers of lines do not encode again.
            self._send.send_nowait((record, size, line))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        self._queued += 1
        self.queued_bytes += size
        return True

    def _taken(self, item: tuple[dict[str, Any], int, str | None]) -> dict[str, Any]:
        record, size, _line = item
        self._queued -= 1
        self.queued_bytes -= size
        return record

    async def receive(self) -> dict[str, Any]:
        """The next record (waits for one)."""
        return self._taken(await self._receive.receive())

    def receive_nowait(self) -> dict[str, Any]:
        """The next record if one is buffered; raises trio.WouldBlock otherwise."""
        return self._taken(self._receive.receive_nowait())

    def receive_line_nowait(self) -> str:
        """The next record as its JSON line (no newline), if one is buffered; raises trio.WouldBlock otherwise."""
        item = self._receive.receive_nowait()
        self._taken(item)
        return item[2] if item[2] is not None else encode_record(item[0])

    async def lines(self):
        """The records as their JSON lines (no newline), as they come, until the subscription ends."""
        async for item in self._receive:
            self._taken(item)
            yield item[2] if item[2] is not None else encode_record(item[0])

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return self._taken(await self._receive.receive())
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; the hub forgets this subscription."""
        self._hub._subscriptions.discard(self)
        self._send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Keeps the newest records and hands every new one to each subscription.

    Args:
        buffer: how many records the ring buffer keeps at most.
        on_missed: called with a record's probe id each time a subscriber drops it.
        buffer_bytes: how many bytes of JSON the ring buffer keeps at most.

    Attributes:
        published: records published so far.
        dropped: records that left the ring buffer to make room (still sent to subscribers).
        ring_bytes: bytes of JSON in the ring buffer now.
    """

    def __init__(self, buffer: int = 65536, on_missed: Callable[[int], None] | None = None,
                 buffer_bytes: int = BUFFER_BYTES):
        self._ring: deque[tuple[int, str]] = deque()
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.ring_bytes = 0
        self._subscriptions: set[Subscription] = set()
        self._on_missed = on_missed
        self.published = 0
        self.dropped = 0

    def publish(self, record: dict[str, Any]) -> None:
        """Add a record: into the ring, and to every subscription that wants it."""
        line = encode_record(record)
        size = len(line)
        self.published += 1
        ring = self._ring
        while ring and (len(ring) >= self.buffer or self.ring_bytes + size > self.buffer_bytes):
            self.ring_bytes -= len(ring.popleft()[1])
            self.dropped += 1
        if size <= self.buffer_bytes and self.buffer > 0:
            ring.append((record["probe"], line))
            self.ring_bytes += size
        else:
            self.dropped += 1
        for sub in self._subscriptions:
            if sub.probe is not None and sub.probe != record["probe"]:
                continue
            if not sub._offer(record, size, line) and self._on_missed is not None:
                self._on_missed(record["probe"])

    def add_consumer(self, consumer: Any) -> None:
        """Hand every new record to `consumer._offer(record, size, json_line)` as it is published, as a subscription
        gets it, but with no buffer: aggregations (`probed.records.aggregate`) count in the daemon so."""
        self._subscriptions.add(consumer)

    def remove_consumer(self, consumer: Any) -> None:
        """Stop handing records to a consumer."""
        self._subscriptions.discard(consumer)

    def recent_lines(self, probe: int | None = None) -> list[str]:
        """The records still in the ring buffer as their JSON lines, oldest first."""
        return [line for pid, line in self._ring if probe is None or pid == probe]

    def recent(self, probe: int | None = None) -> list[dict[str, Any]]:
        """The records still in the ring buffer, oldest first (decoded from their JSON)."""
        return [json.loads(line) for pid, line in self._ring if probe is None or pid == probe]

    def subscribe(self, probe: int | None = None, maxsize: int = 1024, max_bytes: int = SUBSCRIPTION_BYTES) -> Subscription:
        """A new subscription to records published from now on (at most `maxsize` records and `max_bytes`
        bytes of JSON waiting for its reader)."""
        sub = Subscription(self, probe, maxsize, max_bytes)
        self._subscriptions.add(sub)
        return sub

    def follow(
        self, probe: int | None = None, maxsize: int = 1024, max_bytes: int = SUBSCRIPTION_BYTES
    ) -> tuple[Subscription, list[str]]:
        """A subscription and the ring's records so far as their JSON lines, taken together: a record is in
        exactly one (for writers of lines: nothing decoded or encoded again)."""
        sub = self.subscribe(probe, maxsize, max_bytes)
        return sub, self.recent_lines(probe)

    def stats(self) -> dict[str, int]:
        """The ring buffer's fill and bounds, for `probectl stats`."""
        return {"records": len(self._ring), "bytes": self.ring_bytes, "max_bytes": self.buffer_bytes,
                "dropped": self.dropped}

    def close(self) -> None:
        """End every subscription (readers see the end of their stream)."""
        for sub in list(self._subscriptions):
            sub.close()
