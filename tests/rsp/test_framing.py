"""Framing, sans-IO: one table of (event, wire bytes) drives the parser and the builder tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsp.framing import (
    ACK,
    INTERRUPT,
    NACK,
    NEED_DATA,
    Ack,
    BadChecksum,
    Framer,
    Interrupt,
    Nack,
    Notification,
    Packet,
    checksum,
    decode_payload,
    encode_notification,
    encode_packet,
    escape,
)

TABLE = [
    (Packet(b"g"), b"$g#67"),
    (Packet(b"OK"), b"$OK#9a"),
    (Packet(b""), b"$#00"),
    (Packet(b"T05thread:01;"), b"$T05thread:01;#07"),
    (Packet(b"X#$}*"), b"$X}\x03}\x04}]}\n#" + b"%02x" % checksum(b"X}\x03}\x04}]}\n")),
    (Notification(b"Stop:T05"), b"%Stop:T05#" + b"%02x" % checksum(b"Stop:T05")),
    (Ack(), b"+"),
    (Nack(), b"-"),
    (Interrupt(), b"\x03"),
]


def events(framer: Framer) -> list:
    out = []
    while (ev := framer.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


@pytest.mark.parametrize(("event", "wire"), TABLE)
def test_parse_whole_bytewise_and_with_trailing_data(event, wire):
    whole = Framer()
    whole.receive_data(wire)
    assert events(whole) == [event]

    bytewise = Framer()
    got = []
    for b in wire:
        bytewise.receive_data(bytes([b]))
        got += events(bytewise)
    assert got == [event]

    trailing = Framer()
    trailing.receive_data(wire + b"$O")
    assert events(trailing) == [event]
    assert trailing.buffered == 2


@pytest.mark.parametrize(("event", "wire"), TABLE)
def test_build(event, wire):
    if isinstance(event, Packet | Notification):
        build = encode_packet if isinstance(event, Packet) else encode_notification
        assert build(event.payload) == wire
    else:
        assert {Ack(): ACK, Nack(): NACK, Interrupt(): INTERRUPT}[event] == wire


@pytest.mark.parametrize(("char", "escaped"), [(b"#", b"}\x03"), (b"$", b"}\x04"), (b"}", b"}]"), (b"*", b"}\n")])
def test_each_special_byte_is_escaped(char, escaped):
    assert escape(b"a" + char + b"b") == b"a" + escaped + b"b"
    assert decode_payload(escaped) == char


def test_a_stream_of_mixed_events():
    framer = Framer()
    framer.receive_data(b"+$OK#9a%Stop:T05#" + b"%02x" % checksum(b"Stop:T05") + b"-\x03$#00")
    assert events(framer) == [Ack(), Packet(b"OK"), Notification(b"Stop:T05"), Nack(), Interrupt(), Packet(b"")]
    assert framer.garbage == 0


@pytest.mark.parametrize("raw", [b"}", b"*a", b"a*\x10"])
def test_bad_escapes_and_runs_are_bad_packets(raw):
    with pytest.raises(ValueError):
        decode_payload(raw)
    framer = Framer()
    framer.receive_data(b"$" + raw + b"#%02x" % checksum(raw) + b"$g#67")
    evs = events(framer)
    assert isinstance(evs[0], BadChecksum)
    assert evs[1] == Packet(b"g")


def test_run_length_decoding():
    # "0* " is '0' and 32 - 29 = 3 more: GDB manual's example.
    framer = Framer()
    raw = b"0* "
    framer.receive_data(b"$" + raw + b"#%02x" % checksum(raw))
    assert events(framer) == [Packet(b"0000")]
    assert decode_payload(b"ab*!") == b"ab" + b"b" * 4


def test_garbage_is_skipped_and_counted():
    framer = Framer()
    framer.receive_data(b"xyz$OK#9azz+")
    assert events(framer) == [Packet(b"OK"), Ack()]
    assert framer.garbage == 5


def test_bad_checksum_is_an_event_and_the_stream_goes_on():
    framer = Framer()
    framer.receive_data(b"$OK#00$g#67$OK#zz")
    evs = events(framer)
    assert evs[0] == BadChecksum(b"OK", 0x9A, 0)
    assert evs[1] == Packet(b"g")
    assert evs[2] == BadChecksum(b"OK", 0x9A, None)


@given(st.binary(max_size=300))
def test_any_payload_round_trips(payload):
    framer = Framer()
    framer.receive_data(encode_packet(payload))
    assert events(framer) == [Packet(payload)]


@given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=20))
def test_any_bytes_give_events_never_exceptions_whatever_the_chunking(data, cuts):
    whole = Framer()
    whole.receive_data(data)
    expected = events(whole)
    chunked = Framer()
    got, pos = [], 0
    for cut in cuts + [len(data)]:
        chunked.receive_data(data[pos : pos + cut])
        pos += cut
        got += events(chunked)
    chunked.receive_data(data[pos:])
    got += events(chunked)
    assert got == expected
    assert all(isinstance(e, Packet | Notification | Ack | Nack | Interrupt | BadChecksum) for e in got)


_NOT_SPECIAL = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b"$%#+-\x03"))


@settings(deadline=None)  # no deadline: a loaded machine is not a failure
@given(st.lists(st.tuples(_NOT_SPECIAL, st.binary(max_size=200)), max_size=10), st.lists(st.integers(1, 64), max_size=30))
def test_packets_between_garbage_come_through_whole_whatever_the_chunking(items, cuts):
    wire = b"".join(garbage + encode_packet(payload) for garbage, payload in items)
    framer = Framer()
    got = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        framer.receive_data(wire[pos : pos + cut])
        pos += cut
        while (event := framer.next_event()) is not NEED_DATA:
            got.append(event)
    framer.receive_data(wire[pos:])
    while (event := framer.next_event()) is not NEED_DATA:
        got.append(event)
    assert got == [Packet(payload) for _, payload in items]
    assert framer.garbage == sum(len(garbage) for garbage, _ in items)


def test_a_flood_of_dollars_is_linear_and_keeps_one_byte():
    """Megabytes of `$` with no `#`: each `$` starts a packet over, so only the last is kept (the old framer
    kept them all and scanned them again on every chunk: 2.5 MiB cost the daemon 15 s)."""
    framer = Framer()
    chunk = b"$" * 4096
    for _ in range(2048):  # 8 MiB
        framer.receive_data(chunk)
        assert framer.next_event() is NEED_DATA
        assert framer.buffered == 1
    framer.receive_data(b"qC#b4")
    assert framer.next_event() == Packet(b"qC")
    assert framer.garbage == 8 * 1024 * 1024 - 1


def test_a_packet_longer_than_the_limit_is_dropped_up_to_its_checksum():
    framer = Framer(max_packet=100)
    framer.receive_data(b"$" + b"a" * 150)
    assert framer.next_event() is NEED_DATA and framer.buffered == 0
    framer.receive_data(b"a" * 1000 + b"#00" + encode_packet(b"ok"))
    assert framer.next_event() == Packet(b"ok")
    assert framer.oversized == 1
    # One whose `#` is there already is dropped the same way.
    framer.receive_data(b"$" + b"b" * 200 + b"#00" + encode_packet(b"ok"))
    assert framer.next_event() == Packet(b"ok")
    assert framer.oversized == 2


def test_a_long_packet_arriving_byte_by_byte_comes_whole():
    framer = Framer()
    wire = encode_packet(b"x" * 5000)
    for i in range(len(wire) - 1):
        framer.receive_data(wire[i : i + 1])
        assert framer.next_event() is NEED_DATA
    framer.receive_data(wire[-1:])
    assert framer.next_event() == Packet(b"x" * 5000)


_POOL = [
    encode_packet(b"T05thread:01;"),
    encode_packet(b"OK"),
    encode_packet(b"E14"),
    b"$OK#00",  # a bad checksum: an event each time, never remembered as a good packet
    encode_notification(b"Stop:T05"),
    b"+",
    b"$T05thr",  # half a packet: what follows completes it (or makes it garbage)
    b"junk",
]


@settings(deadline=None)
@given(st.lists(st.sampled_from(range(len(_POOL))), max_size=40), st.lists(st.booleans(), max_size=40))
def test_frames_that_come_again_whole_give_the_same_events_as_one_stream(picks, read_between):
    """Small packets that come whole are remembered by their bytes (the hot path of a stop reply); the
    events are still exactly those of the same bytes read as one stream."""
    chunks = [_POOL[i] for i in picks]
    whole = Framer()
    whole.receive_data(b"".join(chunks))
    expected = events(whole)
    framer = Framer()
    got = []
    for chunk, read in zip(chunks, read_between + [True] * len(chunks), strict=False):
        framer.receive_data(chunk)
        if read:
            got += events(framer)
    got += events(framer)
    assert got == expected
    assert framer.garbage == whole.garbage


def test_a_remembered_stop_reply_comes_again_in_order_with_what_follows_it():
    framer = Framer()
    stop = encode_packet(b"T05thread:01;")
    framer.receive_data(stop)
    assert events(framer) == [Packet(b"T05thread:01;")]
    framer.receive_data(stop)  # the same bytes again: remembered
    framer.receive_data(stop)  # and once more before the first was taken: read as bytes, after it
    framer.receive_data(b"+")
    assert events(framer) == [Packet(b"T05thread:01;"), Packet(b"T05thread:01;"), Ack()]


@given(st.binary(max_size=3000))
def test_the_checksum_is_the_sum_of_the_bytes_modulo_256(data):
    assert checksum(data) == sum(data) % 256
    assert checksum(b"\xff" * 257) == (255 * 257) % 256  # past one Adler-32 part, all at the largest byte
