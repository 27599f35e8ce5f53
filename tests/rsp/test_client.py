"""The client protocol fed bytes by hand (`ClientProtocol`), and the trio client (`RSPClient`) against scripted
peers over memory streams: acks, resends, replies in order, write-behind, stop replies, console output,
errors and disconnects. (The same client against real QEMU: tests/test_connection.py.)"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from rsp.client import ClientProtocol, Closed, DeferredReply, Output, Reply, Resend, Stopped, Stray
from rsp.connection import RSPClient
from rsp.errors import ConnectionClosed, LocalProtocolError, RemoteError, RemoteProtocolError, TargetTimeout
from rsp.framing import NEED_DATA, Framer, Packet, encode_packet
from rsp.stop import StopReply, ThreadId


def events(protocol: ClientProtocol) -> list:
    out = []
    while (event := protocol.next_event()) is not NEED_DATA:
        out.append(event)
        if type(event) is Closed:
            break
    return out


def feed(protocol: ClientProtocol, data: bytes, how: str) -> list:
    """Feed `data` whole or one byte at a time; the events it makes."""
    if how == "whole":
        protocol.receive_data(data)
        return events(protocol)
    out = []
    for i in range(len(data)):
        protocol.receive_data(data[i : i + 1])
        out += events(protocol)
    return out


HOW = pytest.mark.parametrize("how", ["whole", "bytewise"])

# -- pure byte feeding --------------------------------------------------------------------------------------


@HOW
def test_pipelined_replies_in_order_and_the_ack_rides_on_the_next_write(how):
    p = ClientProtocol()
    assert p.send_requests([b"g", b"m10,4"]) == encode_packet(b"g") + encode_packet(b"m10,4")
    got = feed(p, b"++" + encode_packet(b"0102") + encode_packet(b"E14"), how)
    assert got == [Reply(b"g", b"0102"), Reply(b"m10,4", b"E14")]
    assert p.awaiting == 0
    # The two packets received are acknowledged by one `+` in front of the next write.
    assert p.send_requests([b"?"]) == b"+" + encode_packet(b"?")


@HOW
def test_trailing_bytes_wait_for_the_rest(how):
    p = ClientProtocol()
    p.send_requests([b"g", b"g"])
    whole = encode_packet(b"aa") + encode_packet(b"bb")
    assert feed(p, b"+" + whole[:-2], how) == [Reply(b"g", b"aa")]
    assert feed(p, whole[-2:], how) == [Reply(b"g", b"bb")]


def test_a_nack_resends_the_packet_and_its_reply_comes_after_those_written_behind_it():
    p = ClientProtocol()
    p.send_requests([b"m10,4", b"m20,4"])
    # The peer garbled the first packet, handled the second: `-` then `+`, the second's reply, then
    # (after the resend) the first's.
    p.receive_data(b"-")
    (resend,) = events(p)
    assert resend == Resend(encode_packet(b"m10,4"))
    assert p.retransmits == 1
    p.receive_data(b"+" + encode_packet(b"22222222") + b"+" + encode_packet(b"11111111"))
    assert events(p) == [Reply(b"m20,4", b"22222222"), Reply(b"m10,4", b"11111111")]


def test_a_nack_for_nothing_is_ignored():
    p = ClientProtocol()
    p.receive_data(b"-")
    assert events(p) == []
    assert p.retransmits == 0


def test_a_garbled_packet_is_asked_for_again_with_the_ack_owed_in_front():
    p = ClientProtocol()
    p.send_requests([b"g", b"g"])
    p.receive_data(b"+" + encode_packet(b"aa") + b"$bb#00")
    reply, resend = events(p)
    assert reply == Reply(b"g", b"aa")
    assert resend == Resend(b"+-", b"bb")
    p.receive_data(encode_packet(b"bb"))
    assert events(p) == [Reply(b"g", b"bb")]


def test_an_unasked_stop_is_kept_while_a_reply_is_awaited():
    p = ClientProtocol()
    p.send_requests([b"qAttached"])
    p.receive_data(b"+" + encode_packet(b"T02thread:01;") + encode_packet(b"1"))
    stop = StopReply(2, ThreadId(1))
    assert events(p) == [Stopped(stop, True), Reply(b"qAttached", b"1")]
    assert list(p.pending_stops) == [stop]
    assert p.take_pending_stop() == stop and not p.running


def test_the_reply_to_halt_reason_is_a_stop_reply_not_an_unasked_stop():
    p = ClientProtocol()
    p.send_requests([b"?"])
    p.receive_data(encode_packet(b"T05thread:01;"))
    assert events(p) == [Reply(b"?", b"T05thread:01;")]
    assert not p.pending_stops


def test_a_resume_ends_with_its_stop_and_spurious_stops_before_it_are_forgotten():
    p = ClientProtocol()
    p.receive_data(encode_packet(b"T02thread:01;"))  # unasked, as QEMU on connect
    (unasked,) = events(p)
    assert unasked.queued and len(p.pending_stops) == 1
    assert p.send_resume(b"c") == b"+" + encode_packet(b"c")
    assert p.running and not p.pending_stops
    p.receive_data(b"+" + encode_packet(b"O6869") + encode_packet(b"T05thread:01;"))
    assert events(p) == [Output(b"hi", False), Stopped(StopReply(5, ThreadId(1)), False)]
    assert not p.running


def test_nothing_but_an_interrupt_goes_to_a_running_target():
    p = ClientProtocol()
    p.send_resume(b"c")
    with pytest.raises(LocalProtocolError):
        p.send_requests([b"g"])
    with pytest.raises(LocalProtocolError):
        p.send_resume(b"s")
    with pytest.raises(LocalProtocolError):
        p.post([b"M0,1:00"])
    p.receive_data(b"+" + encode_packet(b"O41"))  # console output while running: an ack is owed now
    assert events(p) == [Output(b"A", False)]
    assert p.send_interrupt() == b"\x03"  # no `+`: it would pause the guest
    assert p.send_interrupt() == b""  # one is on its way
    p.receive_data(encode_packet(b"T02thread:01;"))
    assert type(events(p)[0]) is Stopped
    assert p.send_interrupt() == b""  # stopped


def test_write_behind_frames_go_in_front_of_the_next_write_and_refusals_are_kept():
    p = ClientProtocol()
    p.post([b"M10,1:aa"])
    p.post([b"M11,1:bb"])
    data = p.send_requests([b"m10,2"])
    assert data == encode_packet(b"M10,1:aa") + encode_packet(b"M11,1:bb") + encode_packet(b"m10,2")
    p.receive_data(b"+++" + encode_packet(b"OK") + encode_packet(b"E0e") + encode_packet(b"aa00"))
    assert events(p) == [
        DeferredReply(b"M10,1:aa", b"OK", True),
        DeferredReply(b"M11,1:bb", b"E0e", False),
        Reply(b"m10,2", b"aa00"),
    ]
    assert p.deferred_errors == [(b"M11,1:bb", b"E0e")]


def test_held_memory_writes_are_known_until_they_go_out():
    """Until written, the target's memory lacks held `M`/`X` writes (a reader of RAM must ask the target);
    held register writes do not count."""
    p = ClientProtocol()
    p.post([b"P8=10000000"])
    assert not p.holds_memory_writes
    p.post([b"M10,1:aa"])
    assert p.holds_memory_writes
    p.send_requests([b"g"])
    assert not p.holds_memory_writes
    p.post([b"X10,1:a"])
    assert p.holds_memory_writes


def test_checked_replies_come_before_the_stop_of_the_resume_they_were_sent_with():
    p = ClientProtocol()
    p.send_requests([b"Z0,10,1"], b"c", check=True)
    p.receive_data(b"++" + encode_packet(b"OK") + encode_packet(b"T05thread:01;"))
    assert events(p) == [DeferredReply(b"Z0,10,1", b"OK", True), Stopped(StopReply(5, ThreadId(1)), False)]


def test_monitor_output_is_marked_as_such():
    p = ClientProtocol()
    p.send_requests([b"qRcmd,696e666f"])
    p.receive_data(encode_packet(b"O6f6b0a") + encode_packet(b"OK"))
    assert events(p) == [Output(b"ok\n", True), Reply(b"qRcmd,696e666f", b"OK")]


def test_replies_given_up_on_are_stray_when_they_come_late():
    p = ClientProtocol()
    p.send_requests([b"g"])
    p.abandon()
    p.receive_data(encode_packet(b"late") + encode_packet(b"nobody"))
    assert events(p) == [Stray(b"late"), Stray(b"nobody")]


@HOW
def test_garbage_between_packets_is_skipped(how):
    p = ClientProtocol()
    p.send_requests([b"g"])
    assert feed(p, b"\x00junk\xff" + encode_packet(b"aa") + b"tail", how) == [Reply(b"g", b"aa")]
    assert p.garbage == len(b"\x00junk\xff") + len(b"tail")


def test_a_disconnect_mid_packet_says_so_and_sending_is_refused_then():
    p = ClientProtocol()
    p.send_requests([b"g"])
    p.receive_data(b"+$0102")
    p.receive_data(b"")
    assert events(p) == [Closed(5)]
    assert p.closed
    with pytest.raises(LocalProtocolError):
        p.send_requests([b"g"])


def test_a_clean_disconnect():
    p = ClientProtocol()
    p.receive_data(b"")
    assert events(p) == [Closed(0)]


def test_a_stop_reply_that_does_not_parse_is_a_remote_protocol_error():
    p = ClientProtocol()
    p.send_resume(b"c")
    p.receive_data(encode_packet(b"T05thread:zz;"))
    with pytest.raises(RemoteProtocolError):
        p.next_event()


@settings(max_examples=300, deadline=None)  # no deadline: a loaded machine is not a failure
@given(
    st.lists(st.sampled_from([b"g", b"?", b"qRcmd,00", b"m0,4"]), max_size=4),
    st.booleans(),
    st.binary(max_size=300),
    st.lists(st.integers(1, 40), max_size=10),
)
def test_any_bytes_from_the_peer_give_events_or_a_remote_protocol_error(requests, resume, data, cuts):
    p = ClientProtocol()
    p.send_requests(requests, b"c" if resume else None)
    pos = 0
    for cut in [*cuts, len(data)]:
        chunk = data[pos : pos + cut]
        pos += cut
        if not chunk:
            continue  # b"" is the end of the stream
        p.receive_data(chunk)
        try:
            got = events(p)
        except RemoteProtocolError:
            return
        for event in got:
            assert type(event) in (Reply, DeferredReply, Stopped, Output, Resend, Stray)
    p.receive_data(b"")
    assert events(p)[-1] == Closed(p._framer.buffered)


# -- the trio client against scripted peers -------------------------------------------------------------


class Peer:
    """The stub's end of a memory stream: reads packets, writes what the script says."""

    def __init__(self, stream):
        self.stream = stream
        self.framer = Framer()
        self.received: list[bytes] = []  # every byte string read, as read

    async def packet(self) -> bytes:
        """The next packet's payload (acks and other bytes are recorded in `received` only)."""
        while True:
            event = self.framer.next_event()
            if type(event) is Packet:
                return event.payload
            if event is NEED_DATA:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError
                self.received.append(data)
                self.framer.receive_data(data)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def wait_for(self, byte: bytes) -> None:
        """Read until `byte` came (outside the framer: for `-` and 0x03)."""
        while byte not in b"".join(self.received):
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.received.append(data)


