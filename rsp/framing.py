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
from zlib import adler32

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
    "is_hex",
]

ACK = b"+"
NACK = b"-"
INTERRUPT = b"\x03"

_ESCAPE = 0x7D  # '}'
_RLE = 0x2A  # '*'
_NEEDS_ESCAPE = re.compile(rb"[#$}*]")
MAX_PACKET = 1 << 20
"""Bytes a packet may span by default before it is dropped as garbage (QEMU's PacketSize is 4 KiB)."""
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_EVENT_START = re.compile(rb"[$%+\-\x03]")


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


def is_hex(text: bytes) -> bool:
    """Whether `text` is one or more hex digits and nothing else (no sign, space, `_` or `0x`)."""
    return bool(text) and not text.translate(None, _HEX_DIGITS)


_SUM_CHUNK = 256


def checksum(data: bytes) -> int:
    """The RSP checksum: the sum of the bytes modulo 256.

    Summed by zlib's Adler-32, 256 bytes at a time: its low half is 1 + the bytes' sum modulo 65521, and 256
    bytes sum to at most 65280, so each part is exact (four times faster than `sum` on a `g` reply).
    """
    if len(data) <= _SUM_CHUNK:
        return (adler32(data) - 1) & 0xFF
    view = memoryview(data)
    total = 0
    for at in range(0, len(data), _SUM_CHUNK):
        total += (adler32(view[at : at + _SUM_CHUNK]) & 0xFFFF) - 1
    return total & 0xFF


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


_WHOLE_MAX = 64
"""Packets up to this long (on the wire) that come whole are remembered by their bytes (`Framer`)."""
_WHOLE_KEPT = 32
"""At most this many of them."""


class Framer:
    """Turns a byte stream into RSP events, in time linear in the bytes received.

    A packet whose `#` has not come yet is not scanned again from its start when more bytes arrive; a `$`
    before the `#` starts a new packet (a `$` is never part of a packet's text: binary data escapes it),
    what came before it is garbage. A packet may span `max_packet` bytes; a longer one is dropped whole,
    up to its `#` and checksum, as garbage.

    Attributes:
        garbage: how many bytes were skipped because they were not part of any event.
        oversized: how many packets were dropped for being longer than `max_packet`.
    """

    def __init__(self, *, max_packet: int = MAX_PACKET) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of the packet at the head of `_buf` known to hold no `#`
        self._dropping = False  # skipping the rest of an oversized packet, up to its `#`
        self.max_packet = max_packet
        self.garbage = 0
        self.oversized = 0
        # Small packets that came whole, by their bytes on the wire: the same bytes again (a stop reply, an
        # `OK`) are that event again, without scanning and checking them anew (the hot path of a hit).
        self._whole: dict[bytes, Event] = {}
        self._ready: Event | None = None  # such an event, due before anything in `_buf`

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer (b"" at EOF is accepted and changes nothing)."""
        if not self._buf and self._ready is None and not self._dropping and type(data) is bytes:
            ready = self._whole.get(data)
            if ready is not None:
                self._ready = ready
                return
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or NEED_DATA."""
        ready = self._ready
        if ready is not None:
            self._ready = None
            return ready
        buf = self._buf
        while buf:
            if self._dropping:
                end = buf.find(b"#")
                if end < 0:
                    self.garbage += len(buf)
                    buf.clear()
                    return NEED_DATA
                self._dropping = False
                self.garbage += end + 1
                del buf[: end + 1]  # the checksum digits after it are skipped as garbage below
                continue
            first = buf[0]
            if first == 0x24 or first == 0x25:  # '$' or '%'
                start = self._scanned or 1
                end = buf.find(b"#", start)
                # A later `$` (before the `#`, or anywhere if none came) starts the packet that counts.
                restart = buf.rfind(b"$", start, len(buf) if end < 0 else end)
                if restart > 0:
                    self.garbage += restart
                    del buf[:restart]
                    end = -1 if end < 0 else end - restart
                if end < 0:
                    if len(buf) > self.max_packet:
                        self.oversized += 1
                        self.garbage += len(buf)
                        buf.clear()
                        self._scanned = 0
                        self._dropping = True
                        return NEED_DATA
                    self._scanned = len(buf)
                    return NEED_DATA
                self._scanned = end  # the `#` is found: only the checksum may still be missing
                if len(buf) < end + 3:
                    return NEED_DATA
                self._scanned = 0
                if end > self.max_packet:
                    self.oversized += 1
                    self.garbage += end + 3
                    del buf[: end + 3]
                    continue
                whole = bytes(buf) if len(buf) == end + 3 and end < _WHOLE_MAX else None
                event = self._take_packet(end, notification=first == 0x25)
                if whole is not None and type(event) is Packet:
                    if len(self._whole) >= _WHOLE_KEPT:
                        self._whole.clear()
                    self._whole[whole] = event
                return event
            if first == 0x2B:
                del buf[0]
                return _ACK_EVENT
            if first == 0x2D:
                del buf[0]
                return _NACK_EVENT
            if first == 0x03:
                del buf[0]
                return _INTERRUPT_EVENT
            # Garbage: skip the whole run up to the next byte that can start an event.
            m = _EVENT_START.search(buf)
            skip = len(buf) if m is None else m.start()
            self.garbage += skip
            del buf[:skip]
        return NEED_DATA

    def _take_packet(self, end: int, notification: bool) -> Event:
        buf = self._buf
        raw = bytes(buf[1:end])
        cs_text = bytes(buf[end + 1 : end + 3])
        del buf[: end + 3]
        expected = checksum(raw)
        if len(cs_text) != 2 or not is_hex(cs_text):
            return BadChecksum(raw, expected, None)
        received = int(cs_text, 16)
        if received != expected:
            return BadChecksum(raw, expected, received)
        try:
            payload = decode_payload(raw)
        except ValueError:
            return BadChecksum(raw, expected, received)
        return Notification(payload) if notification else Packet(payload)
