"""What GDB sends, parsed on the stub's side: one table drives parsing and re-encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsp.commands import (
    Continue,
    Detach,
    HaltReason,
    InsertBreakpoint,
    Kill,
    Malformed,
    Monitor,
    Query,
    ReadMemory,
    RemoveBreakpoint,
    SetThread,
    StartNoAck,
    Step,
    Unknown,
    VCont,
    VContAction,
    WriteMemory,
    parse_command,
)
from rsp.stop import ThreadId

TABLE = [
    (b"?", HaltReason(b"?")),
    (b"m1000,40", ReadMemory(b"m1000,40", 0x1000, 0x40)),
    (b"M1000,2:abcd", WriteMemory(b"M1000,2:abcd", 0x1000, b"\xab\xcd")),
    (b"Z0,100026,1", InsertBreakpoint(b"Z0,100026,1", 0, 0x100026, 1)),
    (b"z2,1002a0,4", RemoveBreakpoint(b"z2,1002a0,4", 2, 0x1002A0, 4)),
    (b"c", Continue(b"c")),
    (b"c100000", Continue(b"c100000", 0x100000)),
    (b"C05", Continue(b"C05", None, 5)),
    (b"s", Step(b"s")),
    (b"vCont;s:1;c", VCont(b"vCont;s:1;c", (VContAction("s", ThreadId(1)), VContAction("c", None)))),
    (b"Hg0", SetThread(b"Hg0", "g", ThreadId(0))),
    (b"Hc-1", SetThread(b"Hc-1", "c", ThreadId(-1))),
    (b"D", Detach(b"D")),
    (b"D;1", Detach(b"D;1")),
    (b"k", Kill(b"k")),
    (b"vKill;1", Kill(b"vKill;1")),
    (b"QStartNoAckMode", StartNoAck(b"QStartNoAckMode")),
    (b"qRcmd,696e666f", Monitor(b"qRcmd,696e666f", "info")),
    (b"qSupported:multiprocess+;swbreak+", Query(b"qSupported:multiprocess+;swbreak+", "qSupported")),
    (b"qXfer:features:read:target.xml:0,ffb", Query(b"qXfer:features:read:target.xml:0,ffb", "qXfer")),
    (b"g", Unknown(b"g")),
    (b"p8", Unknown(b"p8")),
]


@pytest.mark.parametrize(("payload", "command"), TABLE)
def test_parse_and_encode(payload, command):
    assert parse_command(payload) == command
    assert command.encode() == payload


@pytest.mark.parametrize("payload", [b"mzz,1", b"M10,4:ab", b"Z9,0,1", b"Hx1", b"vCont;q"])
def test_malformed_known_packets(payload):
    assert isinstance(parse_command(payload), Malformed)


def test_vcont_step_thread():
    assert parse_command(b"vCont;s:2;c").stepped_thread() == ThreadId(2)
    assert parse_command(b"vCont;c").steps is False


@given(st.binary(max_size=60))
def test_anything_parses_to_a_command(payload):
    command = parse_command(payload)
    assert command.encode() == payload
