"""GDB through probed's stub with return probes underneath: `finish`, `next` and `step` behave as if the
probe were not there, and GDB never sees a return breakpoint's stop (real GDB, real QEMU)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_gdb import Gdb, probes, stubbed  # noqa: F401  (the fixture)

SOURCE = Path(__file__).resolve().parent.parent / "probed" / "testing" / "guests" / "guest.c"


def line_of(text: str) -> int:
    """The line of guest.c that holds `text` (once)."""
    (line,) = [n for n, t in enumerate(SOURCE.read_text().splitlines(), start=1) if text in t]
    return line


def to_depth_sum_line(gdb: Gdb) -> None:
    """Run to the next turn's `depth_sum(turn % 4);` line in cpu0_main."""
    gdb.mi("-break-insert read_watched")
    gdb.run("-exec-continue")
    gdb.mi("-break-delete")
    stop = gdb.run("-exec-finish")
    assert stop["reason"] == "function-finished"
    # read_watched's return address is where the next line's code starts.
    assert int(stop["frame"]["line"]) == line_of("depth_sum(turn % 4);")


def test_finish_next_and_step_over_a_function_with_a_return_probe(stubbed):  # noqa: F811
    stubbed.ctl("add", "-r", "-n", "ret", "depth_sum", "n=$arg1:s32", "r=$retval:s32")
    gdb = Gdb(stubbed.elf, stubbed.gdb_socket)
    try:
        # Turn 1: `next` over depth_sum(1): two calls, both returned under the probe, GDB stops on the next line.
        to_depth_sum_line(gdb)
        assert probes(stubbed)["ret"]["hits"] == 0
        stop = gdb.run("-exec-next")
        assert stop["reason"] == "end-stepping-range"
        assert int(stop["frame"]["line"]) == line_of("turns = turns + 1;")
        assert probes(stubbed)["ret"]["hits"] == 2

        # Turn 2: `step` into depth_sum(2), then `finish`: GDB gets depth_sum(2)'s return value, and
        # stops nowhere in between (the inner calls return to a return breakpoint inside depth_sum).
        to_depth_sum_line(gdb)
        stop = gdb.run("-exec-step")
        assert stop["frame"]["func"] == "depth_sum"
        assert gdb.value("n") == 2
        assert probes(stubbed)["ret"]["hits"] == 2
        stop = gdb.run("-exec-finish")
        assert stop["reason"] == "function-finished"
        assert stop["return-value"] == "3"
        assert stop["frame"]["func"] == "cpu0_main"
        assert probes(stubbed)["ret"]["hits"] == 5  # 0, 1 and then 2 (published when GDB resumes)

        # Stepping line by line through the recursion of turn 3 (depth_sum(3)), then on.
        to_depth_sum_line(gdb)
        stop = gdb.run("-exec-step")
        assert stop["frame"]["func"] == "depth_sum" and gdb.value("n") == 3
        while stop["frame"]["func"] == "depth_sum":
            stop = gdb.run("-exec-step")
        # GDB's last step went onto the return address (where the next line starts): like a step onto
        # any probed place, the outermost return fires when the guest leaves it.
        assert int(stop["frame"]["line"]) == line_of("turns = turns + 1;")
        assert probes(stubbed)["ret"]["hits"] == 5 + 3
        gdb.mi("-target-detach")
    finally:
        gdb.close()
    records = [json.loads(x) for x in stubbed.ctl("events", "--probe", "ret", "--count", "9", "--json").stdout.splitlines()]
    assert [(r["pre"]["n"], r["pre"]["r"]) for r in records] == [
        (0, 0), (1, 1), (0, 0), (1, 1), (2, 3), (0, 0), (1, 1), (2, 3), (3, 6)
    ]
    assert [r["seq"] for r in records] == list(range(1, 10))
