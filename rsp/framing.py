"""Framing of the GDB remote serial protocol, sans-IO.

Bytes go in with `Framer.receive_data`; typed events come out of `Framer.next_event`. Nothing here opens a
socket or awaits. The wire format, from the GDB manual's "Overview" of the remote protocol:

- A packet is `$payload#cs`, cs the two-hex-digit modulo-256 sum of the payload bytes as sent.
- A notification is `%payload#cs` and is never acknowledged.
- `+` acknowledges a packet, `-` asks for it again; a lone 0x03 byte interrupts a running target.
- `}` escapes the next byte, which is XORed with 0x20; `#`, `$`, `}` and `*` are escaped in binary data.
- `X*n` repeats the previous byte `ord(n) - 29` more times (run-length encoding, in replies).

Garbage between packets is skipped and counted; a checksum mismatch is an event, never an exception, so the
connection above can ask for the packet again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ACK",
    "INTERRUPT",
    "NACK",
    "NEED_DATA",
    "Ack",
    "BadChecksum",
    "Framer",
    "Interrupt",
    "Nack",
    "Notification",
    "Packet",
    "checksum",
    "decode_payload",
    "encode_notification",
    "encode_packet",
    "escape",
]

ACK = b"+"
NACK = b"-"
INTERRUPT = b"\x03"

_ESCAPE = 0x7D  # '}'
_RLE = 0x2A  # '*'
_NEEDS_ESCAPE = re.compile(rb"[#$}*]")
MAX_PACKET = 1 << 20
"""Bytes a packet may span before its `$` is taken for garbage (QEMU's PacketSize is 4 KiB)."""


@dataclass(frozen=True, slots=True)
class Packet:
    """A `$...#cs` packet with a good checksum; `payload` is unescaped and run-length expanded."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Notification:
    """A `%...#cs` notification packet (never acknowledged)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """A `+`: the peer received our last packet."""


@dataclass(frozen=True, slots=True)
class Nack:
    """A `-`: the peer wants our last packet again."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """A 0x03 byte outside a packet: stop the target (sent by a debugger to a stub)."""


@dataclass(frozen=True, slots=True)
class BadChecksum:
    """A packet whose checksum did not match; `received` is None when the checksum was not hex."""

    raw: bytes
    expected: int
    received: int | None


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by `Framer.next_event` when more bytes are needed to make the next event."""

Event = Packet | Notification | Ack | Nack | Interrupt | BadChecksum

_ACK_EVENT = Ack()
_NACK_EVENT = Nack()
_INTERRUPT_EVENT = Interrupt()


def checksum(data: bytes) -> int:
    """The RSP checksum: the sum of the bytes modulo 256."""
    return sum(data) & 0xFF


def escape(payload: bytes) -> bytes:
    """Escape `#`, `$`, `}` and `*` with `}` and XOR 0x20, as binary data must be on the wire."""
    if _NEEDS_ESCAPE.search(payload) is None:
        return payload
    return _NEEDS_ESCAPE.sub(lambda m: bytes((_ESCAPE, m.group()[0] ^ 0x20)), payload)


def encode_packet(payload: bytes) -> bytes:
    """Frame a payload as `$payload#cs`, escaping what must be escaped."""
    body = escape(payload)
    return b"$%s#%02x" % (body, checksum(body))


def encode_notification(payload: bytes) -> bytes:
    """Frame a payload as a `%payload#cs` notification."""
    body = escape(payload)
    return b"%%%s#%02x" % (body, checksum(body))


def decode_payload(raw: bytes) -> bytes:
    """Undo escapes and run-length encoding of a payload as it was on the wire.

    Raises:
        ValueError: a run-length marker with nothing before it, or a dangling escape.
    """
    if b"}" not in raw and b"*" not in raw:
        return raw
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == _ESCAPE:
            if i + 1 >= n:
                raise ValueError("escape at end of payload")
            out.append(raw[i + 1] ^ 0x20)
            i += 2
        elif b == _RLE:
            if not out or i + 1 >= n:
                raise ValueError("run-length marker without a byte to repeat")
            count = raw[i + 1] - 29
            if count < 0:
                raise ValueError("bad run-length count")
            out.extend(out[-1:] * count)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class Framer:
    """Turns a byte stream into RSP events.

    Attributes:
        garbage: how many bytes were skipped because they were not part of any event.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.garbage = 0

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer (b"" at EOF is accepted and changes nothing)."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or NEED_DATA."""
        buf = self._buf
        while buf:
            first = buf[0]
            if first == 0x24 or first == 0x25:  # '$' or '%'
                end = buf.find(b"#", 1)
                if end < 0 and len(buf) > MAX_PACKET:
                    # A `$` whose `#` never came: skip it as garbage rather than buffer forever.
                    del buf[0]
                    self.garbage += 1
                    continue
                if end < 0 or len(buf) < end + 3:
                    return NEED_DATA
                return self._take_packet(end, notification=first == 0x25)
            del buf[0]
            if first == 0x2B:
                return _ACK_EVENT
            if first == 0x2D:
                return _NACK_EVENT
            if first == 0x03:
                return _INTERRUPT_EVENT
            self.garbage += 1
        return NEED_DATA

    def _take_packet(self, end: int, notification: bool) -> Event:
        buf = self._buf
        raw = bytes(buf[1:end])
        cs_text = bytes(buf[end + 1 : end + 3])
        del buf[: end + 3]
        expected = checksum(raw)
        try:
            received = int(cs_text, 16)
        except ValueError:
            return BadChecksum(raw, expected, None)
        if received != expected:
            return BadChecksum(raw, expected, received)
        try:
            payload = decode_payload(raw)
        except ValueError:
            return BadChecksum(raw, expected, received)
        return Notification(payload) if notification else Packet(payload)
