"""The engine's components on their own (no QEMU): the state table, the hit pipeline, refused points.

The engine's behaviour on a real guest is in test_engine.py, test_watch.py, test_gdb.py and test_stub.py.
"""

from __future__ import annotations

import pytest
import trio

from probed.engine.breakpoints import Z_TYPES, key_for_z, refused
from probed.engine.hits import HitPipeline
from probed.engine.probes import Probe, ProbeTable
from probed.engine.state import TRANSITIONS, Event, Guest, GuestState, IllegalTransition
from probed.errors import TargetError, Unsupported
from probed.guest.symbols import Location
from probed.lang.fetch import Unfetched
from probed.lang.filter import parse_filter
from probed.records.events import EventHub
from rsp.errors import RemoteError, UnsupportedPacket
from rsp.stop import ThreadId

# -- who holds the guest ------------------------------------------------------------------------------


def test_a_probe_hit_then_gdb_then_a_parked_hit():
    guest = GuestState()
    assert guest.state is Guest.DETACHED and guest.summary == "detached"
    walk = [
        (Event.ATTACHED, Guest.STOPPED),
        (Event.RESUMED, Guest.RUNNING),
        (Event.STOPPED, Guest.STOPPED),
        (Event.HIT, Guest.HIT),
        (Event.RESUMED, Guest.RUNNING),  # the hit's last write carried the `c`
        (Event.STOPPED, Guest.STOPPED),
        (Event.HIT, Guest.HIT),
        (Event.PARK, Guest.PARKED),  # GDB wants the same place
        (Event.TO_GDB, Guest.PARKED),
        (Event.HIT, Guest.HIT),  # GDB continues: the parked hit completes first
        (Event.HIT_DONE, Guest.STOPPED),
        (Event.GDB_RESUMED, Guest.STOPPED),
        (Event.RESUMED, Guest.RUNNING),
        (Event.LOST, Guest.WAITING),
        (Event.RECONNECTED, Guest.STOPPED),
        (Event.HOLD, Guest.HELD),
        (Event.DETACHED, Guest.DETACHED),
    ]
    for event, state in walk:
        assert guest.move(event) is state, event
    assert guest.summary == "detached"


def test_an_illegal_transition_raises_and_says_what_is_allowed():
    guest = GuestState()
    guest.move(Event.ATTACHED)
    guest.move(Event.RESUMED)
    with pytest.raises(IllegalTransition) as info:
        guest.move(Event.HIT)  # a running guest cannot be in a hit: a stop comes first
    assert guest.state is Guest.RUNNING  # unchanged
    assert "'hit' while the guest is running" in str(info.value) and "stopped" in str(info.value)
    with pytest.raises(IllegalTransition):
        GuestState().move(Event.RESUMED)  # not attached


def test_every_state_is_in_the_table_and_can_be_lost_or_detached():
    assert set(TRANSITIONS) == set(Guest)
    for state, moves in TRANSITIONS.items():
        assert moves[Event.DETACHED] is Guest.DETACHED
        if state is not Guest.DETACHED:
            assert moves[Event.LOST] is Guest.WAITING
    # Only a stop (or the engine's own interrupt) leaves RUNNING; only reconnecting leaves WAITING.
    assert set(TRANSITIONS[Guest.RUNNING]) == {Event.STOPPED, Event.LOST, Event.DETACHED}
    assert set(TRANSITIONS[Guest.WAITING]) == {Event.RECONNECTED, Event.LOST, Event.DETACHED}


def test_status_words_stay_coarse():
    guest = GuestState()
    guest.move(Event.ATTACHED)
    assert guest.summary == "stopped"
    guest.move(Event.HOLD)
    assert (guest.summary, guest.state.value) == ("stopped", "held stopped")
    guest.move(Event.RESUMED)
    assert guest.summary == "running"
    guest.move(Event.LOST)
    assert guest.summary == "waiting for the target"


# -- the hit pipeline: seq and time taken at the hit ---------------------------------------------------


class _Target:
    def symbolize(self, address: int) -> str:
        return f"fn+{address & 0xF:#x}"


class _Breakpoints:
    dirty = False


class _Engine:
    """What `HitPipeline` uses of the engine."""

    def __init__(self):
        self.target = _Target()
        self.table = ProbeTable()
        self.stops = 0
        self.fault_limit = 3
        self.breakpoints = _Breakpoints()
        self.hub = EventHub(16)


def _probe(table: ProbeTable, name: str, **fields) -> Probe:
    probe = Probe(id=table.new_id(), name=name, spec=name, location=Location(name, None, "fn", 0, 0x1000), **fields)
    table.add(probe)
    return probe


