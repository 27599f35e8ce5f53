"""Stop replies, parsed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsp.errors import RemoteProtocolError
from rsp.stop import (
    ConsoleOutput,
    Exited,
    StopReply,
    Terminated,
    ThreadId,
    encode_stop_reply,
    parse_stop_reply,
    parse_thread_id,
)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"S05", StopReply(5)),
        (b"T05thread:01;", StopReply(5, ThreadId(1))),
        (b"T02thread:p1.2;core:1;", StopReply(2, ThreadId(2, 1), core=1)),
        (b"T05thread:01;watch:001040b0;", StopReply(5, ThreadId(1), reason="watch", watch_address=0x1040B0)),
        (b"T05rwatch:10;", StopReply(5, reason="rwatch", watch_address=0x10)),
        (b"T05awatch:ff;thread:02;", StopReply(5, ThreadId(2), reason="awatch", watch_address=0xFF)),
        (b"T05swbreak:;", StopReply(5, reason="swbreak")),
        (b"T05hwbreak:;", StopReply(5, reason="hwbreak")),
        (b"T0508:78563412;thread:01;", StopReply(5, ThreadId(1), registers={8: b"78563412"})),
        (b"T05unknownthing:1;", StopReply(5)),
        (b"T05thread:p1.2;core:1;", StopReply(5, ThreadId(2, 1), core=1)),
        (b"T05thread:01;swbreak:;", StopReply(5, ThreadId(1), reason="swbreak")),
        (b"T05thread:01;rwatch:1040b0;", StopReply(5, ThreadId(1), reason="rwatch", watch_address=0x1040B0)),
        (b"W00", Exited(0)),
        (b"W01;process:2", Exited(1, 2)),
        (b"X09;process:1", Terminated(9, 1)),
        (b"X09;process:1f", Terminated(9, 0x1F)),
        (b"O48656c6c6f", ConsoleOutput(b"Hello")),
    ],
)
def test_parse(payload, expected):
    assert parse_stop_reply(payload) == expected


@pytest.mark.parametrize(
    "payload", [b"", b"Q", b"OK", b"Tzz", b"T05thread:zz;", b"T05core:x;", b"T05watch:;", b"W", b"X09;process:zz", b"Ozz"]
)
def test_garbage_is_a_typed_error(payload):
    with pytest.raises(RemoteProtocolError):
        parse_stop_reply(payload)


@given(st.integers(1, 0xFFFF), st.one_of(st.none(), st.integers(1, 0xFFFF)))
def test_thread_ids_round_trip(tid, pid):
    thread = ThreadId(tid, pid)
    assert parse_thread_id(thread.encode()) == thread


@given(
    st.integers(0, 255),
    st.one_of(st.none(), st.builds(ThreadId, st.integers(1, 64))),
    st.one_of(st.none(), st.integers(0, 7)),
    st.one_of(
        st.tuples(st.none(), st.none()),
        st.tuples(st.sampled_from(["watch", "rwatch", "awatch"]), st.integers(0, 2**64 - 1)),
        st.tuples(st.sampled_from(["swbreak", "hwbreak"]), st.none()),
    ),
)
def test_stop_replies_round_trip(signal, thread, core, reason):
    event = StopReply(signal, thread, core, reason[0], reason[1])
    assert parse_stop_reply(encode_stop_reply(event)) == event


def test_encoded_bytes():
    assert encode_stop_reply(StopReply(5, ThreadId(1), reason="watch", watch_address=0x1040B0)) == (
        b"T05thread:01;watch:1040b0;"
    )
    assert encode_stop_reply(StopReply(5, registers={8: b"78563412"})) == b"T0508:78563412;"
    assert encode_stop_reply(Terminated(9, 1)) == b"X09;process:1"
    assert encode_stop_reply(ConsoleOutput(b"Hello")) == b"O48656c6c6f"


def test_exit_replies_round_trip():
    for event in (Exited(0), Exited(3, 1), Terminated(9), ConsoleOutput(b"hi\n")):
        assert parse_stop_reply(encode_stop_reply(event)) == event
