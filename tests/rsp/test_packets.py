"""Client-side packets and qSupported: exact bytes of every builder, every reply parser, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rsp import packets
from rsp.errors import LocalProtocolError, RemoteError, RemoteProtocolError, UnsupportedPacket
from rsp.features import (
    QUERIED,
    Features,
    build_qsupported,
    build_qsupported_reply,
    parse_qsupported_reply,
    parse_qsupported_request,
)
from rsp.packets import BreakpointType, VContAction
from rsp.stop import ThreadId

BUILDERS = [
    (packets.read_registers(), b"g"),
    (packets.write_registers(b"0011aabb"), b"G0011aabb"),
    (packets.write_registers("ff"), b"Gff"),
    (packets.read_register(8), b"p8"),
    (packets.read_register(0x1F), b"p1f"),
    (packets.write_register(8, b"78563412"), b"P8=78563412"),
    (packets.read_memory(0x1040B0, 4), b"m1040b0,4"),
    (packets.write_memory(0x1000, b"\x90\xcc"), b"M1000,2:90cc"),
    (packets.write_memory(0x1000, b""), b"M1000,0:"),
    (packets.write_memory_binary(0x1000, b"#$}*"), b"X1000,4:#$}*"),
    (packets.insert_breakpoint(BreakpointType.SOFTWARE, 0x100000, 1), b"Z0,100000,1"),
    (packets.insert_breakpoint(BreakpointType.HARDWARE, 0xC0DE, 1), b"Z1,c0de,1"),
    (packets.insert_breakpoint(BreakpointType.WRITE, 0x1040B0, 4), b"Z2,1040b0,4"),
    (packets.insert_breakpoint(BreakpointType.READ, 0x10, 8), b"Z3,10,8"),
    (packets.insert_breakpoint(4, 0x10, 2), b"Z4,10,2"),
    (packets.remove_breakpoint(BreakpointType.ACCESS, 0x10, 2), b"z4,10,2"),
    (packets.remove_breakpoint(BreakpointType.SOFTWARE, 0xFFFFFFFF81000000, 1), b"z0,ffffffff81000000,1"),
    (packets.cont(), b"c"),
    (packets.cont(0x7C00), b"c7c00"),
    (packets.step(), b"s"),
    (packets.step(0x7C00), b"s7c00"),
    (packets.cont_signal(5), b"C05"),
    (packets.cont_signal(0x0B, 0x10), b"C0b;10"),
    (packets.step_signal(2), b"S02"),
    (packets.step_signal(2, 0x10), b"S02;10"),
    (packets.vcont_query(), b"vCont?"),
    (packets.vcont([VContAction("c")]), b"vCont;c"),
    (packets.vcont([VContAction("s", ThreadId(1)), VContAction("c")]), b"vCont;s:01;c"),
    (packets.vcont([VContAction("C", ThreadId(2, 1), signal=5)]), b"vCont;C05:p1.2"),
    (packets.vcont([VContAction("S", ThreadId(-1), signal=0x13)]), b"vCont;S13:-1"),
    (packets.vcont([VContAction("t", ThreadId(3))]), b"vCont;t:03"),
    (packets.vcont([VContAction("r", ThreadId(1), start=0x1000, end=0x1010)]), b"vCont;r1000,1010:01"),
    (packets.xfer_read("features", "target.xml", 0, 0xFFB), b"qXfer:features:read:target.xml:0,ffb"),
    (packets.xfer_read("features", "i386-32bit.xml", 0xFFB, 0xFFB), b"qXfer:features:read:i386-32bit.xml:ffb,ffb"),
    (packets.monitor("info registers"), b"qRcmd,696e666f20726567697374657273"),
    (packets.detach(), b"D"),
    (packets.detach(1), b"D;1"),
    (packets.kill(), b"k"),
    (packets.set_thread("g", ThreadId(1)), b"Hg01"),
    (packets.set_thread("c", ThreadId(-1)), b"Hc-1"),
    (packets.set_thread("g", ThreadId(2, 1)), b"Hgp1.2"),
    (packets.set_thread("c", ThreadId(0)), b"Hc00"),
    (packets.thread_info_first(), b"qfThreadInfo"),
    (packets.thread_info_next(), b"qsThreadInfo"),
    (packets.thread_alive(ThreadId(2)), b"T02"),
    (packets.current_thread(), b"qC"),
    (packets.attached(), b"qAttached"),
    (packets.attached(1), b"qAttached:1"),
    (packets.halt_reason(), b"?"),
    (packets.start_no_ack(), b"QStartNoAckMode"),
]


@pytest.mark.parametrize(("built", "wire"), BUILDERS)
def test_builder_bytes(built, wire):
    assert built == wire


@pytest.mark.parametrize(
    "build",
    [
        lambda: packets.write_registers(b"0g"),
        lambda: packets.write_registers(b"012"),
        lambda: packets.write_register(1, "zz"),
        lambda: packets.read_register(-1),
        lambda: packets.read_memory(-1, 4),
        lambda: packets.read_memory(0, -4),
        lambda: packets.write_memory(-2, b"x"),
        lambda: packets.insert_breakpoint(0, -1, 1),
        lambda: packets.cont(-1),
        lambda: packets.cont_signal(256),
        lambda: packets.step_signal(-1),
        lambda: packets.vcont([]),
        lambda: packets.set_thread("x", ThreadId(1)),
        lambda: VContAction("q"),
        lambda: VContAction("C"),
        lambda: VContAction("c", signal=5),
        lambda: VContAction("S", signal=300),
        lambda: VContAction("r", start=1),
        lambda: VContAction("s", start=1, end=2),
    ],
)
def test_builders_refuse_what_cannot_be_sent(build):
    with pytest.raises(LocalProtocolError):
        build()


def test_breakpoint_type_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match="5"):
        packets.insert_breakpoint(5, 0x10, 1)


# -- errors and OK -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code", "text"),
    [(b"E01", 1, None), (b"E16", 0x16, None), (b"Eff", 0xFF, None), (b"E.no such address", None, "no such address")],
)
def test_error_replies(reply, code, text):
    error = packets.parse_error(reply)
    assert (error.code, error.text) == (code, text)
    with pytest.raises(RemoteError) as info:
        packets.check_ok(reply, b"Z0,10,1")
    assert (info.value.code, info.value.text, info.value.request) == (code, text, b"Z0,10,1")


@pytest.mark.parametrize("reply", [b"OK", b"", b"E", b"E1", b"E012", b"e01", b"Ezz", b"0E01", b"1234"])
def test_not_error_replies(reply):
    assert packets.parse_error(reply) is None


def test_check_ok():
    assert packets.check_ok(b"OK", b"M10,1:00") is None
    with pytest.raises(UnsupportedPacket) as info:
        packets.check_ok(b"", b"X10,0:")
    assert info.value.request == b"X10,0:"
    with pytest.raises(RemoteProtocolError):
        packets.check_ok(b"1", b"M10,1:00")


# -- hex data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "data"),
    [
        (b"", None),
        (b"90cc", b"\x90\xcc"),
        (b"78563412", b"\x78\x56\x34\x12"),
        (b"ABCDEF", b"\xab\xcd\xef"),
        (b"e5", b"\xe5"),
        (b"E5e5", b"\xe5\xe5"),  # 4 chars: data, not an error
        (b"E012", b"\xe0\x12"),
        (b"00xxxx11", b"\x00\x00\x00\x11"),  # QEMU's "unavailable" register bytes read as 0
    ],
)
def test_parse_hex_data(reply, data):
    if data is None:
        with pytest.raises(UnsupportedPacket):
            packets.parse_hex_data(reply, b"g")
    else:
        assert packets.parse_hex_data(reply) == data


def test_hex_data_of_one_byte_that_reads_like_an_error_is_an_error():
    # The rule of the module docstring: exactly `E` and two hex digits is an error.
    with pytest.raises(RemoteError) as info:
        packets.parse_hex_data(b"E14", b"m0,1")
    assert info.value.code == 0x14


@pytest.mark.parametrize("reply", [b"0", b"zz", b"12 4", b"0x12"])
def test_bad_hex_data(reply):
    with pytest.raises(RemoteProtocolError):
        packets.parse_hex_data(reply)


# -- qXfer, threads, vCont, monitor ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "chunk"),
    [
        (b"m<?xml", (b"<?xml", False)),
        (b"l</target>\n", (b"</target>\n", True)),
        (b"l", (b"", True)),
        (b"m#$}*\x00\xff", (b"#$}*\x00\xff", False)),
    ],
)
def test_parse_xfer_chunk(reply, chunk):
    assert packets.parse_xfer_chunk(reply) == chunk


def test_parse_xfer_chunk_errors():
    with pytest.raises(RemoteError):
        packets.parse_xfer_chunk(b"E00")
    with pytest.raises(UnsupportedPacket):
        packets.parse_xfer_chunk(b"", b"qXfer:features:read:target.xml:0,ffb")
    with pytest.raises(RemoteProtocolError):
        packets.parse_xfer_chunk(b"x<?xml")


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        (b"m01", ([ThreadId(1)], False)),
        (b"m01,02,03,04", ([ThreadId(1), ThreadId(2), ThreadId(3), ThreadId(4)], False)),
        (b"mp1.1,p1.2", ([ThreadId(1, 1), ThreadId(2, 1)], False)),
        (b"l", ([], True)),
    ],
)
def test_parse_thread_list(reply, parsed):
    assert packets.parse_thread_list(reply) == parsed


@pytest.mark.parametrize(("reply", "error"), [(b"m", RemoteProtocolError), (b"x01", RemoteProtocolError),
                                              (b"m01,zz", RemoteProtocolError), (b"E01", RemoteError),
                                              (b"", UnsupportedPacket)])
def test_parse_thread_list_errors(reply, error):
    with pytest.raises(error):
        packets.parse_thread_list(reply)


def test_parse_current_thread():
    assert packets.parse_current_thread(b"QC01") == ThreadId(1)
    assert packets.parse_current_thread(b"QCp1.2") == ThreadId(2, 1)
    for bad in (b"QC", b"01", b"QCzz"):
        with pytest.raises(RemoteProtocolError):
            packets.parse_current_thread(bad)


def test_parse_vcont_actions():
    assert packets.parse_vcont_actions(b"vCont;c;C;s;S") == {"c", "C", "s", "S"}
    assert packets.parse_vcont_actions(b"vCont;c;C;s;S;t;r") == {"c", "C", "s", "S", "t", "r"}
    assert packets.parse_vcont_actions(b"vCont") == set()
    with pytest.raises(UnsupportedPacket):
        packets.parse_vcont_actions(b"")
    with pytest.raises(RemoteProtocolError):
        packets.parse_vcont_actions(b"OK")


@pytest.mark.parametrize(
    ("packet", "text"),
    [
        (b"O48656c6c6f0a", b"Hello\n"),
        (b"O", b""),
        (b"OK", None),
        (b"O4", None),
        (b"Ozz", None),
        (b"T05", None),
        (b"", None),
    ],
)
def test_parse_monitor_output(packet, text):
    assert packets.parse_monitor_output(packet) == text


@given(st.text(max_size=80))
def test_monitor_command_hex_round_trips(command):
    payload = packets.monitor(command)
    assert bytes.fromhex(payload[len(b"qRcmd,") :].decode()).decode() == command
    assert packets.parse_monitor_output(b"O" + payload[len(b"qRcmd,") :]) == command.encode()


# -- qSupported ------------------------------------------------------------------------------------------

FEATURE_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9:._+?-]{0,20}", fullmatch=True)
FEATURE_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=";"),
                       max_size=12)


def test_build_qsupported_bytes():
    request = {"multiprocess": True, "swbreak": True, "hwbreak": True, "qRelocInsn": False,
               "xmlRegisters": "i386", "vContSupported": QUERIED}
    wire = b"qSupported:multiprocess+;swbreak+;hwbreak+;qRelocInsn-;xmlRegisters=i386;vContSupported?"
    assert build_qsupported(request) == wire
    assert parse_qsupported_request(wire) == request
    assert build_qsupported({}) == b"qSupported"
    assert parse_qsupported_request(b"qSupported") == {}


def test_qemu_qsupported_reply():
    # What QEMU 7.2 answers (seen here).
    features = parse_qsupported_reply(b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+")
    assert isinstance(features, Features)
    assert dict(features) == {"PacketSize": "1000", "qXfer:features:read": True, "vContSupported": True,
                              "multiprocess": True}
    assert features.packet_size == 0x1000
    assert features.supports("qXfer:features:read")
    assert not features.supports("swbreak")


def test_qsupported_reply_edge_cases():
    assert parse_qsupported_reply(b"") == {}
    assert parse_qsupported_reply(b"").packet_size is None
    assert parse_qsupported_reply(b"swbreak-").supports("swbreak") is False
    with pytest.raises(RemoteProtocolError):
        parse_qsupported_reply(b"PacketSize=zz").packet_size  # noqa: B018
    with pytest.raises(RemoteProtocolError):
        parse_qsupported_reply(b"vContSupported?")  # `?` is for requests
    with pytest.raises(RemoteProtocolError):
        parse_qsupported_reply(b"multiprocess")
    with pytest.raises(RemoteError):
        parse_qsupported_reply(b"E01")
    with pytest.raises(RemoteProtocolError):
        parse_qsupported_request(b"qSupportedX")
    with pytest.raises(LocalProtocolError):
        build_qsupported_reply({"vContSupported": QUERIED})
    with pytest.raises(LocalProtocolError):
        build_qsupported({"a;b": True})
    with pytest.raises(LocalProtocolError):
        build_qsupported({"a": "x;y"})
    for bad in (b"qSupported:=1", b"qSupported:+", b"qSupported:a}b+", b"qSupported:\xff+"):
        with pytest.raises(RemoteProtocolError):
            parse_qsupported_request(bad)


@given(st.dictionaries(FEATURE_NAME, st.one_of(st.booleans(), FEATURE_TEXT, st.just(QUERIED)), max_size=8))
def test_qsupported_request_round_trips(features):
    assert parse_qsupported_request(build_qsupported(features)) == features


@given(st.dictionaries(FEATURE_NAME, st.one_of(st.booleans(), FEATURE_TEXT), max_size=8))
def test_qsupported_reply_round_trips(features):
    assert parse_qsupported_reply(build_qsupported_reply(features)) == features


def test_one_map_of_hook_kinds_to_z_types():
    assert {key: int(t) for key, t in packets.Z_TYPES.items()} == {
        ("break", "x"): 0, ("hbreak", "x"): 1, ("watch", "w"): 2, ("watch", "r"): 3, ("watch", "rw"): 4}
    assert all(packets.Z_KEYS[t] == key for key, t in packets.Z_TYPES.items())
    assert [t.access for t in BreakpointType] == ["x", "x", "w", "r", "rw"]
    assert [t.is_watch for t in BreakpointType] == [False, False, True, True, True]
    assert packets.insert_breakpoint(packets.Z_TYPES[("watch", "rw")], 0x10, 4) == b"Z4,10,4"


def test_is_hex_takes_hex_digits_only():
    from rsp.framing import is_hex

    assert is_hex(b"0123456789abcdefABCDEF")
    for text in (b"", b"0x1", b"1_0", b" 1", b"+1", b"-1", b"g"):
        assert not is_hex(text)
