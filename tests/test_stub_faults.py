"""GDB clients that misbehave, against the real daemon's stub on real QEMU: none of them takes the daemon, the
engine or the probes down, and a real GDB works afterwards (issue 10: hang-ups, resets, `$` floods, packets
QEMU never answers, monitor commands that would end or reset the guest, fuzzed packets)."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsp.command_parser import parse_command
from rsp.commands import (
    Continue,
    Detach,
    Kill,
    Monitor,
    Query,
    StartNoAck,
    Step,
    VCont,
    WriteMemory,
    WriteMemoryBinary,
    WriteRegister,
    WriteRegisters,
)
from rsp.framing import NEED_DATA, Framer, Packet, encode_packet
from tests.daemon import Daemon
from tests.test_gdb import Gdb


@pytest.fixture
def stubbed(guest_i386, tmp_path):
    """The daemon on the i386 guest with its stub on a unix socket, a probe counting `probe_target`, the
    guest running."""
    sock = tmp_path / "gdb.sock"
    daemon = Daemon(guest_i386, tmp_path, "--stopped", "--gdb-listen", f"unix:{sock}")
    daemon.gdb_socket = str(sock)
    daemon.elf = guest_i386.elf
    daemon.ctl("add", "-n", "count", "probe_target")
    daemon.ctl("resume")
    yield daemon
    daemon.kill()


class Raw:
    """A bare RSP client on a blocking socket: what a hostile or broken GDB might send."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.framer = Framer()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self) -> bytes:
        """The next packet's payload (acks skipped)."""
        while (event := self.framer.next_event()) is NEED_DATA or type(event) is not Packet:
            if event is NEED_DATA:
                data = self.sock.recv(65536)
                assert data, "the stub closed the connection"
                self.framer.receive_data(data)
        return event.payload

    def raw_until(self, count: int) -> bytes:
        """At least `count` bytes as they came."""
        out = b""
        while len(out) < count:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            out += data
        return out

    def close(self) -> None:
        self.sock.close()


def probe(daemon) -> dict:
    return next(p for p in json.loads(daemon.ctl("list", "--json").stdout) if p["name"] == "count")


def check_gdb_and_exact_counts(daemon) -> None:
    """A real GDB attaches and debugs; while it holds the guest, the probe's hits are the guest's calls."""
    assert daemon.proc.poll() is None, daemon.stderr()
    gdb = Gdb(daemon.elf, daemon.gdb_socket)
    try:
        calls, counted = gdb.value("calls"), probe(daemon)
        # Held between a hit and the increment in the function body, or not.
        assert calls in (counted["hits"], counted["hits"] - 1) and counted["missed"] == 0
        gdb.mi("-break-insert elsewhere")
        # The first stop there may come before the next call (GDB may have stopped the guest after a call
        # and before `elsewhere`); from there, one whole turn of the loop is exactly one call and one hit.
        assert gdb.run("-exec-continue")["reason"] == "breakpoint-hit"
        turn = gdb.value("calls")
        assert turn == probe(daemon)["hits"] and turn >= calls
        assert gdb.run("-exec-continue")["reason"] == "breakpoint-hit"
        gdb.mi("-break-delete")
        assert gdb.value("calls") == probe(daemon)["hits"] == turn + 1
    finally:
        gdb.close()


def test_gdb_clients_that_hang_up_or_reset_end_their_own_session_only(stubbed):
    packets = [b"qC", b"?", b"g", b"qSupported:multiprocess+;swbreak+", b"c", b"m100000,40", b"q", b"vCont?"]
    for n in range(100):
        client = Raw(stubbed.gdb_socket)
        packet = packets[n % len(packets)]
        if n % 3 == 0:
            client.send(encode_packet(packet))  # and hang up at once
        elif n % 3 == 1:
            client.send(encode_packet(b"qC"))
            client.raw_until(1)  # the stub is answering: hang up with its reply unread (a reset)
            client.send(encode_packet(packet))
        else:
            client.send(encode_packet(packet)[:-2])  # hang up in the middle of a packet
        client.close()
    assert stubbed.proc.poll() is None, stubbed.stderr()
    check_gdb_and_exact_counts(stubbed)


def test_gdb_asking_again_gets_the_last_packet_again(stubbed):
    client = Raw(stubbed.gdb_socket)
    client.send(encode_packet(b"qC"))
    first = client.raw_until(len(b"+" + encode_packet(b"QC01")))
    assert first == b"+" + encode_packet(b"QC01")
    client.send(b"-")  # "say again": the reply came garbled
    assert client.raw_until(len(encode_packet(b"QC01"))) == encode_packet(b"QC01")
    client.send(b"+$qC#00")  # a garbled packet of ours: the stub asks for it again
    assert client.raw_until(1) == b"-"
    client.send(b"+" + encode_packet(b"D"))
    assert client.packet() == b"OK"
    client.close()
    check_gdb_and_exact_counts(stubbed)