async def scripted(_=None):
    """An RSPClient on one end of a memory stream pair, and the peer on the other."""
    ours, theirs = trio.testing.memory_stream_pair()
    return RSPClient(ours, timeout=5), Peer(theirs)


async def test_the_client_resends_on_nack_and_gets_the_reply():
    client, peer = await scripted()

    async def stub():
        assert await peer.packet() == b"m10,4"
        await peer.send(b"-")  # "say again"
        assert await peer.packet() == b"m10,4"
        await peer.send(b"+" + encode_packet(b"01020304"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        assert await client.read_memory(0x10, 4) == b"\x01\x02\x03\x04"
    assert client.retransmits == 1


async def test_the_client_asks_again_for_a_garbled_reply():
    client, peer = await scripted()

    async def stub():
        assert await peer.packet() == b"g"
        await peer.send(b"+$0102#00")  # bad checksum
        await peer.wait_for(b"-")
        await peer.send(encode_packet(b"0102"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        assert await client.request(b"g") == b"0102"


async def test_spurious_stops_and_error_replies():
    client, peer = await scripted()

    async def stub():
        assert await peer.packet() == b"qAttached"
        await peer.send(b"+" + encode_packet(b"T02thread:01;") + encode_packet(b"1"))
        assert await peer.packet() == b"m0,4"
        await peer.send(b"+" + encode_packet(b"E0e"))
        assert await peer.packet() == b"c"
        await peer.send(b"+" + encode_packet(b"T05thread:01;"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        assert await client.request(b"qAttached") == b"1"
        assert client.pending_stops[0].signal == 2
        with pytest.raises(RemoteError) as info:
            await client.read_memory(0, 4)
        assert info.value.code == 0x0E
        await client.resume(b"c")  # forgets the unasked stop: it described a stop that is over
        assert (await client.wait_stop()).signal == 5
        assert not client.running


async def test_write_behind_replies_are_taken_on_the_way_to_the_stop():
    client, peer = await scripted()

    async def stub():
        assert [await peer.packet() for _ in range(3)] == [b"M0,1:aa", b"Z0,10,1", b"c"]
        await peer.send(b"+++" + encode_packet(b"OK") + encode_packet(b"E22") + encode_packet(b"T05thread:01;"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        await client.post([b"M0,1:aa"])
        await client.pipeline([b"Z0,10,1"], b"c", defer=True)
        assert (await client.wait_stop()).signal == 5
    assert client.deferred_errors == [(b"Z0,10,1", b"E22")]


async def test_monitor_output_and_console_output():
    client, peer = await scripted()

    async def stub():
        assert await peer.packet() == b"qRcmd," + b"info status".hex().encode()
        await peer.send(b"+" + encode_packet(b"O" + b"VM status: paused\n".hex().encode()) + encode_packet(b"OK"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        assert await client.monitor("info status") == "VM status: paused\n"
    assert client.console == []


async def test_a_peer_that_hangs_up_mid_packet_is_a_connection_closed():
    client, peer = await scripted()

    async def stub():
        await peer.packet()
        await peer.send(b"+$01020")
        await peer.stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        with pytest.raises(ConnectionClosed, match="middle of a packet"):
            await client.request(b"g")
    with pytest.raises(ConnectionClosed):
        await client.request(b"g")


async def test_a_reply_that_never_comes_is_a_timeout_and_a_late_one_is_not_taken_for_the_next():
    client, peer = await scripted()
    late = trio.Event()

    async def stub():
        assert await peer.packet() == b"m0,4"
        await late.wait()
        await peer.send(b"+" + encode_packet(b"11111111"))  # the late reply to m0,4
        assert await peer.packet() == b"m4,4"
        await peer.send(b"+" + encode_packet(b"22222222"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        with pytest.raises(TargetTimeout):
            await client.request(b"m0,4", timeout=0.05)
        late.set()
        assert await client.request(b"m4,4") == b"22222222"


async def test_an_interrupt_from_another_task_stops_the_wait():
    client, peer = await scripted()

    async def stub():
        assert await peer.packet() == b"c"
        await peer.wait_for(b"\x03")
        await peer.send(encode_packet(b"T02thread:01;"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub)
        await client.resume(b"c")
        nursery.start_soon(client.interrupt)
        assert (await client.wait_stop()).signal == 2
    # Nothing but 0x03 went out while the guest ran: no ack rode with it.
    assert b"".join(peer.received).count(b"+") == 0


def test_a_peer_that_never_acknowledges_costs_bounded_memory():
    p = ClientProtocol()
    for _ in range(10_000):
        p.send_requests([b"g"])
        p.receive_data(encode_packet(b"00"))
        events(p)
    assert len(p._unacked) <= 256


async def _socket_client() -> tuple[RSPClient, trio.socket.SocketType]:
    """An RSPClient on a socket (the path QEMU's connection takes), and the raw peer socket."""
    ours, theirs = trio.socket.socketpair()
    return RSPClient(trio.SocketStream(ours), timeout=5), theirs


async def test_a_bound_exchange_whose_reply_is_there_sets_no_deadline_and_one_that_waits_is_cut():
    """`begin_bound` limits every request of a stop; the scope's deadline is set only once a wait blocks."""
    client, peer = await _socket_client()
    await peer.send(b"+" + encode_packet(b"0123"))  # the answer is there before it is read
    with trio.CancelScope() as bound:
        client.begin_bound(bound, 0.2)
        try:
            assert await client.request(b"m0,2") == b"0123"
            assert bound.deadline == math.inf
            await client.request(b"m2,2")  # never answered
        finally:
            client.end_bound(bound)
    assert bound.cancelled_caught
    assert bound.deadline == math.inf  # ended: the scope may bound the next stop


async def test_time_in_bound_paused_does_not_count_against_the_bound():
    client, peer = await _socket_client()
    with trio.CancelScope() as bound:
        client.begin_bound(bound, 0.2)
        try:
            with client.bound_paused():
                await trio.sleep(0.3)  # a handler's own time: longer than the bound, not counted
            await peer.send(b"+" + encode_packet(b"OK"))
            assert await client.request(b"Z0,10,1") == b"OK"
        finally:
            client.end_bound(bound)
    assert not bound.cancelled_caught
