"""Unit tests (no QEMU) of the byte bounds on records, probe names, the state file and the path checks.

The same behaviours on a real guest with real probed processes are in test_survival.py and
test_local_security.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import trio

from probed.errors import BadSpec
from probed.front.names import check_probe_name
from probed.front.paths import UnsafePath, open_private_append, prepare_socket_path
from probed.front.state import read_state, write_state
from probed.lang.fetch import parse_fetchargs
from probed.records.events import EventHub, encode_record
from probed.records.size import MAX_RECORD_BYTES, RecordTooLarge, check_record_size, worst_case_record_bytes
from rsp.arch import ARCHES

I386 = ARCHES["i386"]


def record(probe: int, seq: int, payload: str = "") -> dict:
    return {"probe": probe, "name": f"p{probe}", "seq": seq, "pre": {"s": payload}}


def size(r: dict) -> int:
    return len(encode_record(r))


# -- the ring buffer and subscriptions --------------------------------------------------------------------


def test_ring_keeps_the_newest_records_within_its_bytes():
    one = size(record(1, 1, "x" * 1000))
    hub = EventHub(buffer=1000, buffer_bytes=3 * one + one // 2)
    for seq in range(1, 10):  # one digit each: every record the same size
        hub.publish(record(1, seq, "x" * 1000))
    assert [r["seq"] for r in hub.recent()] == [7, 8, 9]
    assert hub.ring_bytes == 3 * one and hub.dropped == 6
    assert hub.stats() == {"records": 3, "bytes": 3 * one, "max_bytes": 3 * one + one // 2, "dropped": 6}


def test_ring_still_bounded_by_count_and_filters_by_probe():
    hub = EventHub(buffer=4)
    for seq in range(1, 7):
        hub.publish(record(1 + seq % 2, seq))
    assert [r["seq"] for r in hub.recent()] == [3, 4, 5, 6]
    assert [r["seq"] for r in hub.recent(2)] == [3, 5]


def test_a_record_larger_than_the_ring_is_not_kept_but_still_delivered():
    hub = EventHub(buffer_bytes=100)
    with hub.subscribe() as sub:
        hub.publish(record(1, 1, "y" * 500))
        assert hub.recent() == [] and hub.dropped == 1
        assert sub.receive_nowait()["seq"] == 1


async def test_subscription_drops_what_would_pass_its_bytes_and_counts_it():
    missed: list[int] = []
    hub = EventHub(on_missed=missed.append)
    one = size(record(1, 1, "z" * 100))
    with hub.subscribe(maxsize=1000, max_bytes=2 * one) as sub:
        for seq in range(1, 6):
            hub.publish(record(1, seq, "z" * 100))
        assert sub.missed == 3 and missed == [1, 1, 1] and sub.queued_bytes == 2 * one
        assert (await sub.receive())["seq"] == 1
        assert sub.queued_bytes == one
        hub.publish(record(1, 6, "z" * 100))  # room again
        assert [sub.receive_nowait()["seq"] for _ in range(2)] == [2, 6]
        assert sub.queued_bytes == 0
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()


def test_an_empty_subscription_takes_a_record_over_its_bytes():
    hub = EventHub()
    with hub.subscribe(max_bytes=10) as sub:
        hub.publish(record(1, 1, "big" * 100))
        hub.publish(record(1, 2))
        assert sub.receive_nowait()["seq"] == 1 and sub.missed == 1


# -- worst-case record size ----------------------------------------------------------------------------------


def fields(*args: str):
    return parse_fetchargs(list(args), I386).fields_spec


def test_worst_case_covers_the_longest_rendering_of_each_type():
    for arg, longest in [("v=%ax:u32", 4294967295), ("v=%ax:s32", -2147483648), ("v=%ax:x32", "0xffffffff"),
                         ("v=%ax:u64", 2**64 - 1), ("v=%ax:s64", -(2**63))]:
        real = len(json.dumps({"v": longest})) - 2
        assert worst_case_record_bytes(fields(arg)) - 1024 - 160 >= real, arg
    # A string of 256 bytes, each escaped as \\uXXXX, fits too.
    assert worst_case_record_bytes(fields("s=+0(%ax):string")) >= len(json.dumps({"s": "\ufffd" * 256}))


def test_64_arrays_of_4k_fit_the_default_limit_and_of_8k_do_not():
    u32 = fields(*(f"f{i}=+0(%sp):u32[1024]" for i in range(64)))
    worst = check_record_size(u32)
    real = len(encode_record({"probe": 1, "pre": {f"f{i}": [4294967295] * 1024 for i in range(64)}}))
    assert real <= worst <= MAX_RECORD_BYTES
    with pytest.raises(RecordTooLarge) as err:
        check_record_size(fields(*(f"f{i}=+0(%sp):u64[1024]" for i in range(64))))
    assert "over the limit of 1048576" in str(err.value) and "u64[1024]" in str(err.value)
    assert err.value.data()["limit"] == MAX_RECORD_BYTES


# -- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["probe_target", "open_2", "café", "x-1.2", "0x10", "名前"])
def test_names_that_print_as_themselves_are_fine(name):
    check_probe_name(name)


@pytest.mark.parametrize(
    "name, reason",
    [("", "empty"), ("42", "all digits"), ("\u0664\u0662", "all digits"), ("a\tb", "U+0009"),
     ("a\x00", "U+0000"), ("\x9bX", "U+009B"), ("a\u2066b", "U+2066"), ("a\ufeff", "U+FEFF"),
     ("a\u2028b", "U+2028"), ("x" * 200, "at most 128")],
)
def test_names_with_control_format_or_space_characters_are_refused(name, reason):
    with pytest.raises(BadSpec) as err:
        check_probe_name(name)
    assert reason in str(err.value)
    assert str(err.value).isprintable()


# -- the state file ------------------------------------------------------------------------------------------


def test_state_is_written_atomically_owner_only(tmp_path):
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir(mode=0o700)
    doc = {"version": 1, "symbols": [], "probes": [{"id": 1, "name": "a"}]}
    write_state(path, doc)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_state(path) == doc
    write_state(path, {**doc, "probes": []})
    assert read_state(path)["probes"] == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temporary left


def test_a_state_file_that_does_not_parse_is_moved_aside(tmp_path):
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir(mode=0o700)
    path.write_text('{"version": 1, "probes": [')
    os.chmod(path, 0o600)
    assert read_state(path) is None
    assert path.with_name("state.json.bad").read_text().startswith('{"version"')
    assert not path.exists()


def test_a_state_file_writable_by_others_is_refused(tmp_path):
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir(mode=0o700)
    write_state(path, {"version": 1})
    os.chmod(path, 0o666)
    with pytest.raises(UnsafePath, match="writable by others"):
        read_state(path)


# -- paths ---------------------------------------------------------------------------------------------------


def test_events_file_may_not_be_a_fifo_or_a_directory(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath, match="FIFO"):
        open_private_append(fifo)
    with pytest.raises(OSError):
        open_private_append(tmp_path)


def test_a_directory_at_a_socket_path_is_left_alone(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsafePath, match="a directory is there"):
        prepare_socket_path(tmp_path / "d")
    assert (tmp_path / "d").is_dir()


def test_a_symlink_at_a_socket_path_is_left_alone(tmp_path):
    target = tmp_path / "t"
    target.write_text("t")
    link = tmp_path / "l"
    link.symlink_to(target)
    with pytest.raises(UnsafePath, match="a symlink is there"):
        prepare_socket_path(Path(link))
    assert link.is_symlink() and target.read_text() == "t"
