"""A user probe added by symbol with a host copy survives `kill -9` of the daemon and its restart from the
state file, with no `--sysroot` and the copy gone: it comes back at the file offset the symbol resolved to,
named as it was added, on the real Debian kernel.

The probed file is a copy of utarget at a path of this test's own (/tmp/urestart), so no process that
other tests left in the session's guest runs it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from probed.guest.userfile import UserElf
from probed.testing.qemu import CACHE
from tests.daemon import Daemon
from tests.linux.uprogs import uprog_path

pytestmark = pytest.mark.linux

GUEST_PATH = "/tmp/urestart"


def test_user_probe_by_symbol_comes_back_after_kill9_without_its_copy(linux_guest, tmp_path):
    class Kernel:
        target = linux_guest.target
        elf = linux_guest.kallsyms

    copy = tmp_path / "utarget-copy"
    shutil.copy(uprog_path(CACHE / "linux", "utarget"), copy)
    offset = UserElf(copy).resolve("utarget")
    first = Daemon(Kernel, tmp_path)
    try:
        linux_guest.shell(f"cp /bin/utarget {GUEST_PATH}")
        first.ctl("add", "-n", "calls", "--file-copy", str(copy), f"{GUEST_PATH}:utarget",
                  "$pid", "a=$arg1:s64", "b=$arg2:s64")
        listed = json.loads(first.ctl("list", "--json").stdout)
        linux_guest.shell(f"{GUEST_PATH} 2")
        before = first.records("calls", 2)
    finally:
        first.kill()
    copy.unlink()  # the restarted daemon has neither the copy nor a sysroot
    saved = json.loads((tmp_path / "ctl" / "state.json").read_text())["probes"]
    assert [(p["spec"], p["file_offset"], p["file_copy"]) for p in saved] == \
        [(f"{GUEST_PATH}:utarget", offset, str(copy))]

    second = Daemon(Kernel, tmp_path)
    try:
        assert "1 probe(s) re-added" in second.stderr()
        relisted = json.loads(second.ctl("list", "--json").stdout)
        assert relisted == [{**listed[0], "hits": 0}]
        assert relisted[0]["address"] == f"{GUEST_PATH}:utarget"
        linux_guest.shell(f"{GUEST_PATH} 3; rm {GUEST_PATH}")
        after = second.records("calls", 3)
        # uprobe_events takes offsets: `save` writes the one the symbol resolved to.
        saved_lines = second.ctl("save").stdout.splitlines()
        assert saved_lines == [
            f"# probed: calls: added as {GUEST_PATH}:utarget (not in kprobe_events syntax)",
            f"p:uprobes/calls {GUEST_PATH}:{offset:#x} $pid a=$arg1:s64 b=$arg2:s64",
        ]
        assert second.stop() == 0
    finally:
        try:
            second.stop()  # (a no-op once stopped) its breakpoints go: the session's guest is left running
        finally:
            second.kill()
    for records, n in ((before, 2), (after, 3)):
        assert [(r["pre"]["a"], r["pre"]["b"]) for r in records] == [(i, i * i) for i in range(1, n + 1)]
        assert len({r["pre"]["pid"] for r in records}) == 1
        assert {r["where"] for r in records} == {f"{GUEST_PATH}:utarget"}
    assert [r["seq"] for r in after] == [1, 2, 3]
