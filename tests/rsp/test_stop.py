"""Stop replies, parsed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsp.errors import RemoteProtocolError
from rsp.stop import ConsoleOutput, Exited, StopReply, Terminated, ThreadId, parse_stop_reply, parse_thread_id


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
        (b"W00", Exited(0)),
        (b"X09;process:1f", Terminated(9, 0x1F)),
        (b"O48656c6c6f", ConsoleOutput(b"Hello")),
    ],
)
def test_parse(payload, expected):
    assert parse_stop_reply(payload) == expected


@pytest.mark.parametrize("payload", [b"", b"Q", b"Tzz", b"T05thread:zz;", b"Ozz"])
def test_garbage_is_a_typed_error(payload):
    with pytest.raises(RemoteProtocolError):
        parse_stop_reply(payload)


@given(st.integers(1, 0xFFFF), st.one_of(st.none(), st.integers(1, 0xFFFF)))
def test_thread_ids_round_trip(tid, pid):
    thread = ThreadId(tid, pid)
    assert parse_thread_id(thread.encode()) == thread