def test_packets_qemu_never_answers_get_the_empty_reply_from_the_stub(stubbed):
    """A bare `q`, `v`, `Q`, `F...` (QEMU answers none of them: a forwarded one would stall for 10 s)."""
    client = Raw(stubbed.gdb_socket)
    client.sock.settimeout(5)  # well under the 10 s the engine would wait for QEMU
    unanswered = [b"q", b"v", b"Q", b"Fffffffff,2", b"vFoo;1", b"qOffsets", b"X100000,0:", b"qXfer:libraries:read::0,fff", b"Qqemu.sstep=0"]
    client.send(b"".join(encode_packet(p) for p in unanswered) + encode_packet(b"qC"))
    assert [client.packet() for _ in unanswered] == [b""] * len(unanswered)
    assert client.packet() == b"QC01"
    client.send(b"+" + encode_packet(b"D"))
    client.close()
    check_gdb_and_exact_counts(stubbed)


def test_a_dollar_flood_and_an_oversized_packet_are_dropped_and_the_stub_goes_on(stubbed):
    client = Raw(stubbed.gdb_socket)
    flood = b"$" * (8 << 20)
    for i in range(0, len(flood), 1 << 16):
        client.send(flood[i : i + (1 << 16)])
    client.send(encode_packet(b"qC"))  # its `$` starts the packet that counts
    assert client.packet() == b"QC01"
    client.send(b"+$" + b"a" * (1 << 20) + b"#00" + encode_packet(b"qC"))  # longer than any packet may be
    assert client.packet() == b"QC01"
    client.send(b"+" + encode_packet(b"D"))
    client.close()
    check_gdb_and_exact_counts(stubbed)


class GdbWithTarget(Gdb):
    """`Gdb`, keeping what the target printed (`O` packets: MI target records) with the console text."""

    def _read(self, deadline: float) -> None:
        before = len(self.pending)
        super()._read(deadline)
        self.console += [r["payload"] for r in self.pending[before:] if r["type"] == "target" and r["payload"]]


def test_monitor_commands_that_end_or_reset_the_guest_are_refused(stubbed):
    from stub.policy import REFUSED_MONITOR

    gdb = GdbWithTarget(stubbed.elf, stubbed.gdb_socket)
    try:
        for command in ("quit", "system_reset", "stop", "c", "gdbserver none"):
            start = len(gdb.console)
            result = gdb.mi(f'-interpreter-exec console "monitor {command}"')
            assert result["message"] == "error", result
            said = "".join(gdb.console[start:])
            word = command.split()[0]
            assert f"probed refuses 'monitor {word}'" in said and REFUSED_MONITOR[word] in said
            assert "Protocol error with Rcmd" in said
        # QEMU is still there, the guest still held for GDB; harmless commands run.
        assert "VM status: paused" in gdb.cli("monitor info status")
    finally:
        gdb.close()
    check_gdb_and_exact_counts(stubbed)


def test_monitor_commands_may_be_allowed(guest_i386, tmp_path):
    """The stub made with `allow_monitor=True` runs even refused commands (here `stop`, while the guest is held
    for GDB already, then `info status`)."""
    import trio

    from probed.engine.engine import Engine
    from rsp.connection import RSPClient
    from stub.server import serve_gdb

    async def main():
        engine = Engine(guest_i386.target, symbol_files=[str(guest_i386.elf)], stopped=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            sock = tmp_path / "gdb.sock"
            await nursery.start(lambda task_status: serve_gdb(engine, f"unix:{sock}", allow_monitor=True, task_status=task_status))
            client = await RSPClient.connect(f"unix:{sock}")
            assert await client.monitor("stop") == ""
            assert "VM status: paused" in await client.monitor("info status")
            assert await client.request(b"D") == b"OK"
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


# Commands a fuzzed GDB may send: anything but what resumes, ends the session, switches acks off, runs a
# monitor command or writes memory or registers (those are GDB's right, and would only break the guest).
_UNSAFE = (Continue, Step, VCont, Kill, Detach, StartNoAck, Monitor, WriteMemory, WriteMemoryBinary, WriteRegister, WriteRegisters)


def _safe(payload: bytes) -> bool:
    cmd = parse_command(payload)
    return not isinstance(cmd, _UNSAFE) and not (isinstance(cmd, Query) and cmd.name.startswith("Qqemu.PhyMem"))


_letters = st.sampled_from(list(b"?gGpPmMXZzcCsSvHTqQDkF!iIrRtbBA"))
_payloads = st.builds(lambda first, rest: bytes([first]) + rest, _letters, st.binary(max_size=40)).filter(_safe)
_garbage = st.binary(max_size=20).map(lambda b: bytes(c for c in b if c not in b"$%#-\x03"))


def test_fuzzed_packets_each_get_one_reply_and_leave_the_daemon_alive(stubbed):
    client = Raw(stubbed.gdb_socket)
    client.sock.settimeout(5)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(_garbage, _payloads), min_size=1, max_size=4))
    def exchange(items):
        client.send(b"".join(garbage + encode_packet(payload) for garbage, payload in items))
        for _ in items:
            client.packet()  # one reply each (any reply: QEMU's or the stub's own), none missing
        client.send(b"+")

    exchange()
    client.send(encode_packet(b"D"))
    assert client.packet() == b"OK"
    client.close()
    check_gdb_and_exact_counts(stubbed)