def test_a_parked_hit_keeps_the_seq_and_time_of_its_hit():
    # CPU 1 hits where GDB stopped too: its hit is parked, published when GDB resumes. Meanwhile CPU 2 hits
    # the same probe and is published first. Each record has its own seq, in hit order (seq was taken at
    # publish time: both got 2, and the control socket dropped the second as already sent).
    engine = _Engine()
    probe = _probe(engine.table, "p")
    pipeline = HitPipeline(engine)

    async def hits():
        engine.stops += 1
        parked = await pipeline.begin("break", ThreadId(1), 0x1000, b"", [probe])
        engine.stops += 1
        other = await pipeline.begin("break", ThreadId(2), 0x1000, b"", [probe])
        pipeline.finish(other)
        pipeline.finish(parked)

    trio.run(hits)
    records = engine.hub.recent()
    assert [(r["seq"], r["cpu"], r["stop"]) for r in records] == [(2, 1, 2), (1, 0, 1)]
    assert records[1]["time_ns"] <= records[0]["time_ns"]
    assert [r["kind"] for r in records] == ["break", "break"]
    assert (probe.hits, pipeline.hits, pipeline.records) == (2, 2, 2)


def test_a_filter_over_an_unfetched_field_is_false_and_logged(caplog):
    engine = _Engine()

    class Fetch:
        fields = ("reg",)
        needs_memory = False

        async def run(self, ctx):
            return {"reg": Unfetched("<no register fs_base>")}

    probe = _probe(engine.table, "p", pre=Fetch(), condition=parse_filter('reg != "x"', ["reg"]))
    pipeline = HitPipeline(engine)

    async def hit():
        pipeline.finish(await pipeline.begin("break", None, 0x1000, b"", [probe]))

    with caplog.at_level("WARNING"):
        trio.run(hit)
        trio.run(hit)
    assert engine.hub.recent() == [] and probe.filtered == 2
    warnings = [r.getMessage() for r in caplog.records if "not fetched" in r.getMessage()]
    assert warnings == ["probe p: filter 'reg != \"x\"' is false while field 'reg' is not fetched (<no register fs_base>)"]


def test_a_handler_fault_is_recorded_and_disables_the_probe_after_the_limit():
    engine = _Engine()

    class Broken:
        needs_memory = False

        async def run(self, ctx):
            raise ValueError("no")

    probe = _probe(engine.table, "p", pre=Broken())
    pipeline = HitPipeline(engine)

    async def hits():
        for _ in range(3):
            pipeline.finish(await pipeline.begin("break", None, 0x1000, b"", [probe]))

    trio.run(hits)
    assert [r["error"] for r in engine.hub.recent()] == ["pre: ValueError: no"] * 3
    assert (probe.faults, probe.enabled, engine.breakpoints.dirty) == (3, False, True)
    assert probe.disabled_reason == "3 handler faults in a row (last: ValueError: no)"


# -- breakpoints: one Z-type map, typed refusals -------------------------------------------------------


def test_z_types_map_both_ways():
    for (kind, access), ztype in Z_TYPES.items():
        key = key_for_z(int(ztype), 0x1000, 4)
        assert (key[0], key[3]) == (kind, access)
        assert key[2] == (4 if kind == "watch" else 0)


def test_a_refused_point_is_typed_by_the_reply_not_by_its_text():
    key = ("watch", 0x2000, 4, "r")
    assert isinstance(refused(key, UnsupportedPacket(b"Z3,2000,4")), Unsupported)
    # An `E.text` error whose text says "not supported" is still a refusal, not an unsupported packet
    # (the kind was decided by `"not support" in str(exc)`).
    error = refused(key, RemoteError(None, "watchpoints not supported here", b"Z3,2000,4"))
    assert isinstance(error, TargetError) and not isinstance(error, Unsupported)
    assert str(error).startswith("the target refused the watch at 0x2000")


def test_a_record_kind_is_one_of_the_known():
    from probed.records.events import RECORD_KINDS, HitRecord

    assert RECORD_KINDS == ("break", "watch", "return", "user")
    record = HitRecord(probe=1, name="p", kind="return", seq=1, stop=1, cpu=0, pc=0x10, where="f+0x10",
                       extra={"func": "0x0", "duration_ns": 5})
    assert list(record.as_dict()) == ["probe", "name", "kind", "seq", "stop", "time_ns", "cpu", "func",
                                      "duration_ns", "pc", "where", "pre", "post", "error"]
    with pytest.raises(ValueError, match="not 'kretprobe'"):
        HitRecord(probe=1, name="p", kind="kretprobe", seq=1, stop=1, cpu=0, pc=None, where=None)
